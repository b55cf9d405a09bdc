import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import SCRIPT, assert_user_error, run_cli, run_main


def test_demo_runs_then_runs_again_and_refuses_another_vocabulary(tmp_path):
    # the README's first command, shortened, from another folder; run again, it resumes the finished run and samples
    args = ("demo", "--out_dir", tmp_path / "demo", "--max_steps", 20, "--vocab_size", 500, "--device", "cpu")
    out = run_cli(*args, cwd=tmp_path).stdout
    assert "== 3/3 generate ==" in out and "done: loss" in out and "after 20 steps" in out
    # the commands it suggests next run as printed, from the folder it ran in
    generate, convert = (shlex.split(line) for line in out.splitlines() if line.startswith("  python "))
    assert os.path.isfile(os.path.join(tmp_path, convert[1])) and convert[1].endswith("convert_to_llama.py")
    proc = subprocess.run([sys.executable, *generate[1:], "--max_new_tokens", "5"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert generate[2] == "generate" and proc.returncode == 0 and proc.stdout.startswith("Lists are"), proc.stderr
    out = run_main(*args, check=True).stdout
    assert "nothing to train" in out and "after 20 steps" in out and "done: loss nan" not in out
    tokenizer = (tmp_path / "demo" / "data" / "tokenizer.model").read_bytes()
    proc = run_main(*args[:-4], "--vocab_size", 600)
    assert_user_error(proc, "500-token vocabulary", "--vocab_size 500")
    assert (tmp_path / "demo" / "data" / "tokenizer.model").read_bytes() == tokenizer
    for flag, value, needle in (("--max_steps", 0, "--max_steps must be at least 1, got 0"),
                                ("--vocab_size", 100, "--vocab_size must be 300 to")):
        assert_user_error(run_main("demo", "--out_dir", tmp_path / "new", flag, value), needle)
        assert not (tmp_path / "new").exists()  # refused before anything is written


def test_a_signal_stops_the_demo_after_its_save_not_just_its_training(tmp_path):
    cmd = [sys.executable, SCRIPT, "demo", "--out_dir", str(tmp_path / "demo"), "--max_steps", "100000",
           "--vocab_size", "500", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "demo" / "run" / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and metrics.read_text()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by signal at step" in out and "== 3/3 generate ==" not in out and "done:" not in out, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_ctrl_c_while_torch_loads_is_one_line(tmp_path):
    """Ctrl-C in the second or more that `import torch` takes, before main() runs: a line, not a traceback."""
    proc = subprocess.Popen([sys.executable, SCRIPT, "demo", "--out_dir", str(tmp_path / "demo")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:  # until torch's library is mapped: it is loading
        with open(f"/proc/{proc.pid}/maps") as f:
            if "libtorch" in f.read():
                break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, err) == (130, "error: interrupted\n")
    assert not (tmp_path / "demo").exists()


def test_a_folder_of_the_users_own_is_refused_and_left_as_it_was(tmp_path):
    """`demo --out_dir .` in a project folder: its corpus.txt and data/ would be replaced by the demo's."""
    (tmp_path / "data").mkdir()
    files = {tmp_path / "corpus.txt": b"my own corpus\n", tmp_path / "data" / "meta.json": b"{}"}
    for path, content in files.items():
        path.write_bytes(content)
    proc = run_main("demo", "--out_dir", tmp_path, "--max_steps", 1, "--vocab_size", 500, "--device", "cpu")
    assert_user_error(proc, "is not empty and holds no earlier demo", "HINT: pass a new or empty folder")
    (tmp_path / "runs" / "demo").mkdir(parents=True)  # its default folder, with a file of the user's
    (tmp_path / "runs" / "demo" / "notes.txt").write_text("mine")
    proc = run_main("demo", "--max_steps", 1, "--vocab_size", 500, "--device", "cpu", cwd=tmp_path)
    assert_user_error(proc, "HINT: pass a new or empty folder, e.g. --out_dir runs/demo2")  # not the one refused
    proc = run_main("demo", "--out_dir", "data", "--max_steps", 1, "--vocab_size", 500, "--device", "cpu",
                    cwd=tmp_path)
    assert_user_error(proc, "e.g. --out_dir runs/demo2")  # a new one, not runs/demo, which is not empty either
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["corpus.txt", "data", "demo", "meta.json", "notes.txt",
                                                           "runs"]
    assert all(path.read_bytes() == content for path, content in files.items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_a_gpu_asked_for_where_there_is_none_is_refused_before_the_prep(tmp_path):
    proc = run_main("demo", "--out_dir", tmp_path / "demo", "--device", "cuda")
    assert_user_error(proc, "cannot use a GPU here", "--device cpu")
    assert not (tmp_path / "demo").exists()
