"""Convert a standalone_transformer_lm.py checkpoint into a Hugging Face LLaMA folder.

    python convert_to_llama.py --ckpt ./runs/lm138/ckpt_last.pt --spm ./data/tokenizer.model --out ./RSCaLM-138M-LLaMA

The folder loads with `transformers`' AutoModelForCausalLM and AutoTokenizer, no custom code and no network:
config.json, generation_config.json, model.safetensors, tokenizer.json + tokenizer_config.json +
special_tokens_map.json, and tokenizer.model for tools that read SentencePiece directly (llama.cpp).
--ckpt takes ckpt_last.pt, ckpt_best.pt or the exported pytorch_model.bin (with its config.json beside it).

Our parameters already carry HF LLaMA's names and RoPE convention, so the weights are a rename plus splitting the
fused q/k/v and gate/up rows. The tokenizer is rebuilt as a `tokenizers` BPE whose ids equal SentencePiece's on
every string, and is checked against SentencePiece before anything is written.
"""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import sys

import torch

from standalone_transformer_lm import (HelpFormatter, ModelConfig, Parser, Transformer, UserError, check_flags,
                                      file_in, file_sha256, load_tensors, load_tokenizer, model_from_saved,
                                      model_with_weights, pid_alive, require_file, signals_held)

try:  # the trainer runs without these (the guide's first install is torch, sentencepiece, tqdm and numpy)
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
except ImportError as e:
    print(f"error: {e.name} is not installed, and converting needs it. HINT: pip install -r requirements.txt",
          file=sys.stderr)
    sys.exit(2)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONVERTED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")  # what convert() writes
DEFAULT_OUT = "./RSCaLM-138M-LLaMA"

# Strings where converted SentencePiece tokenizers usually disagree with the original: leading, double and trailing
# spaces (the dummy prefix), control characters, text outside the vocabulary (byte fallback), characters a Unicode
# normalisation would change, literal special-token text and a literal "▁".
PARITY_TEXTS = [
    "", " ", "  ", "The sun is", " leading space", "  two leading spaces", "trailing space ", "double  space",
    "line\nbreak", "\n", "\n\n", "tab\there", "\t", "\r\n", "emoji 😀🎉👍🏽", "中文字符测试", "日本語のテキスト", "한국어",
    "ﬁ ligature ＡＢＣ", "e\u0301 vs \u00e9", "\u00a0nbsp\u200bzwsp", "digits 1234567890 3.14", "<s> </s> <unk> <pad>",
    "▁literal ▁▁", "x" * 200, "Ünïcödé ßtraße", "def f(x):\n    return x  # comment\n",
]


def load_our_model(path: str) -> tuple[Transformer, str | None]:
    """The model, and the sha256 of the tokenizer it was trained with (None when unknown)."""
    obj = load_tensors(path, "pass ckpt_last.pt, ckpt_best.pt or pytorch_model.bin written by `train`")
    if isinstance(obj, dict) and "model" in obj and "model_config" in obj:  # ckpt_last.pt / ckpt_best.pt
        cfg, state, sha = obj["model_config"], obj["model"], obj.get("tokenizer_sha256")
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):  # export
        cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
        require_file(cfg_path, "model config", "keep the config.json that `train` wrote beside pytorch_model.bin")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
            fields = {f.name for f in dataclasses.fields(ModelConfig)}
            cfg, state = {k: v for k, v in cfg.items() if k in fields}, obj  # the export adds "format" and "step"
        except (ValueError, AttributeError) as e:  # not JSON, not UTF-8, not an object
            raise UserError(f"{cfg_path!r} is not the config.json that `train` wrote ({e}). HINT: keep the one it "
                            f"wrote beside pytorch_model.bin, or convert ckpt_last.pt") from None
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer.model")  # train copies it there
        sha = file_sha256(beside) if os.path.isfile(beside) else None
    else:
        raise UserError(f"{path!r} holds neither a training checkpoint nor a state_dict. HINT: pass ckpt_last.pt, "
                        f"ckpt_best.pt or pytorch_model.bin written by `train`")
    model = model_from_saved(cfg, state, path, "convert ckpt_last.pt, or keep the config.json `train` wrote beside "
                             "the weights")
    return model.eval(), sha


