import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
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
    # The same steps queued without syncs, timed too; its size means nothing on a CPU (one stall of a 5 ms step)
    assert all(math.isfinite(r["sync_cost"]) for r in train.values())
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
    matrix products are found as such. Its header names the inductor settings it was started with, and only those (a
    compile adds inductor's own cache folder to the environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR_")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "profile_step.py"), "--size", "tiny",
                           "--compile", "0", "--steps", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300,
                          env={**env, "TORCHINDUCTOR_COMPILE_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "profile-tiny-compile0.txt").read_text()
    steps = [float(t) for t in text.split("profiled steps (ms, with the profiler on): ")[1].split("\n")[0].split(", ")]
    total = float(text.split("CPU time per step: ")[1].split(" ms")[0])
    # (the shorter step: a stall between operators, another process's time slice, lengthens one step, not its ops)
    assert len(steps) == 2 and 0.5 * min(steps) < total <= sum(steps) / 2 * 1.05
    assert "matrix products" in text and "  aten::mm\n" in text
    assert "| inductor_env {'TORCHINDUCTOR_COMPILE_THREADS': '1'} |" in text.split("\n")[0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="its GPU tests fail for want of a GPU here")
def test_the_gpu_check_runs_every_part_and_keeps_its_files(tmp_path):
    """bench/gpu_check.sh, the one command for a GPU lent for minutes, here on a CPU at the tiny size: the benchmark,
    the GPU tests, the profile and the levers each run and leave their file, few enough to come back from a lent
    machine (8 at most), and
    the GPU tests' failure for want of a GPU is the script's exit status, not hidden."""
    env = {**os.environ, "PYTHON": sys.executable, "BENCH_ARGS": "--size tiny --only trainer --steps 1",
           "PROFILE_ARGS": "--size tiny --steps 1", "LEVER_ARGS": "--size tiny --steps 1"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), str(tmp_path), "300"],
                          capture_output=True, text=True, timeout=600, env=env)
    [result] = tmp_path.glob("*-tiny-2*.json")
    [levers] = tmp_path.glob("*-tiny-levers-*.json")
    names = sorted(p.name for p in tmp_path.iterdir() if p not in (result, levers))
    assert names == ["bench.log", "levers.log", "machine.txt", "profile-tiny-compile0.txt", "tests.log"], names
    assert json.loads(result.read_text())["failed"] == []
    rows = json.loads(levers.read_text())["trainer"]
    assert [r["model"] for r in rows] == ["ours trainer"] + [f"ours trainer {k}" for k in bench_module().LEVERS]
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


def test_the_gpu_check_runs_the_levers_for_the_default_benchmark_or_when_asked(tmp_path):
    """Its stages in order, with a Python that records its arguments (and has a GPU): the levers at 138m after the
    default benchmark, with LEVER_ARGS when it is set, and not after another benchmark that BENCH_ARGS asked for."""
    fake, calls = tmp_path / "python", tmp_path / "calls"
    fake.write_text(f"#!/bin/sh\necho \"$*\" >>{calls}\n")
    fake.chmod(0o755)

    def stages(**env):
        calls.unlink(missing_ok=True)
        proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), str(tmp_path / "out"), "570"],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHON": str(fake), **env})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return [line.split(" --time_budget")[0].split(" tests/")[0] for line in calls.read_text().splitlines()
                if line.startswith(("-m pytest", "bench/"))]  # (not the checks of the packages and the GPU)
    benchmark, profile, levers = "bench/benchmark.py", "bench/profile_step.py", "--only trainer --levers"
    assert stages(BENCH_ARGS="", LEVER_ARGS="") == ["-m pytest -q -p no:cacheprovider", f"{benchmark} --size 138m",
                                                    f"{profile} --out {tmp_path / 'out'}",
                                                    f"{benchmark} --size 138m {levers}"]
    assert stages(BENCH_ARGS="--size 350m")[-1].startswith(profile)
    assert stages(BENCH_ARGS="--size 350m", LEVER_ARGS="--size 350m")[-1] == f"{benchmark} --size 350m {levers}"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine without a GPU")
