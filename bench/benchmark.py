"""Speed of standalone_transformer_lm.py: prep throughput, training steps and decoding, against Hugging Face LLaMA.

    python bench/benchmark.py                         # CPU: quick size; prep on 1 GB, trainer, generate, train
    python bench/benchmark.py --only train,generate --rounds 3
    python bench/benchmark.py --size presets          # GPU: 138m, 350m, 700m at seq 1024 in bf16
    python bench/benchmark.py --size 350m             # one preset: each should fit 10 minutes on one H100

Prints one table per part and writes them, with the environment, to OUT/<device>-<size>-<time>.json.
Models get random weights and random token batches: speed does not depend on what the weights are. HF's model gets
a copy of ours, so both compute the same function (the tables show the first losses and the greedy tokens agree).
"""

import argparse
import contextlib
import copy
import ctypes
import functools
import gc
import hashlib
import io
import json
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import standalone_transformer_lm as lm  # noqa: E402  (after the path insert)

# The settings the run was started with, read before a compile puts inductor's own cache folder in the environment
STARTED_ENV = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "TORCHINDUCTOR_"))}

# Model sizes: ModelConfig fields and batch size. "quick" is the 2-core CPU size the CPU targets refer to; "tiny"
# runs in seconds, for the test that keeps this script working between the days a GPU is at hand.
SIZES = {"tiny": (dict(lm.PRESETS["tiny"], vocab_size=512), 4),
         "quick": (dict(vocab_size=32000, d_model=256, n_layer=4, n_head=4, seq_len=256), 8),
         **{name: (dict(lm.PRESETS[name], vocab_size=32000, seq_len=1024), 16) for name in ("138m", "350m", "700m")}}
LR, WEIGHT_DECAY = 3e-4, 0.1  # any values: they do not change a step's cost
CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                         "standalone_transformer_lm_bench")


# ----------------------------------------------------------------------------------------------------------------------
# Environment and tables


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            if m:
                return m.group(1).strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    import sentencepiece
    import transformers
    return {"device": device_name(device), "device_type": device.type, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "sentencepiece": sentencepiece.__version__, "numpy": np.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "malloc_env": {k: v for k, v in STARTED_ENV.items() if k.startswith("MALLOC_")},  # moves CPU figures 20 %
            "inductor_env": {k: v for k, v in STARTED_ENV.items() if k.startswith("TORCHINDUCTOR_")},
            "load_avg_at_start": os.getloadavg()}  # other work on the machine skews CPU figures: this shows it


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:#.3g}"  # 3 significant digits, trailing zeros kept
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    cells = [columns] + [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def columns(rows: list[dict]) -> list[str]:  # lists and dicts (per-step times, the floor's parts): the JSON only
    return list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (list, dict))))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """fn()'s result and its wall time in seconds, with the device's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t0


# glibc's handling of freed memory moves a CPU step by a fifth or more (bench/README): `train` and `generate` keep
# freed memory (lm.settle_cpu), where a user's own loop around HF's model runs with glibc's defaults, which hand each
# large freed tensor back to the kernel and fault a fresh one in, page by page, at the next step.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt's parameters (malloc.h)


def use_allocator(model: str, args, device: torch.device) -> None:
    """Before each timed variant on a Linux CPU: glibc's settings for `model` under --allocator, and the memory freed
    so far handed back to the kernel, so that each variant starts as a fresh process would (and its peak memory is
    its own). as_run: ours keeps freed memory, as `train` and `generate` do; HF gets glibc's defaults as a process has
    them after a few steps (blocks over the largest mmap threshold that glibc's own rule reaches, 32 MiB, are mapped
    per allocation, such as the logits and their gradients; smaller ones are reused). glibc cannot always hand back
    what ours' variant kept (2 processes in 14 in the test's case), and HF's next variant then reuses it: an error in
    HF's favour only. kept: both keep it. default: glibc's settings are left as the process started."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    keep = {"as_run": model == "ours", "kept": True, "default": None}[args.allocator]
    if keep:
        lm.settle_cpu(device)  # the script's own setting
    with contextlib.suppress(OSError, AttributeError):  # (another libc: nothing to set)
        libc = ctypes.CDLL(None)
        if keep is False:
            libc.mallopt(M_MMAP_MAX, 65536)
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
        libc.malloc_trim(0)


def free_memory(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()  # compiled graphs hold on to their models and CUDA graph pools
    if device.type == "cuda":
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak memory of a block above what was in use when it began, in MiB: the CUDA allocator's, or on Linux CPUs
    the process's resident set (VmHWM, whose reset needs Linux >= 4.0; elsewhere no figure)."""

    def __init__(self, device: torch.device):
        self.device, self.base, self.mib = device, None, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            with contextlib.suppress(OSError):
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current VmRSS
                self.base = self._proc_status_mib("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        elif self.base is not None:
            self.mib = self._proc_status_mib("VmHWM") - self.base

    @staticmethod
    def _proc_status_mib(field: str) -> float:
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


# ----------------------------------------------------------------------------------------------------------------------
# Prep: a synthetic corpus, then `prep` with 1 worker and with all cores, each in a fresh process


def make_corpus(path: str, mb: int, seed: int = 0) -> None:
    """About mb MB of natural-ish text, one sample per line, from Python's own documentation.

    Lines are runs of the docs' words from random places, of log-normal length (a few words to a few thousand). The
    docs hold only ~9,000 distinct words, too few for a 32K BPE (SentencePiece refuses above ~15K), so one word in
    ten is swapped for a Zipf-distributed made-up word spliced from two real ones: new words, English-like letters.
    """
    import pydoc_data.topics
    rng = np.random.default_rng(seed)
    words = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)).split()
    alpha = sorted({w for w in words if w.isalpha() and len(w) > 3})
    made = sorted({a[:rng.integers(2, len(a))] + b[rng.integers(1, len(b) - 1):]
                   for a, b in zip(rng.choice(alpha, 400_000), rng.choice(alpha, 400_000))})
    made = list(rng.permutation(made)[:100_000])
    zipf_cdf = np.cumsum(1.0 / np.arange(1, len(made) + 1))
    vocab = np.array(words + made, dtype=object)
    tmp, written = f"{path}.tmp{os.getpid()}", 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < mb * 1e6:
            n = np.clip(rng.lognormal(3.5, 1.0, 20_000), 1, 3000).astype(np.int64)  # words per line
            ends = np.cumsum(n)
            ids = (np.repeat(rng.integers(len(words), size=len(n)), n) + np.arange(ends[-1]) - np.repeat(ends - n, n))
            ids %= len(words)
            swap = rng.random(len(ids)) < 0.1
            ids[swap] = len(words) + np.searchsorted(zipf_cdf, rng.random(swap.sum()) * zipf_cdf[-1])
            seps = np.full(len(ids), " ", dtype=object)
            seps[ends - 1] = "\n"
            text = np.empty(2 * len(ids), dtype=object)
            text[0::2], text[1::2] = vocab[ids], seps
            chunk = "".join(text.tolist())
            f.write(chunk)
            written += len(chunk.encode())
    os.replace(tmp, path)