def hf_state_dict(model: Transformer, dtype: torch.dtype) -> dict:
    cfg = model.cfg
    qkv_rows = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    out = {}
    for name, w in model.state_dict().items():
        w = w.to(dtype)
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:  # tied: transformers rebuilds lm_head from embed_tokens
                out[name] = w
        elif name.endswith("self_attn.qkv_proj.weight"):
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), w.split(qkv_rows)):
                out["model." + name.replace("qkv_proj", proj)] = part  # (views: safetensors saves rows apart)
        elif name.endswith("mlp.gate_up_proj.weight"):
            for proj, part in zip(("gate_proj", "up_proj"), w.chunk(2)):
                out["model." + name.replace("gate_up_proj", proj)] = part
        else:
            out["model." + name] = w
    bad = [k for k, v in out.items() if not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{len(bad)} weights are not finite in {str(dtype)[6:]} (first: {bad[0]}). HINT: export in "
                        f"bfloat16 or float32 (--dtype), or convert a checkpoint from before the run diverged")
    return out


def special_ids(sp) -> dict:
    return {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}


def hf_config(cfg: ModelConfig, sp, dtype: str) -> dict:
    # transformers' LlamaConfig insists on d_model % n_head == 0 even with an explicit head_dim; Mistral's does not,
    # and with sliding_window None MistralForCausalLM computes exactly what LlamaForCausalLM does.
    llama = cfg.d_model % cfg.n_head == 0
    theta = float(cfg.rope_theta)
    return {  # typed explicitly: transformers validates types, and `train --tie_embeddings 1` stores an int
        "architectures": ["LlamaForCausalLM" if llama else "MistralForCausalLM"],
        "model_type": "llama" if llama else "mistral",
        "vocab_size": int(cfg.vocab_size), "hidden_size": int(cfg.d_model), "intermediate_size": int(cfg.ffn_hidden),
        "num_hidden_layers": int(cfg.n_layer), "num_attention_heads": int(cfg.n_head),
        "num_key_value_heads": int(cfg.n_kv_head), "head_dim": int(cfg.head_dim), "hidden_act": "silu",
        "max_position_embeddings": int(cfg.seq_len), "rms_norm_eps": float(cfg.norm_eps),
        "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},  # 4.x and 5.x names
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        **({} if llama else {"sliding_window": None}),
        "tie_word_embeddings": bool(cfg.tie_embeddings), **special_ids(sp), "dtype": dtype, "use_cache": True,
    }


def build_tokenizer(sp) -> Tokenizer:
    # SentencePiece BPE applies the merge with the best piece score among all adjacent pairs whose concatenation is a
    # piece. The same BPE in `tokenizers` needs every such pair listed as a merge, ranked by the merged piece's score.
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    normal = {pieces[i] for i in range(n) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    merges = []
    for i in sorted(range(n), key=lambda i: -sp.get_score(i)):
        p = pieces[i]
        if p in normal:
            merges += [(p[:k], p[k:]) for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal]
    unk = pieces[sp.unk_id()]
    tok = Tokenizer(BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token=unk, fuse_unk=True,
                        byte_fallback=True))
    # The normalizer does what SentencePiece's does with add_dummy_prefix and identity rules: one "▁" in front of
    # every text, even one that starts with a space, and spaces become "▁". No pre-tokenizer: a Metaspace one skips
    # the prefix when the text already starts with a space, which shifts every id of such a text.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bos = pieces[sp.bos_id()]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                       special_tokens=[(bos, sp.bos_id())])
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                            for i in range(n) if sp.is_control(i) or sp.is_unknown(i)])
    return tok


def tokenizer_files(sp, seq_len: int) -> dict:
    names = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id(), "pad_token": sp.pad_id()}
    specials = {k: sp.id_to_piece(i) for k, i in names.items() if i >= 0}
    config = {
        # The generic fast class loads tokenizer.json as written; LlamaTokenizer would replace our normalizer with
        # its own Metaspace pre-tokenizer (see build_tokenizer).
        "tokenizer_class": "PreTrainedTokenizerFast", **specials,
        "add_bos_token": True, "add_eos_token": False,  # as LLaMA; training framed each line as [bos] ids [eos]
        "split_special_tokens": True,  # "<s>" typed in a text is text, as it was for SentencePiece in training
        "clean_up_tokenization_spaces": False, "model_max_length": seq_len, "padding_side": "left",
        # as LlamaTokenizerFast: transformers 4.x's generic class would add token_type_ids, which generate() refuses
        "model_input_names": ["input_ids", "attention_mask"],
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}