def test_the_gpu_check_stops_at_once_without_a_gpu(tmp_path):
    """Run where no GPU is, by mistake, it does not spend minutes failing the GPU tests and benchmarking 138m on the
    CPU: one error line that points to the CPU benchmark, exit 2 (with BENCH_ARGS set, as above, it runs)."""
    env = {k: v for k, v in os.environ.items() if k != "BENCH_ARGS"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), str(tmp_path / "out"), "300"],
                          capture_output=True, text=True, timeout=60, env={**env, "PYTHON": sys.executable})
    assert proc.returncode == 2 and proc.stdout.startswith("error: no GPU") and "bench/benchmark.py" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["machine.txt"]


# ----------------------------------------------------------------------------------------------------------------------
# The figures the README quotes, computed from timings given here (in this process: seconds, no compiling)


def bench_module():
    if os.path.join(ROOT, "bench") not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, "bench"))
    import benchmark
    return benchmark


def test_train_table_ratios_mfu_and_step_floor(monkeypatch):
    """bench_train's figures from given step times: each model's fastest round, ours/HF against the same compile
    setting and ours compiled against HF eager, MFU, the floor (each product's fastest over the rounds, summed) and
    HF over it; a batch halved to fit is where the next round starts."""
    import argparse
    import torch
    B = bench_module()
    ms = {("ours", 0): [30.0, 20.0], ("hf", 0): [50.0, 60.0], ("ours", 1): [15.0, 10.0], ("hf", 1): [40.0, 20.0]}
    calls = []

    def fitting_train(name, size, cpu_model, cfg, batch, compiled, device, ours_optimizer, args, budget):
        calls.append((name, int(compiled), batch))
        b = 2 if (name, compiled) == ("hf", True) else batch  # HF compiled: out of memory at 4, fits at 2
        t = ms[(name, int(compiled))].pop(0)
        return {"model": name, "compile": int(compiled), "batch": b, "ms_step": t, "tok_s": b * cfg.seq_len / t * 1e3}
    floors = {4: [(3.0, 1.5), (2.0, 1.0), (4.0, 2.0), (5.0, 2.0)], 2: [(1.0, 0.5), (0.8, 0.7)]}  # (matmuls, attention)
    monkeypatch.setattr(B, "fitting_train", fitting_train)
    monkeypatch.setattr(B, "step_floor_pieces", lambda cfg, b, device: dict(zip(("mm", "attention"), floors[b].pop(0))))
    monkeypatch.setattr(B.lm, "peak_bf16_flops", lambda device: 1e12)
    fields, batch = B.SIZES["tiny"]
    rows = B.bench_train(argparse.Namespace(rounds=2), torch.device("cpu"), B.Budget(0), "tiny", fields, batch, False,
                         lambda rows: None)
    assert calls == [("ours", 0, 4), ("hf", 0, 4)] * 2 + [("ours", 1, 4), ("hf", 1, 4), ("ours", 1, 4), ("hf", 1, 2)]
    r = {(row["model"], row["compile"]): row for row in rows}
    assert sorted(r) == [("hf", 0), ("hf", 1), ("ours", 0), ("ours", 1)]
    tok_s = {k: row["batch"] * 64 / row["ms_step"] * 1e3 for k, row in r.items()}  # tiny: seq_len 64
    assert [r[k]["ms_step"] for k in sorted(r)] == [50.0, 20.0, 20.0, 10.0]  # the fastest round of each
    assert math.isclose(r[("ours", 0)]["ours/HF"], 2.5) and math.isclose(r[("ours", 1)]["ours/HF"], 4.0)
    assert math.isclose(r[("ours", 1)]["ours/HF_eager"], 5.0) and "ours/HF_eager" not in r[("ours", 0)]
    fpt = B.lm.Transformer(B.lm.ModelConfig(**fields)).flops_per_token()
    assert all(math.isclose(row["mfu"], fpt * tok_s[k] / 1e12) for k, row in r.items())
    # at the row's batch, each piece's fastest: 2.0 + 1.0 at batch 4, 0.8 + 0.5 at 2
    assert [r[k]["floor_ms"] for k in sorted(r)] == pytest.approx([3.0, 1.3, 3.0, 3.0])
    assert math.isclose(r[("hf", 0)]["HF/floor"], 4 * 64 / 3.0e-3 / tok_s[("hf", 0)])
    assert math.isclose(r[("hf", 1)]["HF/floor"], 2 * 64 / 1.3e-3 / tok_s[("hf", 1)])
    assert r[("hf", 1)]["floor_pieces_ms"] == {"mm": 0.8, "attention": 0.5}