def prep_child(text_path: str, out_dir: str, workers: int) -> None:
    """Runs in a fresh process: one `prep` call; prints its figures as one JSON line."""
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        meta = lm.prep(text_path, out_dir, vocab_size=32000, num_workers=workers, progress=False)
    wall = time.perf_counter() - t0
    # The summary line times the encoding pass alone (after sampling and tokenizer training).
    m = re.search(r"([\d,]+) tokens/s \(([\d.]+) MB/s\)", out.getvalue())
    enc_tok_s = float(m.group(1).replace(",", "")) if m else None
    tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    # ru_maxrss (KiB on Linux) of this process only. RUSAGE_CHILDREN would mislead: a spawned worker is forked
    # before it execs, so its peak starts at this process's size at that moment, however small the worker stays.
    print(json.dumps({"workers": workers, "corpus_MB": os.path.getsize(text_path) / 1e6, "tokens": tokens,
                      "wall_s": wall, "encode_s": tokens / enc_tok_s if m else None, "encode_tok_s": enc_tok_s,
                      "encode_MB_s": float(m.group(2)) if m else None, "total_tok_s": tokens / wall,
                      "rss_main_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def tree_pss_mib(root: int) -> float | None:
    """Proportional set size of a process and all its descendants (shared pages split among their users)."""
    parent = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{pid}/stat") as f:
                parent[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
    tree = {root}
    while grown := {pid for pid, ppid in parent.items() if ppid in tree and pid not in tree}:
        tree |= grown
    total = 0
    for pid in tree:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += int(re.search(r"^Pss:\s+(\d+) kB", f.read(), re.M).group(1))
    return total / 1024 or None


def bench_prep(args) -> list[dict]:
    os.makedirs(args.cache_dir, exist_ok=True)
    corpus = os.path.join(args.cache_dir, f"corpus-{args.prep_mb}MB-seed0.txt")
    if not os.path.exists(corpus):  # made once and reused: generating 1 GB takes about a minute
        print(f"writing a {args.prep_mb} MB synthetic corpus to {corpus.replace(os.path.expanduser('~'), '~', 1)}")
        make_corpus(corpus, args.prep_mb)
    rows = []
    for workers in sorted({1, os.cpu_count() or 1}):
        with tempfile.TemporaryDirectory() as out_dir, tempfile.TemporaryFile("w+") as log:
            cmd = [sys.executable, os.path.abspath(__file__), "--prep_child", corpus, out_dir, str(workers)]
            proc, peak = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True), 0.0
            try:
                while proc.poll() is None:  # sampled: the workers' memory is invisible to getrusage (see prep_child)
                    peak = max(peak, tree_pss_mib(proc.pid) or 0.0)
                    time.sleep(1.0)
            finally:  # stopped early: the child stops its encoding workers and removes its files
                proc.terminate()
                proc.wait()
            log.seek(0)
            output = log.read()
        if proc.returncode:
            raise RuntimeError(f"prep with {workers} worker(s) failed:\n{output[-3000:]}")
        rows.append({**json.loads(output.strip().splitlines()[-1]), "peak_pss_all_MiB": peak or None})
        print_table("prep (so far)", rows, columns(rows))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face model of the same shape, with our weights


def hf_model(cfg: lm.ModelConfig, dtype: torch.dtype):
    """LlamaForCausalLM of cfg's shape; Mistral (no sliding window: the same network) when d_model % n_head != 0,
    which LlamaConfig refuses even with an explicit head_dim (--head_dim runs; no preset is such a shape)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
              num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
              head_dim=cfg.head_dim, max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps,
              rope_theta=cfg.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
              tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", attention_dropout=0.0,
              bos_token_id=lm.BOS_ID, eos_token_id=lm.EOS_ID, pad_token_id=lm.PAD_ID)
    config = LlamaConfig(**kw) if cfg.d_model % cfg.n_head == 0 else MistralConfig(**kw, sliding_window=None)
    # dtype here, as from_pretrained does it: weights in dtype, RoPE's inv_freq kept in float32. model.to(bfloat16)
    # would round inv_freq too, shifting the angle of every position, and greedy tokens would part from ours.
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def hf_state_dict(model: lm.Transformer) -> dict:
    """Our parameters under HF names: split the fused q/k/v and gate/up rows."""
    cfg, out = model.cfg, {}
    qkv_rows = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    for name, w in model.state_dict().items():
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[name] = w
        elif name.endswith("qkv_proj.weight"):
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), w.split(qkv_rows)):
                out["model." + name.replace("qkv_proj", proj)] = part
        elif name.endswith("gate_up_proj.weight"):
            for proj, part in zip(("gate_proj", "up_proj"), w.chunk(2)):
                out["model." + name.replace("gate_up_proj", proj)] = part
        else:
            out["model." + name] = w
    return out


def model_pair(cfg: lm.ModelConfig, dtype: torch.dtype = torch.float32) -> tuple[lm.Transformer, torch.nn.Module]:
    """Ours with seeded random weights and HF's with a copy of them, on the CPU."""
    torch.manual_seed(0)
    ours = lm.Transformer(cfg)
    hf = hf_model(cfg, dtype)
    hf.load_state_dict(hf_state_dict(ours), strict=True)  # copy_ casts to hf's dtype
    return ours.to(dtype), hf


def hf_optimizer(model, like: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """lm.make_optimizer's recipe on HF's parameter names: the same AdamW settings (betas, eps, fused or not), weight
    decay on the matrices and not on the norm gains, which are HF's only 1-D parameters."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": like.param_groups[0]["weight_decay"]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, **{k: like.defaults[k] for k in ("lr", "betas", "eps", "foreach", "fused")})


# ----------------------------------------------------------------------------------------------------------------------
# Training step: forward, loss, backward, clip, AdamW; ours vs HF, eager and compiled


def train_step(model, raw, optimizer, ctx, x, y, hf: bool = False) -> torch.Tensor:
    """One optimizer step as the trainer takes it (without its accumulation): forward and loss under ctx, backward,
    clipping, AdamW. model: raw, or raw compiled."""
    with ctx:
        if hf:  # shift_labels: HF's loss on exactly our targets, all T positions, inside the compiled forward
            loss = model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss
        else:
            loss = model(x, y)[1]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def time_train(name: str, cpu_model, cfg: lm.ModelConfig, batch: int, compiled: bool, device: torch.device,
               ours_optimizer: torch.optim.Optimizer, args) -> dict:
    # As the trainer does: float32 weights, bf16 autocast on GPUs; plain float32 on CPU.
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    xy = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=torch.Generator().manual_seed(1))
    if name == "ours":  # as the trainer feeds them, two views of one tensor: then a compiled step can reuse the graph
        xy = xy.to(device)  # that the trainer compiled (the compile cache's key holds the inputs' strides)
        x, y = xy[:, :-1], xy[:, 1:]
    else:
        x, y = xy[:, :-1].contiguous().to(device), xy[:, 1:].contiguous().to(device)  # HF's loss needs .view()
    use_allocator(name, args, device)
    with PeakMemory(device) as mem:  # weights, gradients, AdamW state and activations
        raw = copy.deepcopy(cpu_model).to(device)
        if name == "ours":
            optimizer = lm.make_optimizer(raw, LR, WEIGHT_DECAY, device)
        else:
            optimizer = hf_optimizer(raw, ours_optimizer)
        model = torch.compile(raw) if compiled else raw
        step = functools.partial(train_step, model, raw, optimizer, ctx, x, y, hf=name == "hf")
        t0 = time.perf_counter()
        loss0 = step().item()  # the first step compiles
        first_s = time.perf_counter() - t0
        for _ in range(args.warmup - 1):
            step()
        times = []
        for _ in range(args.steps):  # synced every step, as the trainer is by its per-step .item()
            loss, seconds = timed(step, device)
            times.append(seconds)
        # The same steps queued back to back, one sync at the end: what the GPU idles per step while the host waits
        # for it and then launches the next step's first kernels. A trainer that read its loss only at log
        # intervals would save that much (on a CPU the host does the work: nothing to save).
        queued = args.queued_steps if args.queued_steps is not None else args.steps * (device.type == "cuda")
        _, queued_s = timed(lambda: [step() for _ in range(queued)], device) if queued else (None, None)
    dt = min(times)  # other work on the machine can only slow a step down: the fastest is the cleanest figure
    row = {"model": name, "compile": int(compiled), "batch": batch, "ms_step": dt * 1e3,
           "tok_s": batch * cfg.seq_len / dt, "peak_MiB": mem.mib, "first_step_s": first_s, "loss0": loss0,
           "loss_last": loss.item(), "step_ms_all": [round(t * 1e3, 1) for t in times]}
    if queued:  # the synced steps' mean over the queued ones' (means: the queued steps have no fastest)
        row["sync_cost"] = sum(times) / len(times) / (queued_s / queued) - 1
    return row


class Budget:
    """Skips the remaining variants once --time_budget is spent, so that a GPU run fits its time slot. A variant that
    fails is reported (traceback on stdout, one line in the JSON) and the run goes on: on a borrowed GPU, one broken
    variant should not cost the figures of all the others."""

    def __init__(self, seconds: float):
        self.end, self.skipped, self.failed = time.perf_counter() + seconds if seconds > 0 else float("inf"), [], []

    def failure(self, what: str, e: Exception) -> None:
        if sys.exc_info()[0]:  # (raised, rather than made to be reported)
            traceback.print_exc()
        self.failed.append(f"{what}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}")
        print(f"  FAILED {self.failed[-1]}; going on")

    def allows(self, what: str) -> bool:
        if time.perf_counter() < self.end:
            return True
        if what not in self.skipped:  # (asked again in each round)
            print(f"  skipped {what}: --time_budget is spent")
            self.skipped.append(what)
        return False


def fitting_train(name: str, size: str, cpu_model, cfg: lm.ModelConfig, batch: int, compiled: bool,
                  device: torch.device, ours_optimizer, args, budget: Budget) -> dict | None:
    """time_train, halving the batch on out-of-memory ("batch 16 or what fits"; the row says which)."""
    while budget.allows(f"train {size} {name} compile={int(compiled)}"):
        try:
            return time_train(name, cpu_model, cfg, batch, compiled, device, ours_optimizer, args)
        except Exception as e:  # out of memory inside a compile comes wrapped in the compiler's error
            if batch == 1 or not (isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)):
                budget.failure(f"train {size} {name} compile={int(compiled)}", e)
                return None
            batch //= 2
            print(f"  train {size} {name} compile={int(compiled)}: out of memory, retrying at batch {batch}")
        finally:
            free_memory(device)  # after the except block has dropped the failed step's tensors
    return None


def timed_min(fn, device: torch.device, reps: int = 5) -> float:
    """Seconds per call: the fastest of reps synced timings after one untimed. On a GPU a timing covers 10 calls queued
    back to back: a sync around each would add its own tens of microseconds to products of about a hundred."""
    calls = 10 if device.type == "cuda" else 1

    def run():
        for _ in range(calls):
            fn()
    timed(run, device)  # untimed: the first call pays one-time costs
    return min(timed(run, device)[1] for _ in range(reps)) / calls


def probe_ms(device: torch.device) -> float:
    """One fixed product, timed as the step floor's are (milliseconds on either device). main() times it before and
    after each part: on a shared or throttled machine, whose speed can move by more than the ratios it measures (two
    runs on one 2-core VM took 1,242 and 2,424 ms for the same HF step), the spread of these times says so."""
    n, d, dtype = (8192, 8192, torch.bfloat16) if device.type == "cuda" else (2048, 1024, torch.float32)
    x, w = torch.randn(n, d, device=device, dtype=dtype), torch.randn(d, d, device=device, dtype=dtype)
    return timed_min(lambda: x @ w, device) * 1e3


def step_floor_pieces(cfg: lm.ModelConfig, batch: int, device: torch.device) -> dict[str, float]:
    """The step's products, each timed on its own (milliseconds, times the layers that have it): for every weight
    matrix (out, in) and N = batch x seq_len tokens, the forward (N, in) @ (in, out) and the backward's (N, out) @
    (out, in) and (out, N) @ (N, in), each in the faster of its two layouts (the product or its transpose: on a
    2-core Xeon they differed by up to 20 %), into a result made beforehand (the arithmetic alone: a fresh 262 MB
    result is faulted in page by page on a CPU, which an implementation can avoid); and each layer's causal attention
    (SDPA), forward and backward. Any implementation of this model computes them (in bf16 on GPU, as under autocast);
    norms, activations, the loss and the optimizer come on top. bench_train times them in every round and keeps each
    one's fastest, as it keeps each step's: their sum is a floor no step can go under, and HF's time over it bounds
    the ratio ours / HF that any implementation could reach."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    qkv = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    mats = {"qkv_proj": (qkv, cfg.d_model), "o_proj": (cfg.d_model, cfg.n_head * cfg.head_dim),
            "gate_up_proj": (2 * cfg.ffn_hidden, cfg.d_model), "down_proj": (cfg.d_model, cfg.ffn_hidden)}
    mats = {name: (shape, cfg.n_layer) for name, shape in mats.items()}
    mats["lm_head"] = ((cfg.vocab_size, cfg.d_model), 1)
    n, pieces = batch * cfg.seq_len, {}
    for name, ((out_f, in_f), count) in mats.items():
        x, w, g = (torch.randn(*shape, device=device, dtype=dtype) for shape in ((n, in_f), (out_f, in_f), (n, out_f)))
        products = {"forward": ((x, w.t()), (w, x.t())),  # (N, out) or its transpose
                    "grad input": ((g, w), (w.t(), g.t())),  # (N, in)
                    "grad weight": ((g.t(), x), (x.t(), g))}  # (out, in)
        for what, layouts in products.items():
            fns = [functools.partial(torch.mm, a, b, out=torch.empty(len(a), b.size(1), device=device, dtype=dtype))
                   for a, b in layouts]
            pieces[f"{name} {what}"] = count * min(timed_min(fn, device, reps=2) for fn in fns) * 1e3
            del fns
        del x, w, g, products
    q = torch.randn(batch, cfg.n_head, cfg.seq_len, cfg.head_dim, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(batch, cfg.n_kv_head, cfg.seq_len, cfg.head_dim, device=device, dtype=dtype,
                        requires_grad=True) for _ in range(2))
    grad = torch.randn_like(q)  # given, as the step's backward gets it: `.sum().backward()` would add a reduction,
    # an expanded gradient that SDPA copies first, and (from the second call on) the accumulation into q/k/v.grad
    attention = lambda: torch.autograd.grad(F.scaled_dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, enable_gqa=cfg.n_kv_head != cfg.n_head), (q, k, v), grad)
    pieces["attention"] = cfg.n_layer * timed_min(attention, device, reps=2) * 1e3
    del q, k, v, grad
    free_memory(device)
    return pieces


def bench_train(args, device: torch.device, budget: Budget, size: str, fields: dict, batch: int,
                first: bool, progress) -> list[dict]:
    rows, peak = [], lm.peak_bf16_flops(device)
    cfg = lm.ModelConfig(**fields)
    models = dict(zip(("ours", "hf"), model_pair(cfg)))
    # PaLM's count for MFU, forward + backward: 6 x matmul parameters + 12 x n_layer x n_head x head_dim x seq_len
    # FLOPs per token. HF's model has the same shape, hence the same count.
    flops_per_token = models["ours"].flops_per_token()
    ours_optimizer = lm.make_optimizer(models["ours"], LR, WEIGHT_DECAY, device)  # settings for HF's to copy
    if first:  # the run's first variant pays one-time costs (libraries' setup, allocator growth): a throwaway
        fitting_train("ours", size, models["ours"], cfg, batch, False, device, ours_optimizer,
                      argparse.Namespace(**{**vars(args), "warmup": 1, "steps": 1}), budget)
    floors, floor_failed = {}, False  # batch -> {product: its fastest ms}, timed in every round as the steps are
    for compiled in (False, True):
        best = {}
        for _ in range(args.rounds):  # alternating rounds, each model's fastest kept: other load hits both alike
            for name, cpu_model in models.items():
                b = best[name]["batch"] if name in best else batch
                row = fitting_train(name, size, cpu_model, cfg, b, compiled, device, ours_optimizer, args, budget)
                if row and (name not in best or row["ms_step"] < best[name]["ms_step"]):
                    mfu = flops_per_token * row["tok_s"] / peak if peak else None
                    best[name] = {"size": size, **row, "mfu": mfu}
                    progress(rows + list(best.values()))
            for b in {r["batch"] for r in best.values()}:  # (a row's batch may have been halved to fit)
                if not floor_failed and budget.allows(f"step floor {size} batch {b}"):
                    try:
                        pieces = step_floor_pieces(cfg, b, device)
                    except Exception as e:
                        budget.failure(f"step floor {size}", e)
                        floor_failed = True
                        continue
                    kept = floors.setdefault(b, pieces)
                    kept.update({k: min(kept[k], ms) for k, ms in pieces.items()})
        if len(best) == 2:
            best["ours"]["ours/HF"] = best["ours"]["tok_s"] / best["hf"]["tok_s"]
        hf_eager = next((r for r in rows if r["model"] == "hf" and not r["compile"]), None)
        if compiled and "ours" in best and hf_eager:
            best["ours"]["ours/HF_eager"] = best["ours"]["tok_s"] / hf_eager["tok_s"]
        rows += best.values()
        progress(rows)
    for r in rows:
        if r["batch"] in floors:
            r["floor_ms"] = sum(floors[r["batch"]].values())
            if r["model"] == "hf":  # HF's time over the floor: the most any implementation could gain
                r["HF/floor"] = r["batch"] * cfg.seq_len / (r["floor_ms"] / 1e3) / r["tok_s"]
                r["floor_pieces_ms"] = {k: round(ms, 2) for k, ms in floors[r["batch"]].items()}
    progress(rows)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# The trainer end to end: the `train` command itself, with its data loading, per-step sync, logging and MFU


def token_folder(path: str, vocab_size: int, tokens: int) -> None:
    """A data folder as `prep` leaves it, holding random tokens. Its tokenizer.model is a placeholder: `train` only
    hashes that file and copies it beside the checkpoint."""
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", tokens), ("val.bin", tokens // 10 + 1)):
        rng.integers(0, vocab_size, n).astype(lm.token_dtype(vocab_size)).tofile(os.path.join(path, name))
    proto = b"placeholder, never parsed"
    with open(os.path.join(path, "tokenizer.model"), "wb") as f:
        f.write(proto)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"vocab_size": vocab_size, "dtype": np.dtype(lm.token_dtype(vocab_size)).name,
                   "tokenizer_sha256": hashlib.sha256(proto).hexdigest()}, f)