def check_tokenizer(encode, decode, sp, texts=PARITY_TEXTS, add_bos: bool = False) -> None:
    """encode(text) -> ids and decode(ids) -> text of a converted tokenizer must agree with SentencePiece."""
    for text in texts:
        want = [sp.bos_id()] * add_bos + sp.encode(text)
        got = encode(text)
        if got != want:
            raise UserError(f"the converted tokenizer gives {got[:12]} for {text[:40]!r}, SentencePiece gives "
                            f"{want[:12]}. HINT: only SentencePiece BPE models written by `prep` are supported")
        if decode(got) != sp.decode(want):
            raise UserError(f"the converted tokenizer decodes {text[:40]!r} as {decode(got)[:40]!r}, SentencePiece "
                            f"as {sp.decode(want)[:40]!r}")


def user_defined_pieces(proto: bytes) -> list[str]:
    """The pieces of type USER_DEFINED (4) in a SentencePiece model, read from its protobuf encoding: the model's field
    1 holds the pieces, each with its text in field 1 and its type in field 3. (sentencepiece's generated module for it
    refuses any protobuf but the version it was generated with.)"""
    def varint(buf: bytes, i: int) -> tuple[int, int]:
        value, shift = 0, 0
        while buf[i] & 0x80:
            value, shift, i = value | (buf[i] & 0x7F) << shift, shift + 7, i + 1
        return value | buf[i] << shift, i + 1

    def fields(buf: bytes):  # (field number, value): an int, bytes, or None for a fixed-size number (a score)
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            if key & 7 == 0:
                value, i = varint(buf, i)
            elif key & 7 == 2:
                size, i = varint(buf, i)
                value, i = buf[i:i + size], i + size
            else:  # 1: 64 bits, 5: 32 bits (SentencePiece uses no other kinds)
                value, i = None, i + (8 if key & 7 == 1 else 4)
            yield key >> 3, value

    pieces = [dict(fields(piece)) for number, piece in fields(proto) if number == 1]
    return [piece[1].decode("utf-8", "replace") for piece in pieces if piece.get(3) == 4]


def need_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("transformers is not installed, and loading the folder needs it. HINT: pip install -r "
                        "requirements.txt") from None


class VerificationError(Exception):
    """The converted folder does not reproduce our model or tokenizer: a bug, not a user mistake (exit status 1)."""


@torch.no_grad()
def max_logit_diff(folder: str, model: Transformer, ids: torch.Tensor) -> float:
    """Largest |logit| difference between the folder's transformers model and ours on ids (B, T), in float32.

    Ours runs with its weights rounded to the dtype the folder was saved in, so any difference is the conversion's."""
    from transformers import AutoModelForCausalLM
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        saved = DTYPES.get(json.load(f).get("dtype"), torch.float32)
    try:  # plain transformers code: from version 5.25 it would otherwise swap in kernels fetched from the Hub, which
        # needs the network (many GPU nodes have none) and checks their code, not the folder's
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_kernels=False).eval()
    except Exception as e:  # transformers and safetensors raise many kinds
        raise VerificationError(f"transformers cannot load {folder!r} ({type(e).__name__}: "
                                f"{(str(e).strip().splitlines() or [''])[0][:200]})") from None
    ref = model_with_weights(model.cfg, {k: v.to(saved).float() for k, v in model.state_dict().items()}).eval()
    theirs, ours = hf(ids).logits, ref(ids)[0]
    if theirs.shape != ours.shape:
        raise VerificationError(f"{folder!r} gives logits of shape {tuple(theirs.shape)}, our checkpoint "
                                f"{tuple(ours.shape)}: the folder was not converted from this checkpoint")
    return (ours - theirs).abs().max().item()


def verify(folder: str, model: Transformer, sp, tol: float) -> float:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # the parity texts exceed a tiny model's context: a warning, not a problem
    hf_logging.disable_progress_bar()
    hf_tok = AutoTokenizer.from_pretrained(folder)
    try:
        check_tokenizer(lambda t: hf_tok(t)["input_ids"], lambda ids: hf_tok.decode(ids, skip_special_tokens=True),
                        sp, add_bos=True)
    except UserError as e:
        raise VerificationError(f"AutoTokenizer disagrees with SentencePiece: {e}") from None
    ids = torch.randint(0, model.cfg.vocab_size, (2, min(model.cfg.seq_len, 64)),
                        generator=torch.Generator().manual_seed(0))
    diff = max_logit_diff(folder, model, ids)
    if not diff <= tol:  # also catches NaN
        raise VerificationError(f"the converted model's logits differ from ours by up to {diff:.3g} (tolerance "
                                f"{tol:g})")
    return diff


