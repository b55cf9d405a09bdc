"""Load a folder written by convert_to_llama.py with `transformers` and continue a prompt, greedy and sampled.

    python test_llama_model.py                                   # loads ./RSCaLM-138M-LLaMA
    python test_llama_model.py ./RSCaLM-138M-LLaMA --prompt "Once upon a time" --ckpt ./runs/lm138/ckpt_last.pt

With --ckpt it also runs our own model from that checkpoint on the same tokens (prompt + greedy continuation),
prints the largest logit difference and exits with status 1 above --tol.
"""

import contextlib
import json
import math
import os
import shlex
import sys

import torch

from convert_to_llama import DEFAULT_OUT, VerificationError, load_our_model, max_logit_diff, need_transformers
from standalone_transformer_lm import HelpFormatter, Parser, UserError, beside_me, check_flags, file_in, require_file


def run(args) -> None:
    # a checkpoint, or train's --out_dir (its config.json is ours): what to convert first
    ckpt = file_in(args.folder, "ckpt_last.pt")
    if os.path.isfile(ckpt):
        what = "a file" if ckpt == args.folder else "a training run's folder"
        raise UserError(f"{args.folder!r} is {what}, not a converted model folder. HINT: run `python "
                        f"{beside_me('convert_to_llama.py')} --ckpt {shlex.quote(ckpt)} --out {DEFAULT_OUT}` first and "
                        f"pass {DEFAULT_OUT}")
    config = os.path.join(args.folder, "config.json")
    if not os.path.isfile(config):
        raise UserError(f"{args.folder!r} is not a converted model folder (no config.json). HINT: run `python "
                        f"{beside_me('convert_to_llama.py')} --ckpt CKPT --out {shlex.quote(args.folder)}` first, or "
                        f"pass the folder")
    with contextlib.suppress(OSError, ValueError, AttributeError):  # (one that does not load: said below)
        with open(config, encoding="utf-8") as f:
            kind = json.load(f).get("model_type")
        if kind not in ("llama", "mistral"):  # another model's weights would not load into it: random ones would
            raise UserError(f"{args.folder!r} holds a {kind} model, where convert_to_llama.py writes llama or mistral "
                            f"ones. HINT: pass the folder that convert_to_llama.py wrote")
    check_flags(args, [("max_new_tokens", args.max_new_tokens >= 1, "at least 1"),
                       ("temperature", args.temperature == 0 or 1e-6 <= args.temperature < math.inf,
                        "0 (greedy only), or finite and at least 1e-6"),
                       ("top_k", args.top_k >= 1, "at least 1"), ("seed", 0 <= args.seed < 1 << 63, "in [0, 2**63)"),
                       ("tol", args.tol >= 0, "0 or more")])
    ours = None
    if args.ckpt:  # loaded first: a checkpoint that does not load stops the run before any generating
        args.ckpt = file_in(args.ckpt, "ckpt_last.pt")  # (a run's folder)
        require_file(args.ckpt, "checkpoint", "pass the ckpt_last.pt the folder was converted from")
        ours = load_our_model(args.ckpt)[0]
    need_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # a local folder loads in seconds; the bar would only bury the output
    hf_logging.set_verbosity_error()  # a prompt too long for the context is our error line, not also its warning
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tok = AutoTokenizer.from_pretrained(args.folder)
        # in the dtype it was saved in; no kernels from the Hub (transformers 5.25's default), so it runs offline
        model = AutoModelForCausalLM.from_pretrained(args.folder, use_kernels=False).to(device).eval()
    except Exception as e:  # a missing or torn file: transformers and safetensors raise many kinds
        raise UserError(f"{args.folder!r} does not load with transformers ({type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0][:200]}). HINT: convert it again") from None
    # (else: an index error in the embedding, or no token to sample)
    if len(tok) > model.config.vocab_size:
        raise UserError(f"{args.folder!r} holds a tokenizer of {len(tok)} tokens beside a model of "
                        f"{model.config.vocab_size}: its files come from two conversions. HINT: convert it again")
    if bad := next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None):
        raise UserError(f"{args.folder!r} holds non-finite weights (nan or inf in {bad}). HINT: convert it again, "
                        f"from a checkpoint before the run diverged")
    if ours is not None:
        c, h = ours.cfg, model.config
        sizes = {"vocabulary": (h.vocab_size, c.vocab_size), "layers": (h.num_hidden_layers, c.n_layer),
                 "d_model": (h.hidden_size, c.d_model), "heads": (h.num_attention_heads, c.n_head),
                 "kv heads": (h.num_key_value_heads, c.n_kv_head), "head size": (h.head_dim, c.head_dim),
                 "FFN width": (h.intermediate_size, c.ffn_hidden), "context": (h.max_position_embeddings, c.seq_len)}
        differ = [f"{name} {a} against {b}" for name, (a, b) in sizes.items() if a != b]
        if differ:
            raise UserError(f"{args.folder!r} was not converted from {args.ckpt!r}: {', '.join(differ)} (the "
                            f"folder's, then the checkpoint's). HINT: pass the checkpoint it was converted from")
    inputs = tok(args.prompt, return_tensors="pt").to(device)
    n_prompt, context = inputs["input_ids"].shape[1], model.config.max_position_embeddings
    if n_prompt >= context:
        raise UserError(f"the prompt is {n_prompt} tokens, the model's context is {context}. HINT: shorten it")
    max_new = min(args.max_new_tokens, context - n_prompt)
    greedy = model.generate(**inputs, do_sample=False, temperature=None, top_k=None, max_new_tokens=max_new)
    # Decode whole sequences: a continuation decoded alone would lose the space its first token starts with.
    print(f"greedy : {tok.decode(greedy[0], skip_special_tokens=True)}")
    if args.temperature > 0:  # 0: greedy only, as in our `generate`
        torch.manual_seed(args.seed)
        sampled = model.generate(**inputs, do_sample=True, temperature=args.temperature, top_k=args.top_k,
                                 max_new_tokens=max_new)
        print(f"sampled: {tok.decode(sampled[0], skip_special_tokens=True)}")
    if args.ckpt:
        ids = greedy[:, :context].cpu()
        diff = max_logit_diff(args.folder, ours, ids)
        print(f"largest logit difference vs {args.ckpt} on {ids.shape[1]} tokens: {diff:.2e} (tolerance {args.tol:g})")
        if not diff <= args.tol:
            raise VerificationError(f"logits differ by up to {diff:.3g}, above --tol {args.tol:g}: the folder does "
                                    f"not reproduce {args.ckpt!r}. HINT: if it was converted from another checkpoint "
                                    f"of this shape (the run's other one, or an earlier save), pass that one")


def main(argv=None) -> None:
    p = Parser(description="Generate with a converted LLaMA folder; optionally compare with ours.",
               formatter_class=HelpFormatter)
    p.add_argument("folder", nargs="?", default=DEFAULT_OUT, help="converted folder")
    p.add_argument("--prompt", default="The sun is", help="text to continue")
    p.add_argument("--max_new_tokens", type=int, default=50, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy only")
    p.add_argument("--top_k", type=int, default=200, help="sample from the k most likely tokens (as our generate)")
    p.add_argument("--seed", type=int, default=1337, help="same seed, same text")
    p.add_argument("--ckpt", help="our checkpoint the folder came from (or its run's folder): compare logits on the "
                                  "same tokens")
    p.add_argument("--tol", type=float, default=1e-3, help="largest logit difference accepted with --ckpt")
    args = p.parse_args(argv)
    try:
        run(args)
    except (UserError, VerificationError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 1)
    except KeyboardInterrupt:  # Ctrl-C while transformers loads or the model generates: it writes nothing
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