# Levers for the compiled step's elementwise work, the part a GPU profile leaves beside the products (bench/README,
# Results, H200): --levers runs the trainer once more with each, a row each, those not yet measured first (a spent
# time budget skips the rest). name: (--batch_size, --grad_accum_steps, environment), None for the run's own
LEVERS = {"all": (None, 4, {"TORCHINDUCTOR_CUDAGRAPHS": "1"}),  # accum4 and cudagraphs below
          "batch32_accum2": (32, 2, {}),  # the guide's tokens per step in bigger micro-batches, where memory allows
          "accum4": (None, 4, {}),  # the user's guide's 138m command: AdamW and the clipping once per 4 micro-batches
          "cudagraphs": (None, None, {"TORCHINDUCTOR_CUDAGRAPHS": "1"})}  # the forward and backward as CUDA graphs


def bench_trainer(args, device: torch.device, budget: Budget, size: str, fields: dict, batch: int,
                  progress) -> list[dict]:
    """`standalone_transformer_lm.py train` as a user runs it (compiled on a GPU, eager on a CPU), for three log
    windows of --steps steps each; the first compiles, the faster of the other two is kept. Its own log gives
    ms/step, tokens/s and MFU, averaged over a window. It runs first for each size, since the GPU's MFU targets
    rest on it: a spent time budget cuts the comparisons of bare steps instead. It is stopped once its third window is
    logged, before its final save (at 700m, 12 GB written that measure nothing), and when the time budget is spent.
    --deterministic adds a run with `--deterministic 1`, for what bit-identical resumes cost; --levers a run with each
    of LEVERS. A run that fails is listed under `failed`, and the others go on."""
    compiled, rows, accum = int(device.type == "cuda"), [], getattr(args, "grad_accum_steps", 1)
    cfg = lm.ModelConfig(**fields)
    variants = [("ours trainer", 0, batch, accum, {})] + [("ours trainer det", 1, batch, accum, {})] * bool(
        args.deterministic)
    variants += [(f"ours trainer {k}", 0, b or batch, a or accum, env) for k, (b, a, env) in LEVERS.items()
                 if getattr(args, "levers", False)]
    for name, deterministic, batch, accum, env in variants:
        if not budget.allows(f"{name} {size} compile={compiled}"):
            break
        with tempfile.TemporaryDirectory() as tmp:
            data, out = os.path.join(tmp, "data"), os.path.join(tmp, "run")
            os.makedirs(data)
            token_folder(data, cfg.vocab_size, (3 * args.steps * batch * accum + 1) * (cfg.seq_len + 1))
            arch = [str(a) for k in ("n_layer", "n_head", "d_model", "ffn_mult", "seq_len")
                    for a in (f"--{k}", getattr(cfg, k))]
            cmd = [sys.executable, lm.__file__, "train", "--data_dir", data, "--out_dir", out, "--batch_size",
                   str(batch), "--grad_accum_steps", str(accum), "--max_steps", str(3 * args.steps), "--log_interval",
                   str(args.steps), "--warmup_steps", "1", "--eval_interval", str(10**9), "--eval_iters", "1",
                   "--save_interval", str(10**9), "--compile", str(compiled), "--deterministic", str(deterministic),
                   *arch]
            t0, metrics = time.perf_counter(), os.path.join(out, "metrics.jsonl")
            with tempfile.TemporaryFile("w+") as output:
                proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, **env})
                try:
                    while proc.poll() is None and len(logged(metrics)) < 3 and time.perf_counter() < budget.end:
                        time.sleep(0.2)
                finally:
                    proc.kill()
                    proc.wait()
                wall, logs = time.perf_counter() - t0, logged(metrics)
                if len(logs) < 3:
                    output.seek(0)
                    text = output.read()
                    print(text[-3000:])
                    spent = ", --time_budget spent" if time.perf_counter() >= budget.end else ""
                    budget.failure(f"{name} {size} compile={compiled}", RuntimeError(
                        f"train stopped after {len(logs)} of 3 log windows (status {proc.returncode}{spent}): "
                        f"{(text.strip().splitlines() or [''])[-1]}"))
                    continue
        best = min((r for r in logs if r["step"] > args.steps), key=lambda r: r["ms_per_step"])
        rows.append({"size": size, "model": name, "compile": compiled, "batch": batch, "accum": accum,
                     **({"env": env} if env else {}), "ms_step": best["ms_per_step"], "tok_s": best["tokens_per_s"],
                     "mfu": best.get("mfu"), "wall_s": wall, "loss_last": best["loss"],
                     "losses": [r["loss"] for r in logs]})
        progress(rows)
    return rows


