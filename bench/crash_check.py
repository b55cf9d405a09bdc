"""Kill a training run at random moments, resume it after each kill, and compare it with a run never interrupted.

    python bench/crash_check.py                                  # one process on this machine's device, 8 kills
    python bench/crash_check.py --nproc 2 --out /shared/x/check  # torchrun, 2 processes, on the filesystem to check
    python bench/crash_check.py --device cuda --compile 1        # a GPU, compiled

What `train` promises: a kill (SIGKILL of every process, as a crash, the out-of-memory killer or a lost node leaves
it) loses at most the steps since the last save, and the resumed run is the run it would have been. This trains a
small model (the tiny preset, a save every 3 steps, dropout on so that the RNG states matter, --deterministic 1 so
that two runs can agree bit for bit) once without a break and once killed --kills times, each time when a random
step has been logged and a random moment later (inside the next step or a save), then resumed with the same command.
It then compares the two: weights, AdamW state, gradient scaler, every process's RNG state, the best checkpoint,
every metrics row (its timings aside), and that no temporary file is left behind. Exit status 0 when all agree.
On Linux (the processes are found through /proc: torchrun starts its workers in sessions of their own).
"""

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "standalone_transformer_lm.py")
sys.path.insert(0, ROOT)
import standalone_transformer_lm as lm  # noqa: E402  (the script beside this folder)

SAVE_INTERVAL = 3
TIMINGS = ("ms_per_step", "tokens_per_s", "mfu")  # differ between any two runs
MARK = ".crash_check"  # in --out: a folder this script made, whose two run folders it may delete


