"""Where a training step of ours spends its time: torch.profiler over a few steps, one table of operators and kernels.

    python bench/profile_step.py --size 138m --out RESULTS      # GPU: compiled, bf16 autocast, as the trainer runs
    python bench/profile_step.py --size quick --compile 0       # CPU: the quick size, eager float32

The step is the benchmark's (forward, loss, backward, gradient clipping, fused AdamW, on random tokens), so the table
explains its ms_step. Writes OUT/profile-<size>-compile<0|1>.txt: the environment, the profiled steps' times, the
time by kind (matrix products, attention, the optimizer, the rest) and the top operators by self time on the device.
"""

import argparse
import contextlib
import os
import sys

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark as bench  # noqa: E402  (beside this file)

lm = bench.lm
# Operator and kernel names by kind, first match wins (ATen's names on a CPU; cuBLAS/CUTLASS, flash and Triton on CUDA)
KINDS = (("attention", ("attention", "flash", "fmha", "sdpa")),
         ("matrix products", ("aten::mm", "addmm", "aten::bmm", "gemm", "cutlass", "xmma", "nvjet", "tem_fused")),
         ("optimizer", ("adam", "foreach", "multi_tensor", "vector_norm", "lpnorm")))


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, needles in KINDS if any(n in low for n in needles)), "the rest")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default=None, help="a benchmark size (default: 138m on a GPU, quick on a CPU)")
    p.add_argument("--compile", type=int, choices=[0, 1], default=None, help="default: 1 on a GPU, 0 on a CPU")
    p.add_argument("--steps", type=int, default=3, help="profiled steps, after 3 unprofiled ones (the first compiles)")
    p.add_argument("--rows", type=int, default=40, help="operators in the table")
    p.add_argument("--out", default=os.path.join(bench.ROOT, "bench", "results"), help="folder for the table")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    size = args.size or ("138m" if cuda else "quick")
    if size not in bench.SIZES:
        p.error(f"--size: choose from {', '.join(bench.SIZES)}")
    compiled = bool(cuda if args.compile is None else args.compile)
    fields, batch = bench.SIZES[size]
    cfg = lm.ModelConfig(**fields)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the trainer sets
    lm.settle_cpu(device)  # as the trainer: on a CPU, freed memory kept, not faulted in again at every step
    torch.manual_seed(0)
    raw = lm.Transformer(cfg).to(device)
    optimizer = lm.make_optimizer(raw, bench.LR, bench.WEIGHT_DECAY, device)
    model = torch.compile(raw) if compiled else raw
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    xy = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), device=device)
    x, y = xy[:, :-1], xy[:, 1:]

    def step():
        bench.train_step(model, raw, optimizer, ctx, x, y)

    for _ in range(3):
        step()
    bench.sync(device)
    times = []
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            times.append(bench.timed(step, device)[1] * 1e3)
    events = prof.key_averages()
    # On a GPU the kernels (an operator's row repeats its kernels' time, and its CPU time is their launch); on a CPU
    # each operator's own time
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    top = sorted((e for e in events if getattr(e, attr) > 0 and (not cuda or e.device_type == DeviceType.CUDA)),
                 key=lambda e: -getattr(e, attr))
    total = sum(getattr(e, attr) for e in top) / 1e3 / args.steps
    by_kind = {}
    for e in top:
        by_kind[kind(e.key)] = by_kind.get(kind(e.key), 0.0) + getattr(e, attr) / 1e3 / args.steps
    env = bench.environment(device)
    lines = [" | ".join(f"{k} {v}" for k, v in env.items()),
             f"size {size} ({cfg.n_layer} layers, d_model {cfg.d_model}, seq {cfg.seq_len}, vocab {cfg.vocab_size}), "
             f"batch {batch}, compile {int(compiled)}, {'bf16 autocast' if cuda else 'float32'}",
             f"profiled steps (ms, with the profiler on): {', '.join(f'{t:.1f}' for t in times)}",
             f"{'device' if cuda else 'CPU'} time per step: {total:.1f} ms: " + ", ".join(
                 f"{k} {ms:.1f} ({ms / total:.0%})" for k, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])),
             "", f"{'ms/step':>9}  {'share':>6}  {'calls/step':>10}  name"]
    for e in top[:args.rows]:
        ms = getattr(e, attr) / 1e3 / args.steps
        lines.append(f"{ms:9.2f}  {ms / total:6.1%}  {e.count / args.steps:10.1f}  {e.key[:150]}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"profile-{size}-compile{int(compiled)}.txt")
    lm.atomic_write(path, lambda f: f.write(text.encode()))
    print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