def test_targets_table():
    """check_targets: which figure each target reads, and met at exactly the wanted value."""
    import torch
    B = bench_module()
    gen = lambda b, compiled, ratio, decoding="greedy", model="ours": {  # noqa: E731
        "size": size, "batch": b, "compile": compiled, "ours/HF": ratio, "decoding": decoding, "model": model}
    size = "quick"
    cpu = {"sizes": ["quick"],
           "prep": [{"workers": 1, "encode_tok_s": 1.0e6}, {"workers": 2, "encode_tok_s": 1.8e6}],
           "train": [{"size": "quick", "model": "ours", "compile": 0, "ours/HF": 1.3},
                     {"size": "quick", "model": "hf", "compile": 0, "HF/floor": 2.0},
                     {"size": "quick", "model": "ours", "compile": 1, "ours/HF": 9.0, "ours/HF_eager": 1.69}],
           "generate": [gen(1, 0, 1.31), gen(16, 0, 1.2), gen(1, 1, 0.5), gen(1, 0, 0.1, "sampled"), gen(1, 0, None,
                                                                                                          model="hf")]}
    assert [tuple(t.values()) for t in B.check_targets(cpu, torch.device("cpu"))] == [
        ("prep tokens/s, all cores, 32K BPE", 1.8e6, 1.8e6, None, "yes"),
        ("train ours eager / HF eager", 1.3, 1.3, 2.0, "yes"),
        ("train ours compiled / HF eager", 1.69, 1.7, 2.0, "NO"),
        ("decode batch 1, ours eager / HF", 1.31, 1.3, None, "yes"),
        ("decode batch 16, ours eager / HF", 1.2, 1.3, None, "NO")]
    size = "138m"
    gpu = {"sizes": ["138m", "350m"],
           "trainer": [{"size": "138m", "model": "ours trainer", "mfu": 0.46},
                       {"size": "138m", "model": "ours trainer det", "mfu": 0.1}],
           "train": [{"size": "138m", "model": "ours", "compile": 1, "ours/HF": 1.1, "ours/HF_eager": 1.6},
                     {"size": "138m", "model": "ours", "compile": 0, "ours/HF": 3.0}],
           "generate": [gen(1, 1, 5.0), gen(16, 1, 1.0), gen(1, 0, 9.0), gen(1, 1, 0.1, "sampled")]}
    assert [tuple(t.values()) for t in B.check_targets(gpu, torch.device("cuda"))] == [
        ("138m MFU, trainer end to end", 0.46, 0.45, None, "yes"),
        ("350m MFU, trainer end to end", None, 0.50, None, "not run"),
        ("138m train ours compiled / HF eager", 1.6, 1.6, None, "yes"),
        ("138m train ours compiled / HF compiled", 1.1, 1.15, None, "NO"),
        ("138m decode batch 1, ours compiled / HF", 5.0, 5.0, None, "yes")]
    gpu["env"] = {"probe_ms": [10.0, 11.5]}  # the machine's speed moved by 15 % during the run: said at each target
    assert [t["met"] for t in B.check_targets(gpu, torch.device("cuda"))][:2] == ["yes (machine speed moved)",
                                                                                  "not run"]


def test_trainer_over_step_reads_the_bare_step_of_the_same_setting():
    B = bench_module()
    results = {"train": [{"size": "138m", "model": "ours", "compile": 0, "batch": 16, "step_ms_all": [100, 300, 200]},
                         {"size": "138m", "model": "hf", "compile": 1, "batch": 16, "step_ms_all": [9, 9, 9]},
                         {"size": "138m", "model": "hf", "compile": 0, "batch": 16, "ms_step": 150.0},
                         {"size": "138m", "model": "ours", "compile": 1, "batch": 16, "step_ms_all": [50, 70, 60]}],
               "trainer": [{"size": "138m", "model": "ours trainer", "compile": 1, "batch": 16, "ms_step": 75.0},
                           {"size": "138m", "model": "ours trainer", "compile": 1, "batch": 8, "ms_step": 75.0},
                           {"size": "138m", "model": "ours trainer", "compile": 1, "batch": 16, "accum": 4,
                            "ms_step": 240.0}]}
    B.trainer_over_step(results)
    assert results["trainer"][0]["trainer/step"] == 60 / 75  # the median bare step over the trainer's
    assert results["trainer"][0]["hf_eager/trainer"] == 150 / 75  # HF's eager step, fastest, over the trainer's
    assert "trainer/step" not in results["trainer"][1] and "hf_eager/trainer" not in results["trainer"][1]
    assert "trainer/step" not in results["trainer"][2]  # a step of 4 micro-batches is not one bare step