def check_out(out: str, force: bool, keep: list[str]) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out!r} is a file, expected a folder. HINT: pick another --out")
    root = os.path.realpath(out)
    for path in keep:  # --force replaces the whole folder
        if os.path.realpath(path) == root or os.path.realpath(path).startswith(root + os.sep):
            raise UserError(f"--out {out!r} holds {path!r}, which replacing it would delete. HINT: pick another --out")
    # --force replaces an earlier conversion, files of the names written here: nothing else (a model card, a run,
    # prepped data, a subfolder) is deleted with it. lost+found: a fresh volume's own folder
    names = set(os.listdir(out) if os.path.isdir(out) else ()) - {"lost+found"}
    if theirs := sorted(n for n in names if n not in CONVERTED_FILES or os.path.isdir(os.path.join(out, n))):
        raise UserError(f"--out {out!r} holds {', '.join(theirs[:3])}, which a converted folder does not, and "
                        f"replacing it would delete them. HINT: move them out of it, or pick another --out")
    if names and not force:
        raise UserError(f"--out {out!r} holds an earlier conversion. HINT: pass --force to replace it, or pick another "
                        f"--out")


PARTIAL = ".partial"  # in a folder being built (and the one it replaces, during the swap), naming host and process


def remove_stale(out: str) -> None:
    """Folders that a killed conversion into --out left (OUT.tmpPID being built, or OUT/.tmpPID for a mount point;
    OUT.oldPID, the folder it replaced), each a whole model: only ours, marked as such, of a process of this host
    that is gone."""
    for folder, prefix in ((os.path.dirname(out), os.path.basename(out) + "."), (out, ".")):
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                if not re.fullmatch(re.escape(prefix) + r"(tmp|old)\d+", name):
                    continue
                with contextlib.suppress(OSError, ValueError):
                    with open(os.path.join(folder, name, PARTIAL)) as f:
                        host, pid = f.read().split()
                    if host == socket.gethostname() and not pid_alive(int(pid)):
                        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def convert(ckpt: str, spm_path: str, out: str, dtype: str = "float32", force: bool = False,
            verify_tol: float | None = None) -> Transformer:
    remove_stale(os.path.realpath(out))
    check_out(out, force, keep=[ckpt, spm_path, os.getcwd()])
    model, trained_sha = load_our_model(ckpt)
    sp = load_tokenizer(spm_path)
    if sp.get_piece_size() != model.cfg.vocab_size:
        raise UserError(f"tokenizer {spm_path!r} has {sp.get_piece_size()} pieces but the model's vocabulary is "
                        f"{model.cfg.vocab_size}. HINT: pass the tokenizer.model the model was trained with (--spm)")
    if trained_sha and file_sha256(spm_path) != trained_sha:  # same size, other pieces: a prep run since training
        raise UserError(f"tokenizer {spm_path!r} is not the one {ckpt!r} was trained with (sha256 differs). HINT: "
                        f"pass the tokenizer.model that `train` copied beside the checkpoint, or leave out --spm")
    if user := user_defined_pieces(sp.serialized_model_proto()):  # (prep never makes them; its --spm takes any)
        raise UserError(f"tokenizer {spm_path!r} has user-defined symbols ({', '.join(map(repr, user[:5]))}), which "
                        f"SentencePiece matches whole wherever they occur and the converted tokenizer.json would not: "
                        f"AutoTokenizer's ids would differ from training's. HINT: export a model trained on a "
                        f"tokenizer that `prep` trained (prep without --spm); `generate` samples from this one")
    tok = build_tokenizer(sp)
    tok.encode_special_tokens = True  # what split_special_tokens in tokenizer_config.json makes transformers do
    check_tokenizer(lambda t: tok.encode(t, add_special_tokens=False).ids, tok.decode, sp)

    # Build the folder beside --out and rename it into place, so --out is never left half written. A mount point (a
    # container's volume) or a folder whose parent we cannot write cannot be renamed: the folder is built inside it.
    out = os.path.realpath(out)  # a link to a folder: the folder is replaced, the link kept
    inside = os.path.isdir(out) and (os.path.ismount(out) or not os.access(os.path.dirname(out), os.W_OK))
    tmp = os.path.join(out, f".tmp{os.getpid()}") if inside else f"{out}.tmp{os.getpid()}"
    old = f"{out}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        with open(os.path.join(tmp, PARTIAL), "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
    except OSError as e:
        raise UserError(f"--out {out!r} cannot be written ({e.strerror}). HINT: pick a folder you can write to") \
            from None
    try:
        save_file(hf_state_dict(model, DTYPES[dtype]), os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(os.path.join(tmp, "model.safetensors"), 0o666 & ~umask)  # safetensors writes it owner-only
        config = hf_config(model.cfg, sp, dtype)
        write_json(os.path.join(tmp, "config.json"), config)
        # A bare generate() samples as our `generate` does by default, and as Meta's models do it stops at the context
        # (max_length: a caller's max_length then counts, which a max_new_tokens here would override)
        write_json(os.path.join(tmp, "generation_config.json"),
                   {**special_ids(sp), "do_sample": True, "temperature": 0.8, "top_k": 200,
                    "max_length": model.cfg.seq_len})
        tok.save(os.path.join(tmp, "tokenizer.json"))
        for name, obj in tokenizer_files(sp, model.cfg.seq_len).items():
            write_json(os.path.join(tmp, name), obj)
        shutil.copyfile(spm_path, os.path.join(tmp, "tokenizer.model"))
        if verify_tol is not None:
            diff = verify(tmp, model, sp, verify_tol)
            print(f"verified: AutoTokenizer ids == SentencePiece ids on {len(PARITY_TEXTS)} strings, largest logit "
                  f"difference {diff:.2e} (tolerance {verify_tol:g})")
        with signals_held():  # a signal stops the conversion once --out holds the new folder, not with none
            if inside:  # empty, or --force: its files go, then the new ones are renamed in, one by one
                os.remove(os.path.join(tmp, PARTIAL))
                for entry in os.scandir(out):
                    if entry.path != tmp and entry.name != "lost+found":
                        shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.remove(entry.path)
                for name in os.listdir(tmp):
                    os.replace(os.path.join(tmp, name), os.path.join(out, name))
            else:  # empty, or --force: the old folder moves aside, marked (a kill leaves it to the next run to remove),
                if os.path.exists(out):  # the new one comes in, its mark goes, and the old one is deleted
                    shutil.copyfile(os.path.join(tmp, PARTIAL), os.path.join(out, PARTIAL))
                    os.replace(out, old)
                os.replace(tmp, out)
                os.remove(os.path.join(out, PARTIAL))
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    c = model.cfg
    print(f"wrote {out}: {config['architectures'][0]}, {c.n_layer} layers, d_model {c.d_model}, {c.n_head} heads "
          f"({c.n_kv_head} kv) of {c.head_dim}, vocab {c.vocab_size}, {dtype}")
    return model


def main(argv=None) -> None:
    p = Parser(description="Convert a checkpoint into a Hugging Face LLaMA folder.", formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="ckpt_last.pt, ckpt_best.pt or an exported pytorch_model.bin; a "
                                                "run's folder: its ckpt_last.pt")
    p.add_argument("--spm", help="SentencePiece tokenizer.model, or a folder holding it (default: the one beside "
                                 "--ckpt)")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder to write")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the saved weights")
    p.add_argument("--force", action="store_true", help="replace --out when it is not empty")
    p.add_argument("--verify", action="store_true", help="load the result with transformers and compare logits")
    p.add_argument("--tol", type=float, default=1e-3, help="largest logit difference --verify accepts")
    args = p.parse_args(argv)
    args.ckpt = file_in(args.ckpt, "ckpt_last.pt")
    spm_path = (file_in(args.spm, "tokenizer.model") if args.spm else
                os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "tokenizer.model"))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # like Ctrl-C: the folder being built goes
    try:
        check_flags(args, [("tol", args.tol >= 0, "0 or more")])
        if args.verify:
            need_transformers()
        convert(args.ckpt, spm_path, args.out, args.dtype, args.force, args.tol if args.verify else None)
    except (UserError, VerificationError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except (OSError, SafetensorError) as e:  # a full disk, a vanished mount
        print(f"error: {e}. HINT: check the path, its permissions and the free space", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