def logged(metrics_path: str) -> list[dict]:
    """The lines of a metrics.jsonl written so far (a line still being written is left out)."""
    with contextlib.suppress(FileNotFoundError), open(metrics_path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]
    return []


def trainer_over_step(results: dict) -> None:
    """`trainer/step`: the train table's bare step, at its median (its fastest would flatter it on a busy CPU, where
    steps vary by 2x), over the trainer's step at the same size, batch and compile setting (without accumulation: a
    step of 4 micro-batches is not one bare step). `hf_eager/trainer`: HF's eager step (its fastest, as the train
    table's ratios take it) over the trainer's, at the same size and batch: the trainer against a user's own loop."""
    for row in results.get("trainer", []):
        if row.get("accum", 1) != 1 or row.get("env"):  # (a lever's run: the bare step runs without it)
            continue
        step, hf = (next((r for r in results.get("train", []) if r["model"] == model and r["compile"] == compiled and
                          all(r[k] == row[k] for k in ("size", "batch"))), None)
                    for model, compiled in (("ours", row["compile"]), ("hf", 0)))
        if step:
            row["trainer/step"] = float(np.median(step["step_ms_all"])) / row["ms_step"]
        if hf:
            row["hf_eager/trainer"] = hf["ms_step"] / row["ms_step"]


