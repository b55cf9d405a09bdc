import json
import math
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT

BENCH = os.path.join(ROOT, "bench", "benchmark.py")


def test_benchmark_runs_every_gpu_part_and_compares_like_with_like(tmp_path):
    """The benchmark at its tiny size, as the GPU command runs it at the presets: every variant runs and nothing
    fails, so it still works the day a GPU is at hand; and HF's model, holding our weights, computes what ours does
    (the same first loss, eager and compiled, and the same greedy tokens), so its timings compare like with like."""
    proc = subprocess.run([sys.executable, BENCH, "--size", "tiny", "--steps", "2", "--warmup", "1", "--rounds", "1",
                           "--gen_reps", "1", "--new_tokens", "8", "--deterministic", "--time_budget", "0",
                           "--queued_steps", "2", "--vocab_size", "300", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200)  # 20 minutes: compiles from a cold cache
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [path] = tmp_path.glob("*-tiny-vocab300-*.json")
    results = json.loads(path.read_text())
    assert results["failed"] == [] and results["skipped"] == []
    probes = results["env"]["probe_ms"]  # the machine's speed: at the start and after each of the three parts
    assert len(probes) == 4 and min(probes) > 0 and results["env"]["probe_spread"] == max(probes) / min(probes) - 1
    assert f"({results['env']['probe_spread']:.0%} apart)" in proc.stdout
    train = {(r["model"], r["compile"]): r for r in results["train"]}
    assert sorted(train) == [("hf", 0), ("hf", 1), ("ours", 0), ("ours", 1)]
    assert abs(train[("ours", 0)]["loss0"] - math.log(300)) < 0.1  # the vocabulary asked for, not tiny's 512
    assert all(abs(r["loss0"] - train[("ours", 0)]["loss0"]) < 1e-5 for r in train.values())
    assert all(abs(r["loss_last"] - train[("ours", 0)]["loss_last"]) < 1e-3 for r in train.values())  # 3 AdamW steps
    assert all(-1 < r["sync_cost"] < 10 for r in train.values())  # the same steps queued without syncs, timed too
    floor = train[("hf", 0)]["floor_pieces_ms"]  # 3 products of each of 5 matrices, and attention; 1 floor per batch
    assert len(floor) == 16 and min(floor.values()) > 0
    assert all(abs(r["floor_ms"] - sum(floor.values())) < 0.1 for r in train.values())  # (the parts are rounded)
    trainer, deterministic = results["trainer"]
    assert trainer["tok_s"] > 0 and trainer["trainer/step"] > 0
    assert deterministic["model"] == "ours trainer det" and deterministic["losses"] == trainer["losses"]  # eager
    assert trainer["loss_last"] < train[("ours", 0)]["loss0"] + 0.5  # random tokens: it stays near log(vocab)
    decode = {(r["decoding"], r["batch"], r["model"], r["compile"]): r for r in results["generate"]}
    assert len(decode) == 12 and all(r["new_tokens"] == 8 for r in decode.values())
    # Greedy: HF's tokens are ours. Sampled: the compiled decode step draws what eager draws.
    assert all(r["tokens_vs_ours"] == "same" for key, r in decode.items() if key[0] == "greedy" or key[2] == "ours")


def test_each_model_runs_with_its_own_allocator_settings_in_one_process():
    """On a CPU the benchmark times each model as it runs by default, in one process: HF's with glibc's defaults (a
    large tensor freed and made again, as each step does, is faulted in again every time), ours keeping freed memory
    as `train` and `generate` do (it comes back without page faults), and --allocator kept gives HF ours' setting.
    Counted in a fresh process, whose allocator no other test has touched. (Back to HF's defaults after ours, glibc
    could not always hand the kept memory back: 2 processes in 14 here, and HF then reuses it, in its favour.)"""
    code = """if True:
        import argparse, resource, sys, torch
        sys.path.insert(0, "bench")
        import benchmark
        def faults(model, allocator):  # minor page faults while 64 MB tensors are made, filled and freed
            benchmark.use_allocator(model, argparse.Namespace(allocator=allocator), torch.device("cpu"))
            for _ in range(2):  # the first ones come from the kernel in either case (two: a small allocation may
                torch.ones(1 << 24)  # take the start of the first one's freed block)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(4):
                torch.ones(1 << 24)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        print(*(faults(*a) for a in [("hf", "as_run"), ("ours", "as_run"), ("hf", "kept")]))
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          check=True)
    hf, ours, hf_kept = map(int, proc.stdout.split())
    assert hf >= 4 * 32 and max(ours, hf_kept) * 3 < hf, (hf, ours, hf_kept)  # 32: 64 MB in 2 MB huge pages


def test_a_stopped_benchmark_stops_the_training_run_it_started(tmp_path):
    """A scheduler's SIGTERM (or `timeout`) ends the benchmark, and with it the `train` process it measures: left
    running, that would hold the GPU, and its temporary data folder the disk, after the job had ended."""
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen([sys.executable, BENCH, "--size", "tiny", "--only", "trainer", "--steps", "1000",
                             "--vocab_size", "300", "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    children = []
    while not children and proc.poll() is None:  # the trainer is the benchmark's first child process
        time.sleep(0.1)
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
    assert children, proc.communicate()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().endswith("interrupted") and "Traceback" not in err, err
    time.sleep(0.5)  # the child was killed and reaped by the benchmark before it exited
    assert not os.path.exists(f"/proc/{children[0]}")
    assert list((tmp_path / "tmp").iterdir()) == []  # its data folder went with it


def test_the_step_profile_accounts_for_the_step(tmp_path):
    """bench/profile_step.py, run in the same call as the GPU benchmark, explains a step's time: its table's operators
    add up to the profiled steps' wall time (on a CPU, where every operator runs in the step's own thread), and the
    matrix products are found as such."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "profile_step.py"), "--size", "tiny",
                           "--compile", "0", "--steps", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "profile-tiny-compile0.txt").read_text()
    steps = [float(t) for t in text.split("profiled steps (ms, with the profiler on): ")[1].split("\n")[0].split(", ")]
    total = float(text.split("CPU time per step: ")[1].split(" ms")[0])
    assert len(steps) == 2 and 0.5 * sum(steps) / 2 < total <= sum(steps) / 2 * 1.05
    assert "matrix products" in text and "  aten::mm\n" in text