def train_command(args, out_dir: str) -> list[str]:
    train = [SCRIPT, "train", "--out_dir", out_dir, "--data_dir", args.data_dir, "--preset", "tiny",
             "--batch_size", "4", "--grad_accum_steps", "2", "--max_steps", str(args.max_steps),
             "--warmup_steps", "5", "--lr", "3e-3", "--dropout", "0.1", "--save_interval", str(SAVE_INTERVAL),
             "--eval_interval", "7", "--eval_iters", "2", "--log_interval", "1", "--deterministic", "1",
             "--compile", str(args.compile), "--device", args.device]
    if args.nproc > 1:  # --standalone: a free port on this machine
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                *train]
    return [sys.executable, *train]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process and all its descendants, the deepest first, as a crash of the machine would end them."""
    tree = [proc.pid]
    for pid in tree:  # grows while it is read: children, then theirs
        for entry in os.listdir("/proc"):
            with contextlib.suppress(OSError, ValueError, IndexError):  # a process that just ended
                if entry.isdigit() and int(entry) not in tree:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the name: ppid
                            tree.append(int(entry))
    for pid in reversed(tree):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def logged_rows(out_dir: str) -> list[dict]:
    rows = []
    with contextlib.suppress(FileNotFoundError), open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            with contextlib.suppress(ValueError, KeyError):  # a line being written
                rows.append({k: v for k, v in json.loads(line).items() if k not in TIMINGS})
    return rows


def last_logged(out_dir: str) -> int:
    return max((row["step"] for row in logged_rows(out_dir)), default=0)


def last_line(path: str) -> str:
    with open(path, errors="replace") as f:
        return next((line.strip() for line in reversed(f.readlines()) if line.strip()), "no output")


def saved_step(out_dir: str) -> int:
    path = os.path.join(out_dir, "ckpt_last.pt")
    return torch.load(path, map_location="cpu", weights_only=True)["step"] if os.path.exists(path) else 0


def tensors_differ(a, b, where: str) -> list[str]:
    """Names of the tensors (in nested dicts and lists) that are not bit-identical, and of other values that differ."""
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()):
            return [where]
        return [d for k in a for d in tensors_differ(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) or isinstance(b, list):
        if not (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)):
            return [where]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in tensors_differ(x, y, f"{where}[{i}]")]
    if torch.is_tensor(a) or torch.is_tensor(b):
        return [] if torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b) else [where]
    return [] if a == b else [where]


def compare(full: str, killed: str) -> list[str]:
    """What differs between the uninterrupted run's folder and the killed one's; empty when they agree."""
    load = {name: [torch.load(os.path.join(d, name), map_location="cpu", weights_only=True) for d in (full, killed)]
            for name in ("ckpt_last.pt", "ckpt_best.pt")}
    a, b = load["ckpt_last.pt"]
    problems = tensors_differ({k: a[k] for k in ("step", "model", "optimizer", "scaler", "rng", "best_val_loss")},
                              {k: b[k] for k in ("step", "model", "optimizer", "scaler", "rng", "best_val_loss")},
                              "ckpt_last.pt")
    a, b = load["ckpt_best.pt"]
    problems += tensors_differ({k: a[k] for k in ("step", "model")}, {k: b[k] for k in ("step", "model")},
                               "ckpt_best.pt")
    rows_a, rows_b = logged_rows(full), logged_rows(killed)
    if rows_a != rows_b:
        first = next((i for i, (x, y) in enumerate(zip(rows_a, rows_b)) if x != y), min(len(rows_a), len(rows_b)))
        problems.append(f"metrics.jsonl from row {first + 1} ({len(rows_a)} rows uninterrupted, {len(rows_b)} "
                        f"killed and resumed)")
    problems += [f"{name} left behind" for name in os.listdir(killed) if re.fullmatch(r"\..+\.tmp\d+", name)]
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/crash_check", help="the two runs go to OUT/full and OUT/killed")
    p.add_argument("--data_dir", help="a folder that prep wrote (default: the demo's corpus, prepped into OUT/data)")
    p.add_argument("--kills", type=int, default=8)
    p.add_argument("--max_steps", type=int, default=120)
    p.add_argument("--nproc", type=int, default=1, help="processes; more than 1 runs under torchrun")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", type=int, default=0, choices=[0, 1])
    p.add_argument("--seed", type=int, default=0, help="picks the moments of the kills")
    args = p.parse_args(argv)
    if not os.path.isdir("/proc"):
        p.error("this check finds the processes to kill through /proc (Linux)")
    if args.kills < 0 or args.max_steps < 2 * SAVE_INTERVAL or args.nproc < 1:
        p.error(f"--kills must be 0 or more, --max_steps at least {2 * SAVE_INTERVAL}, --nproc at least 1")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file: pass a folder")
    if os.path.exists(args.out) and os.listdir(args.out) and not os.path.exists(os.path.join(args.out, MARK)):
        p.error(f"--out {args.out} holds files that this check did not write: pass a new folder")
    os.makedirs(args.out, exist_ok=True)
    open(os.path.join(args.out, MARK), "w").close()
    if args.data_dir is None:
        args.data_dir = os.path.join(args.out, "data")
        if not os.path.exists(os.path.join(args.data_dir, "meta.json")):
            import pydoc_data.topics  # the demo's corpus: one topic per line
            corpus = os.path.join(args.out, "corpus.txt")
            with open(corpus, "w", encoding="utf-8") as f:
                f.write("\n".join(" ".join(t.split()) for _, t in sorted(pydoc_data.topics.topics.items())) + "\n")
            lm.prep(corpus, args.data_dir, vocab_size=1000, val_fraction=0.05, progress=False)
    full, killed = os.path.join(args.out, "full"), os.path.join(args.out, "killed")
    for folder in (full, killed):
        shutil.rmtree(folder, ignore_errors=True)

    with open(os.path.join(args.out, "full.log"), "w") as log:
        if subprocess.run(train_command(args, full), stdout=log, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"the uninterrupted run failed: {last_line(log.name)} (all of it in {log.name})")
    with open(os.path.join(full, "metrics.jsonl")) as f:
        step_s = statistics.median(json.loads(line)["ms_per_step"] for line in f) / 1000
    print(f"uninterrupted run: {args.max_steps} steps, {step_s * 1000:.0f} ms a step", flush=True)
    rng, kills = random.Random(args.seed), []
    with open(os.path.join(args.out, "killed.log"), "w") as log:
        while True:
            start = saved_step(killed)
            proc = subprocess.Popen(train_command(args, killed), stdout=log, stderr=subprocess.STDOUT)
            target = None
            if len(kills) < args.kills and start + 1 < args.max_steps:  # the kills spread over the steps left
                target = start + rng.randint(1, max(1, (args.max_steps - 1 - start) // (args.kills - len(kills))))
            while proc.poll() is None and (target is None or last_logged(killed) < target):
                time.sleep(0.005)
            if proc.poll() is not None:
                break
            time.sleep(rng.uniform(0, 2 * step_s))  # into the next step, or the save of this one
            if proc.poll() is not None:
                break
            kill_tree(proc)
            logged = last_logged(killed)
            kills.append((logged, saved_step(killed)))
            print(f"kill {len(kills)}: after step {logged} was logged; ckpt_last.pt holds step {kills[-1][1]}",
                  flush=True)
    if proc.returncode:
        sys.exit(f"a resumed run failed with exit status {proc.returncode}: {last_line(log.name)} (all of it in "
                 f"{log.name})")

    print(f"\n{len(kills)} kills of `train` ({args.nproc} process(es), device {args.device}, compile {args.compile}, "
          f"a save every {SAVE_INTERVAL} steps), each resumed, against one uninterrupted run of {args.max_steps} steps")
    print(" kill  logged step  resumed from  steps lost")
    for i, (logged, resumed) in enumerate(kills, 1):
        print(f"{i:5d}  {logged:11d}  {resumed:12d}  {logged - resumed:10d}")
    problems = compare(full, killed)
    lost = [logged - resumed for logged, resumed in kills]
    if max(lost, default=0) > SAVE_INTERVAL:
        problems.append(f"a kill lost {max(lost)} logged steps, more than the {SAVE_INTERVAL} since a save")
    print("the same as the uninterrupted run (weights, AdamW, scaler, RNG states, best checkpoint, "
          f"{len(logged_rows(full))} metrics rows), no temporary file left: " + ("yes" if not problems else "NO"))
    for problem in problems[:10]:
        print(f"  - {problem}")
    if len(problems) > 10:
        print(f"  and {len(problems) - 10} more")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