# ----------------------------------------------------------------------------------------------------------------------
# Decoding at batch 1 and 16 (--num_samples): ours eager and compiled, HF generate


def time_generate(ours, hf, step, prompt: list[int], batch: int, size: str, device: torch.device, args,
                  sampled: bool, budget: Budget) -> list[dict]:
    prompt_t = torch.tensor([prompt] * batch, device=device)
    # Greedy, or sampling with the CLI's defaults (temperature 0.8, top_k 200), given to HF's generate as well.
    ours_kw = dict(temperature=0.8, top_k=200, seed=0) if sampled else dict(temperature=0.0)
    hf_kw = dict(do_sample=True, temperature=0.8, top_k=200, top_p=1.0) if sampled else dict(do_sample=False)

    def run_ours(decode_step=None):
        return lm.generate(ours, prompt, args.new_tokens, eos_id=None, decode_step=decode_step, num_samples=batch,
                           **ours_kw)[0]

    def run_hf():
        out = hf.generate(prompt_t, attention_mask=torch.ones_like(prompt_t), max_new_tokens=args.new_tokens,
                          min_new_tokens=args.new_tokens, **hf_kw)
        return out[0, len(prompt):].tolist()

    variants = {("ours", 0): run_ours}
    if step is not None:  # None once its compile failed
        variants[("ours", 1)] = lambda: run_ours(step)
    variants[("hf", 0)] = run_hf
    first, extra, tokens, graphs_skipped = {}, {}, {}, {}
    for key, fn in list(variants.items()):
        if key[0] == "ours":  # a fresh KV cache, so that each of ours' rows counts its own
            for block in ours.layers:
                block.self_attn.cache = None
        try:
            use_allocator(key[0], args, device)
            skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
            with PeakMemory(device) as mem:  # KV cache and activations, beyond the weights
                t0 = time.perf_counter()
                tokens[key] = fn()  # warm-up: compiles and records the CUDA graphs on its first decode steps
                first[key] = time.perf_counter() - t0
            extra[key] = mem.mib
            # inductor only logs when it runs a step without CUDA graphs: the row says so
            graphs_skipped[key] = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - skips
        except Exception as e:
            budget.failure(f"generate {size} {'sampled' if sampled else 'greedy'} batch {batch} {key[0]} "
                           f"compile={key[1]}", e)
            del variants[key]
    times = {key: [] for key in variants}
    for _ in range(args.gen_reps):  # interleaved: other load on the machine slows every variant alike
        for key, fn in variants.items():
            use_allocator(key[0], args, device)
            times[key].append(timed(fn, device)[1])
    rows, ref = [], next(iter(tokens.values()), [])  # ours eager's tokens, when it ran
    for (name, compiled), toks in tokens.items():
        same = next((f"differs at {i}" for i, (a, b) in enumerate(zip(ref, toks)) if a != b),
                    "same" if len(ref) == len(toks) else f"{len(toks)} vs {len(ref)} tokens")
        dt = min(times[(name, compiled)])
        rows.append({"size": size, "decoding": "sampled" if sampled else "greedy", "model": name,
                     "compile": compiled, "batch": batch, "new_tokens": len(toks),
                     "tok_s": batch * len(toks) / dt, "ms_step": dt * 1e3 / len(toks),
                     "first_call_s": first[(name, compiled)], "extra_MiB": extra[(name, compiled)],
                     "tokens_vs_ours": None if sampled and name == "hf" else same})
        if device.type == "cuda" and compiled and not sampled:  # counted when a graph compiles: the greedy rows'
            rows[-1]["cudagraph_skips"] = graphs_skipped[(name, compiled)]  # 0, or the step runs without them
    hf_row = next((r for r in rows if r["model"] == "hf"), None)
    for r in rows:
        if r["model"] == "ours" and hf_row:
            r["ours/HF"] = r["tok_s"] / hf_row["tok_s"]
    return rows