def test_the_gpu_check_runs_every_part_and_keeps_its_files(tmp_path):
    """bench/gpu_check.sh, the one command for a GPU lent for minutes, here on a CPU at the tiny size: the benchmark,
    the GPU tests and the profile each run and leave their file, few enough to come back from a lent machine, and
    the GPU tests' failure for want of a GPU is the script's exit status, not hidden."""
    env = {**os.environ, "PYTHON": sys.executable, "BENCH_ARGS": "--size tiny --only trainer --steps 1",
           "PROFILE_ARGS": "--size tiny --steps 1"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), str(tmp_path), "300"],
                          capture_output=True, text=True, timeout=600, env=env)
    [result] = tmp_path.glob("*-tiny-*.json")
    names = sorted(p.name for p in tmp_path.iterdir() if p != result)
    assert names == ["bench.log", "machine.txt", "profile-tiny-compile0.txt", "tests.log"], names
    assert json.loads(result.read_text())["failed"] == []
    assert f"torch {__import__('torch').__version__}" in (tmp_path / "machine.txt").read_text()
    tests = (tmp_path / "tests.log").read_text()
    assert "4 failed" in tests and "cannot use a GPU" in tests, tests[-2000:]
    assert proc.returncode == 1 and "benchmark exit 0, tests exit 1" in proc.stdout, proc.stdout[-2000:]
    assert "aten::mm" in (tmp_path / "profile-tiny-compile0.txt").read_text()


def test_the_gpu_check_stops_at_once_without_the_packages(tmp_path):
    """A lent GPU's minutes are not spent on a Python that cannot run the checks: one error line, exit 2, seconds."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'No module named torch' >&2\nexit 1\n")
    fake.chmod(0o755)
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), str(tmp_path / "out"), "300"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHON": str(fake)})
    assert proc.returncode == 2 and proc.stdout.startswith("error: ") and "requirements.txt" in proc.stdout, proc
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["machine.txt"]  # no benchmark was started