def test_generate_table_figures(monkeypatch):
    """time_generate's tok_s (every sample's tokens), ms per decode step and ours/HF from given call times: each
    variant's fastest of its calls."""
    import argparse
    import torch
    B = bench_module()
    cfg = B.lm.ModelConfig(**B.SIZES["tiny"][0])
    ours, hf = B.model_pair(cfg)
    ours, hf = B.lm.for_sampling(ours, torch.device("cpu"), torch.float32), hf.eval()
    hf.generation_config.eos_token_id = None
    seconds = iter([0.2, 0.5, 0.4, 1.0])  # interleaved calls: ours, HF, ours, HF
    monkeypatch.setattr(B, "timed", lambda fn, device: (fn(), next(seconds)))
    args = argparse.Namespace(new_tokens=4, gen_reps=2, allocator="default")
    rows = B.time_generate(ours, hf, None, [B.lm.BOS_ID, 5, 6], 2, "tiny", torch.device("cpu"), args, False,
                           B.Budget(0))
    r = {row["model"]: row for row in rows}
    assert [r["ours"]["tok_s"], r["ours"]["ms_step"], r["hf"]["tok_s"], r["hf"]["ms_step"]] == pytest.approx(
        [40.0, 50.0, 16.0, 125.0])  # 2 x 4 tokens in 0.2 s and in 0.5 s
    assert r["ours"]["ours/HF"] == pytest.approx(2.5) and r["hf"]["tokens_vs_ours"] == "same"


def test_decoding_is_timed_for_as_many_tokens_as_the_context_holds_and_a_skip_is_listed_once(monkeypatch):
    """At tiny's context of 64, 16 prompt tokens leave 48 new ones: ours stops there, so HF is timed on as many."""
    import argparse
    import torch
    B = bench_module()
    asked = []
    monkeypatch.setattr(B, "time_generate", lambda *a: asked.append((a[7].new_tokens, a[4], a[9])) or [])
    args = argparse.Namespace(new_tokens=128, prompt_tokens=16, gen_batch=[1])
    budget = B.Budget(0)
    B.bench_generate(args, torch.device("cpu"), budget, "tiny", B.SIZES["tiny"][0], lambda rows: None)
    assert asked == [(48, 1, budget)] * 2 and args.new_tokens == 128  # greedy, sampled; the caller's args kept
    spent = B.Budget(1e-9)
    assert not spent.allows("x") and not spent.allows("x") and spent.skipped == ["x"]  # (asked in each round)