def bench_generate(args, device: torch.device, budget: Budget, size: str, fields: dict, progress) -> list[dict]:
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as `generate` loads checkpoints
    cfg = lm.ModelConfig(**fields)
    ours, hf = model_pair(cfg, dtype)
    ours, hf = lm.for_sampling(ours, device, dtype), hf.to(device).eval()  # ours as `generate` loads it
    hf.generation_config.eos_token_id = None  # ours runs with eos_id=None: both emit exactly new_tokens tokens
    # as many as the context holds (ours stops there; HF's would decode on past it)
    args = argparse.Namespace(**{**vars(args), "new_tokens": min(args.new_tokens, cfg.seq_len - args.prompt_tokens)})
    gen = torch.Generator().manual_seed(2)
    prompt = [lm.BOS_ID] + torch.randint(4, cfg.vocab_size, (args.prompt_tokens - 1,), generator=gen).tolist()

    # The decode step compiled as `generate --compile 1` does it: on GPUs with CUDA graphs, which replay the
    # whole step with no per-kernel launch cost.
    step = torch.compile(ours, fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else None)
    for sampled in (False, True):
        for batch in args.gen_batch:  # batch b: `generate --num_samples b`, and HF's generate on b copies
            if not budget.allows(f"generate {size} {'sampled' if sampled else 'greedy'} batch {batch}"):
                continue
            new = time_generate(ours, hf, step, prompt, batch, size, device, args, sampled, budget)
            if step is not None and not any(r["model"] == "ours" and r["compile"] for r in new):  # compile failed:
                step = None  # once is enough (dynamo does not remember a failure, and would spend minutes on it again)
            rows += new
            progress(rows)
    del ours, hf, step
    free_memory(device)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def check_targets(results: dict, device: torch.device) -> list[dict]:
    """The issue's targets for the sizes this run measured: value, target, met or not ("not run" where a part or a
    variant was skipped). For CPU training, `bound` is HF eager's step over the step floor (the step's products
    alone): no implementation of those products can beat HF by more."""
    train = {(r["size"], r["model"], r["compile"]): r for r in results.get("train", [])}
    trainer = {r["size"]: r for r in results.get("trainer", []) if r["model"] == "ours trainer"}
    decode = {(r["size"], r["batch"], r["compile"]): r for r in results.get("generate", [])
              if r["model"] == "ours" and r["decoding"] == "greedy"}
    rows = []  # (target, measured or None, wanted, bound)
    if device.type == "cpu":
        if results.get("prep"):
            rows.append(("prep tokens/s, all cores, 32K BPE", results["prep"][-1]["encode_tok_s"], 1.8e6, None))
        bound = train.get(("quick", "hf", 0), {}).get("HF/floor")
        rows.append(("train ours eager / HF eager", train.get(("quick", "ours", 0), {}).get("ours/HF"), 1.3, bound))
        rows.append(("train ours compiled / HF eager", train.get(("quick", "ours", 1), {}).get("ours/HF_eager"), 1.7,
                     bound))
        rows += [(f"decode batch {b}, ours eager / HF", r.get("ours/HF"), 1.3, None)
                 for (_, b, compiled), r in decode.items() if not compiled]
    else:
        for size, wanted in (("138m", 0.45), ("350m", 0.50), ("700m", 0.50)):
            if size in results["sizes"]:
                rows.append((f"{size} MFU, trainer end to end", trainer.get(size, {}).get("mfu"), wanted, None))
        if "138m" in results["sizes"]:
            ours = train.get(("138m", "ours", 1), {})
            rows.append(("138m train ours compiled / HF eager", ours.get("ours/HF_eager"), 1.6, None))
            rows.append(("138m train ours compiled / HF compiled", ours.get("ours/HF"), 1.15, None))
        rows += [(f"{size} decode batch 1, ours compiled / HF", r.get("ours/HF"), 5.0, None)
                 for (size, b, compiled), r in decode.items() if b == 1 and compiled]
    probes = results.get("env", {}).get("probe_ms") or [1.0]
    unsteady = " (machine speed moved)" if max(probes) / min(probes) - 1 > 0.1 else ""  # see main()'s warning
    return [{"target": k, "measured": v, "wanted": wanted, "bound": bound,
             "met": "not run" if v is None else ("yes" if v >= wanted else "NO") + unsteady}
            for k, v, wanted, bound in rows]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help="comma-separated parts: prep, train, trainer, generate (default: all four for the "
                                  "quick size; all but prep for presets)")
    p.add_argument("--size", help="quick, presets (= 138m,350m,700m), or comma-separated sizes (default: presets on a "
                                  "GPU, quick on a CPU)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"), help="folder for the JSON results "
                                                                               "(default bench/results)")
    p.add_argument("--vocab_size", type=int, help="vocabulary of the model sizes (default 32000; tiny 512)")
    p.add_argument("--prep_mb", type=int, default=1024, help="synthetic prep corpus size (default 1024)")
    p.add_argument("--cache_dir", default=CACHE_DIR, help="where the synthetic corpus is kept between runs")
    p.add_argument("--batch", type=int, help="training batch of the train and trainer parts (default: the size's, 16 "
                                             "for the presets, 8 for quick)")
    p.add_argument("--grad_accum_steps", type=int, default=1, help="the trainer part's --grad_accum_steps (default 1; "
                   "the user's guide trains 138m with 4)")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps, the first compiles (default 3)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    p.add_argument("--queued_steps", type=int, help="training steps also timed back to back without a sync between "
                   "them, for the per-step sync's cost (default: --steps on a GPU, none on a CPU)")
    p.add_argument("--rounds", type=int, help="alternating timing rounds of ours and HF's training step, the "
                                              "fastest kept (default: 2 on CPU, 1 on GPU)")
    p.add_argument("--allocator", default="as_run", choices=["as_run", "kept", "default"],
                   help="CPU: glibc's handling of freed memory in the train and generate parts. as_run: ours keeps it "
                        "as `train` and `generate` do, HF's runs with glibc's defaults as a user's own loop does; "
                        "kept: both keep it; default: glibc's settings as the process started (default as_run)")
    p.add_argument("--deterministic", action="store_true", help="also run the trainer with --deterministic 1")
    p.add_argument("--levers", action="store_true", help="also run the trainer with each lever for the compiled "
                   "step's elementwise work: --grad_accum_steps 4, inductor's CUDA graphs, both; and --batch_size 32 "
                   "--grad_accum_steps 2")
    p.add_argument("--gen_reps", type=int, help="timed generate calls, the fastest kept (default 5; 3 for presets: "
                                                "a GPU varies little, and HF's eager decoding takes seconds a call)")
    p.add_argument("--prompt_tokens", type=int, default=16, help="prompt length for generate (default 16)")
    p.add_argument("--new_tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--gen_batch", default="1,16", help="decode batch sizes, comma-separated (default 1,16)")
    p.add_argument("--time_budget", type=float, help="seconds; variants not started by then are skipped (default: "
                                                     "420 for presets: a variant started just before may compile for "
                                                     "2 minutes more, and a GPU run still ends within 10; none "
                                                     "for quick)")
    p.add_argument("--prep_child", nargs=3, metavar=("TEXT", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # SIGTERM (a scheduler, `timeout`) as Ctrl-C: the `finally` blocks stop the child processes, or a killed benchmark
    # would leave a training run holding the GPU and gigabytes of temporary files
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.prep_child:
        text, out, workers = args.prep_child
        return prep_child(text, out, int(workers))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.size = args.size or ("presets" if device.type == "cuda" else "quick")
    sizes = ["138m", "350m", "700m"] if args.size == "presets" else [s.strip() for s in args.size.split(",")]
    if not set(sizes) <= set(SIZES):
        p.error(f"--size: unknown sizes {sorted(set(sizes) - set(SIZES))}; choose from presets, {', '.join(SIZES)}")
    presets = "quick" not in sizes
    parts = [s.strip() for s in (args.only or ("train,trainer,generate" if presets else
                                               "prep,train,trainer,generate")).split(",")]
    unknown = set(parts) - {"prep", "train", "trainer", "generate"}
    if unknown:
        p.error(f"--only: unknown parts {sorted(unknown)}; choose from prep, train, trainer, generate")
    args.rounds = args.rounds or (1 if device.type == "cuda" else 2)
    if args.gen_reps is None:
        args.gen_reps = 3 if presets else 5
    try:
        args.gen_batch = [int(b) for b in args.gen_batch.split(",")]
    except ValueError:
        p.error(f"--gen_batch: expected comma-separated integers, got {args.gen_batch!r}")
    if min(args.warmup, args.steps, args.rounds, args.gen_reps, args.prompt_tokens, args.new_tokens,
           *args.gen_batch, args.batch or 1, args.grad_accum_steps) < 1:
        p.error("--warmup, --steps, --rounds, --gen_reps, --prompt_tokens, --new_tokens, --gen_batch, --batch and "
                "--grad_accum_steps must be at least 1")
    if args.vocab_size is not None and args.vocab_size < lm.MIN_VOCAB:
        p.error(f"--vocab_size must be at least {lm.MIN_VOCAB}, as for prep")
    budget = Budget(args.time_budget if args.time_budget is not None else 420 if presets else 0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the trainer sets
    env = environment(device)
    print(" | ".join(f"{k} {v}" for k, v in env.items()))
    kept = {k: v for k, v in vars(args).items() if k not in ("prep_child", "out", "cache_dir")}  # no local paths
    results = {"env": env, "sizes": sizes, "args": kept, "skipped": budget.skipped, "failed": budget.failed,
               "notes": ["generate: tok_s counts every sample's new tokens and includes the prefill; ms_step is "
                         "per decode step of the whole batch",
                         "train/generate peak memory: above what was in use before the variant (CPU: resident set)"]}
    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    tag = f"-vocab{args.vocab_size}" if args.vocab_size else ""  # what differs from the size's defaults
    tag += f"-{args.allocator}" if device.type == "cpu" and args.allocator != "as_run" else ""
    tag += (f"-batch{args.batch}" if args.batch else "") + (f"-accum{args.grad_accum_steps}"
                                                            if args.grad_accum_steps != 1 else "")
    tag += ("-det" if args.deterministic else "") + ("-levers" if args.levers else "")
    path = os.path.join(args.out, f"{slug}-{'-'.join(sizes)}{tag}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    t_start = time.perf_counter()

    def save() -> None:  # after every variant: a run cut short by a time limit or a crash keeps what it measured
        env["load_avg_at_end"], env["wall_s"] = os.getloadavg(), round(time.perf_counter() - t_start, 1)
        trainer_over_step(results)
        if (device.type == "cpu") == ("quick" in sizes):  # the issue sets targets for quick on CPUs, presets on GPUs
            results["targets"] = check_targets(results, device)
        lm.atomic_write_json(path, results)

    def progress(part: str):
        earlier = list(results.get(part, []))  # other sizes' rows

        def update(rows: list[dict]) -> None:
            results[part] = earlier + list(rows)
            if rows:
                print_table(f"{part} (so far)", rows, columns(rows))
            save()
        return update

    env["probe_ms"] = [probe_ms(device)]  # the machine's speed, again after each part
    if "prep" in parts:
        results["prep"] = bench_prep(args)
        env["probe_ms"].append(probe_ms(device))
        save()
    for i, size in enumerate(sizes):  # size by size: a spent budget cuts the largest
        fields, batch = SIZES[size]
        batch = args.batch or batch
        fields = dict(fields, vocab_size=args.vocab_size or fields["vocab_size"])
        # The parts that the GPU targets of every size rest on (end-to-end MFU, decoding) before the comparison of
        # bare training steps, whose targets are set for 138m alone: a spent time budget cuts that last.
        benches = {"trainer": lambda: bench_trainer(args, device, budget, size, fields, batch, progress("trainer")),
                   "generate": lambda: bench_generate(args, device, budget, size, fields, progress("generate")),
                   "train": lambda: bench_train(args, device, budget, size, fields, batch, i == 0, progress("train"))}
        for part, bench in benches.items():
            if part in parts:
                try:
                    bench()
                except Exception as e:
                    budget.failure(f"{part} {size}", e)
                free_memory(device)  # here, not in `except`: the exception's traceback holds the part's models
                env["probe_ms"].append(probe_ms(device))
                save()

    print(f"\n{env['device']}, {env['cpu_count']} CPUs, torch {env['torch']}, transformers {env['transformers']}, "
          f"{env['date']}, {env['wall_s']} s, load average {env['load_avg_at_start'][0]:.1f} at start, "
          f"{env['load_avg_at_end'][0]:.1f} at end")
    for part in ("prep", "train", "trainer", "generate"):
        if results.get(part):
            print_table(part, results[part], columns(results[part]))
    probes = env["probe_ms"]
    env["probe_spread"] = max(probes) / min(probes) - 1
    print(f"\nmachine speed: a fixed product took {min(probes):#.3g} to {max(probes):#.3g} ms before and after the "
          f"parts ({env['probe_spread']:.0%} apart)")
    if env["probe_spread"] > 0.1:
        print(f"warning: the machine's speed moved by {env['probe_spread']:.0%} during the run (other work on it, or "
              f"throttling), more than the ratios can be trusted to; rerun on a quiet machine")
    if results["skipped"]:
        print(f"\nskipped (time budget): {', '.join(results['skipped'])}")
    if results["failed"]:
        print("\nfailed:\n  " + "\n  ".join(results["failed"]))
    save()
    if "targets" in results:
        print_table("targets (2-core CPU, float32)" if device.type == "cpu" else "targets (one H100, bf16)",
                    results["targets"], ["target", "measured", "wanted", "bound", "met"])
    print(f"\nwrote {os.path.relpath(path)}")
    if results["failed"]:  # the figures of the others are written; gpu_check.sh's exit status says so
        sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the JSON holds every variant finished before it
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