def test_trainer_row_skips_the_compiling_window_and_stops_at_the_budget(monkeypatch):
    """bench_trainer keeps the faster of the trainer's 2nd and 3rd log windows (the 1st compiles), and stops waiting
    for a run once the time budget is spent. --levers runs it again with each lever, a row each, and a run that
    fails is listed while the others go on."""
    import argparse
    import torch
    B = bench_module()
    polls, runs, envs = [], [], []

    class Train:  # `train` as a process: it logs three windows at once, or (logs=False) none before it is killed
        def __init__(self, cmd, logs, env, **kwargs):
            out, steps = cmd[cmd.index("--out_dir") + 1], int(cmd[cmd.index("--log_interval") + 1])
            data, flag = cmd[cmd.index("--data_dir") + 1], lambda name: int(cmd[cmd.index(name) + 1])
            runs.append((flag("--batch_size"), flag("--grad_accum_steps"), flag("--max_steps"),
                         os.path.getsize(os.path.join(data, "train.bin")) // 2))  # uint16 tokens
            envs.append({k: v for k, v in env.items() if k == "TORCHINDUCTOR_CUDAGRAPHS"})
            failed = env.get("TORCHINDUCTOR_CUDAGRAPHS") == "1" and runs[-1][1] > 1  # (fails here, at once)
            os.makedirs(out)
            with open(os.path.join(out, "metrics.jsonl"), "w") as f:
                for i, ms in enumerate([5.0, 30.0, 20.0] if logs and not failed else []):
                    f.write(json.dumps({"step": steps * (i + 1), "ms_per_step": ms, "tokens_per_s": 1000 / ms,
                                        "mfu": ms / 100, "loss": 6.0 - i}) + "\n")
            self.returncode = 1 if failed else None

        def poll(self):
            polls.append(1)
            return self.returncode if len(polls) < 100 else 1  # (exits by itself after 20 s)

        def kill(self):
            self.returncode = -9

        def wait(self):
            return self.returncode
    fields, batch = B.SIZES["tiny"]
    args = argparse.Namespace(steps=2, deterministic=False)
    monkeypatch.setattr(B.subprocess, "Popen", lambda cmd, **kw: Train(cmd, logs=True, **kw))
    [row] = B.bench_trainer(args, torch.device("cpu"), B.Budget(0), "tiny", fields, batch, lambda rows: None)
    assert (row["ms_step"], row["tok_s"], row["mfu"], row["loss_last"], row["losses"]) == (20.0, 50.0, 0.2, 4.0,
                                                                                          [6.0, 5.0, 4.0])
    seq = fields["seq_len"]  # 3 windows of 2 steps, each of batch x accumulation sequences of seq + 1 tokens
    args.grad_accum_steps = 4
    [row] = B.bench_trainer(args, torch.device("cpu"), B.Budget(0), "tiny", fields, batch, lambda rows: None)
    assert row["accum"] == 4 and runs == [(batch, 1, 6, (6 * batch + 1) * (seq + 1)),
                                          (batch, 4, 6, (6 * batch * 4 + 1) * (seq + 1))]
    del args.grad_accum_steps
    runs.clear(), envs.clear()
    args.levers, budget = True, B.Budget(0)
    rows = B.bench_trainer(args, torch.device("cpu"), budget, "tiny", fields, batch, lambda rows: None)
    assert [(r["model"], r["batch"], r["accum"], r.get("env")) for r in rows] == [
        ("ours trainer", batch, 1, None), ("ours trainer batch32_accum2", 32, 2, None),
        ("ours trainer accum4", batch, 4, None),
        ("ours trainer cudagraphs", batch, 1, {"TORCHINDUCTOR_CUDAGRAPHS": "1"})]
    assert [r[:2] for r in runs] == [(batch, 1), (batch, 4), (32, 2), (batch, 4), (batch, 1)]  # "all" the 2nd
    assert envs == [{}, {"TORCHINDUCTOR_CUDAGRAPHS": "1"}, {}, {}, {"TORCHINDUCTOR_CUDAGRAPHS": "1"}]
    assert runs[2][3] == (6 * 32 * 2 + 1) * (seq + 1)  # the lever's batch in the tokens made for it
    assert len(budget.failed) == 1 and budget.failed[0].startswith("ours trainer all tiny compile=0: "
                                                                   "RuntimeError: train stopped after 0 of 3")
    args.levers = False
    monkeypatch.setattr(B.subprocess, "Popen", lambda cmd, **kw: Train(cmd, logs=False, **kw))
    polls.clear()
    budget = B.Budget(0.5)
    assert B.bench_trainer(args, torch.device("cpu"), budget, "tiny", fields, batch, lambda rows: None) == []
    assert re.search("stopped after 0 of 3 log windows .*--time_budget spent", budget.failed[0])
    assert len(polls) < 20  # 0.5 s at a poll every 0.2 s, not until the run ended by itself


def test_a_spent_budget_skips_every_variant_and_the_result_file_is_named_by_its_run(tmp_path, monkeypatch):
    """Run as `python bench/benchmark.py` with its time budget spent at once: every variant is skipped, the JSON is
    still written, named device-sizes[-vocabN][-allocator]-time, with the arguments' defaults and no local paths. The
    default budget: 420 s for the presets' sizes, none for quick."""
    from conftest import run_main
    B = bench_module()
    budgets = []

    class Spent(B.Budget):
        def __init__(self, seconds):
            budgets.append(seconds)
            super().__init__(1e-9)
    monkeypatch.setattr(B, "Budget", Spent)
    monkeypatch.setattr(B.torch.cuda, "is_available", lambda: False)  # the CPU's defaults, on a GPU machine too
    for n, (flags, name) in enumerate([(["--size", "tiny,quick"], r"tiny-quick"),
                                       (["--size", "tiny", "--vocab_size", "300", "--allocator", "kept"],
                                        r"tiny-vocab300-kept"),
                                       (["--size", "tiny", "--batch", "2", "--grad_accum_steps", "4",
                                         "--deterministic", "--levers"], r"tiny-batch2-accum4-det-levers")]):
        out = tmp_path / str(n)
        r = run_main("--only", "trainer", "--out", out, *flags, main=B.main)
        assert r.returncode == 0, r.stderr
        [path] = out.iterdir()
        assert re.fullmatch(rf"[a-z0-9-]+-{name}-\d{{8}}-\d{{6}}\.json", path.name), path.name
        results = json.loads(path.read_text())
        sizes = flags[1].split(",")
        assert results["skipped"] == [f"ours trainer {s} compile=0" for s in sizes] and results["failed"] == []
        assert "out" not in results["args"] and "cache_dir" not in results["args"]
        assert results["args"]["rounds"] == 2  # on a CPU
        # the CPU targets are set for quick: its run has the table (nothing measured), tiny's has none
        assert [t["met"] for t in results.get("targets", [])] == ["not run"] * 2 * ("quick" in sizes)
    assert budgets == [0, 420, 420]  # quick among the sizes: no budget; presets' sizes (and tiny): 420 s


def test_a_failed_variant_is_listed_and_the_benchmark_exits_1_after_writing_the_others(tmp_path, monkeypatch):
    from conftest import run_main
    B = bench_module()

    def broken(*args):
        raise RuntimeError("no C compiler")
    monkeypatch.setattr(B, "bench_trainer", broken)
    monkeypatch.setattr(B.torch.cuda, "is_available", lambda: False)
    r = run_main("--only", "trainer", "--size", "tiny", "--out", tmp_path, main=B.main)
    [path] = tmp_path.iterdir()
    assert r.returncode == 1 and "failed:\n  trainer tiny: RuntimeError: no C compiler" in r.stdout, r.stdout[-2000:]
    assert json.loads(path.read_text())["failed"] == ["trainer tiny: RuntimeError: no C compiler"]


def test_prep_figures_read_from_prep_s_own_line(docs_corpus, tmp_path, monkeypatch, capsys):
    """prep_child reads the encoding pass's tokens/s from prep's summary line ("1,234,567 tokens/s (12.3 MB/s)"):
    the prep target's figure. Here prep at a small vocabulary (the benchmark's 32K needs its 1 GB corpus)."""
    B = bench_module()
    prep = B.lm.prep
    monkeypatch.setattr(B.lm, "prep", lambda *a, vocab_size, **kw: prep(*a, vocab_size=1000, **kw))
    B.prep_child(str(docs_corpus), str(tmp_path / "data"), 1)
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["encode_tok_s"] >= 1000 and row["encode_MB_s"] > 0  # with a thousands separator
    assert row["encode_s"] <= row["wall_s"]  # the encoding pass is a part of the run
    assert row["tokens"] > 0 and row["total_tok_s"] == row["tokens"] / row["wall_s"]


def test_train_step_row_from_its_step_times(monkeypatch):
    """time_train's row from given step times: the fastest step, tokens/s of batch x seq_len, every step's time, and
    the per-step sync's cost (synced steps' mean over the queued ones')."""
    import argparse
    import torch
    B = bench_module()
    cfg = B.lm.ModelConfig(**B.SIZES["tiny"][0])
    ours, _ = B.model_pair(cfg)
    seconds = iter([0.03, 0.01, 0.02, 0.05])  # 3 synced steps, then 2 queued ones together
    monkeypatch.setattr(B, "timed", lambda fn, device: (fn(), next(seconds)))
    args = argparse.Namespace(warmup=1, steps=3, queued_steps=2, allocator="default")
    cpu = torch.device("cpu")
    row = B.time_train("ours", ours, cfg, 4, False, cpu, B.lm.make_optimizer(ours, B.LR, B.WEIGHT_DECAY, cpu), args)
    assert (row["ms_step"], row["step_ms_all"]) == (10.0, [30.0, 10.0, 20.0])
    assert math.isclose(row["tok_s"], 4 * 64 / 0.01) and math.isclose(row["sync_cost"], 0.02 / 0.025 - 1)


def test_step_floor_times_each_matrix_of_the_model_as_often_as_a_step_computes_it(monkeypatch):
    """step_floor_pieces: the products of every weight matrix, at its shape, times the layers that have it. With each
    product "timed" as its FLOP count, the matrix pieces add up to the 6 x matmul parameters x tokens of the MFU count
    (forward and backward), for a GQA shape whose q, k and v differ in size."""
    import torch
    B = bench_module()
    cfg = B.lm.ModelConfig(**{**B.SIZES["tiny"][0], "n_kv_head": 2})

    def flops(fn, device, reps):  # milliseconds = FLOPs (the caller multiplies seconds by 1e3)
        a, b = fn.args if isinstance(fn, functools.partial) else (None, None)
        return 2 * a.shape[0] * a.shape[1] * b.shape[1] / 1e3 if a is not None else 1e-3
    monkeypatch.setattr(B, "timed_min", flops)
    pieces = B.step_floor_pieces(cfg, 4, torch.device("cpu"))
    n = 4 * cfg.seq_len
    attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.seq_len
    matmul = sum(ms for k, ms in pieces.items() if k != "attention")
    assert len(pieces) == 16 and math.isclose(matmul, n * (B.lm.Transformer(cfg).flops_per_token() - attention))
    assert pieces["attention"] == cfg.n_layer


def test_prep_peak_memory_is_in_mib():
    B = bench_module()
    with open("/proc/self/status") as f:
        rss = int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024
    assert rss / 10 < B.tree_pss_mib(os.getpid()) <= rss * 1.05  # this process's share of its resident set


def test_the_crash_check_resumes_killed_runs_into_the_uninterrupted_one_and_names_what_differs(tmp_path):
    """bench/crash_check.py, for a user to run on their own filesystem and GPU: here 2 kills of a CPU run, each
    resumed, and the end is the uninterrupted run's; then its comparison, shown a weight off by one bit, an AdamW
    moment, a metrics row and a temporary file left behind, names each of them."""
    import torch
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "crash_check.py"), "--out", str(out),
                           "--device", "cpu", "--kills", "2", "--max_steps", "24"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kills = re.findall(r"^ +\d +(\d+) +(\d+) +(\d+)$", proc.stdout, re.M)  # logged step, resumed from, steps lost
    # (a kill meant for the last steps is dropped when the run ends first, which a loaded machine may see)
    assert 1 <= len(kills) <= 2 and all(int(logged) - int(resumed) == int(lost) <= 3 for logged, resumed, lost in kills)
    assert "no temporary file left: yes" in proc.stdout

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import crash_check
    full, killed = out / "full", out / "killed"
    assert crash_check.compare(str(full), str(killed)) == []
    ckpt = torch.load(killed / "ckpt_last.pt", weights_only=True)
    weight = ckpt["model"]["norm.weight"]
    weight[0] = torch.nextafter(weight[0], torch.tensor(math.inf))
    ckpt["optimizer"]["state"][1]["exp_avg"].mul_(2)
    torch.save(ckpt, killed / "new.pt")
    os.replace(killed / "new.pt", killed / "ckpt_last.pt")  # (not through ckpt_best.pt, which may be a link to it)
    rows = (killed / "metrics.jsonl").read_text().splitlines()
    row = json.loads(rows[4])
    rows[4] = json.dumps({**row, "loss": row["loss"] + 1e-5})
    (killed / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    (killed / ".ckpt_last.pt.tmp4194303").write_bytes(b"")
    assert crash_check.compare(str(full), str(killed)) == [
        "ckpt_last.pt.model.norm.weight", "ckpt_last.pt.optimizer.state.1.exp_avg",
        "metrics.jsonl from row 5 (24 rows uninterrupted, 24 killed and resumed)",
        ".ckpt_last.pt.tmp4194303 left behind"]
