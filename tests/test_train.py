import argparse
import contextlib
import copy
import dataclasses
import errno
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

import standalone_transformer_lm as lm
from conftest import SCRIPT, assert_user_error, run_cli, run_main, spy_on_syncs


# LM_TEST_DEVICE=cuda runs the training tests on a GPU instead (the README's Tests section says which hold there)
DEVICE = os.environ.get("LM_TEST_DEVICE", "cpu")


def train_args(out_dir, data_dir, **overrides):
    args = dict(out_dir=out_dir, data_dir=data_dir, preset="tiny", batch_size=4, grad_accum_steps=2, max_steps=30,
                warmup_steps=5, lr=3e-3, eval_interval=10, eval_iters=2, log_interval=5, save_interval=10,
                device=DEVICE)
    args.update(overrides)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def untimed(out_dir):  # the log without its timings, which differ between any two runs
    return [{k: v for k, v in row.items() if k not in ("ms_per_step", "tokens_per_s")} for row in metrics(out_dir)]


def kill_at_write(monkeypatch, name, nth=1):
    """Stop the run (KeyboardInterrupt, as a kill would) at its nth atomic write of the file `name`."""
    write, writes = lm.atomic_write, Counter()

    def killed(path, *args, **kwargs):
        writes[os.path.basename(path)] += 1
        if os.path.basename(path) == name and writes[name] == nth:
            raise KeyboardInterrupt
        return write(path, *args, **kwargs)
    monkeypatch.setattr(lm, "atomic_write", killed)


def assert_same_weights(a, b, atol=0.0):
    wa, wb = load(a / "pytorch_model.bin"), load(b / "pytorch_model.bin")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=atol), (k, (wa[k] - wb[k]).abs().max().item())
        if atol == 0:
            assert torch.equal(wa[k], wb[k]), k


def test_loss_falls_on_real_text(docs_data, tmp_path):
    run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=60, eval_interval=20), check=True)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(5, 61, 5))
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0 and rows[-1]["val_loss"] < math.log(1000) - 1.0
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in rows)


def kill_then_resume_equals_uninterrupted(docs_data, tmp_path, kill_at, **common):
    log = run_main("train", *train_args(tmp_path / "full", docs_data, **common), check=True).stdout  # here
    cmd = [sys.executable, SCRIPT, "train", *train_args(tmp_path / "killed", docs_data, **common)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = tmp_path / "killed" / "config.json"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if config.exists() and json.loads(config.read_text())["step"] > kill_at:  # the save after kill_at's began
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    saved = load(tmp_path / "killed" / "ckpt_last.pt")["step"]  # written last in a save: kill_at's save or the next
    assert kill_at <= saved < common["max_steps"]
    out = run_main("train", *train_args(tmp_path / "killed", docs_data, **common), check=True).stdout
    assert f"resuming {tmp_path / 'killed'}/ckpt_last.pt at step {saved}" in out
    assert_same_weights(tmp_path / "full", tmp_path / "killed")
    assert [r["step"] for r in metrics(tmp_path / "killed")] == [r["step"] for r in metrics(tmp_path / "full")]
    full, resumed = load(tmp_path / "full" / "ckpt_last.pt"), load(tmp_path / "killed" / "ckpt_last.pt")
    assert resumed["step"] == common["max_steps"] and resumed["scaler"] == full["scaler"]  # fp16's loss scale
    for a, b in zip(full["optimizer"]["state"].values(), resumed["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)  # AdamW's moments and step counts
    assert all(torch.equal(a["torch"], b["torch"]) for a, b in zip(full["rng"], resumed["rng"], strict=True))
    return log


def test_sigkill_then_resume_is_bit_identical(docs_data, tmp_path):
    # dropout on, so the resumed run must also restore the RNG state exactly. Default flags: eager on a CPU, the same
    # command gives the same bits in every process (5 of 40 runs left the common path before settle_cpu)
    kill_then_resume_equals_uninterrupted(docs_data, tmp_path, kill_at=20, max_steps=60, save_interval=10,
                                          eval_interval=20, dropout=0.1, d_model=96, seq_len=128)


def test_float16_with_grad_scaler_resumes_bit_identically(docs_data, tmp_path):
    # float16 autocast and a GradScaler, as --dtype auto picks on GPUs without bf16 (CPU autocast runs the same code)
    kill_then_resume_equals_uninterrupted(docs_data, tmp_path, kill_at=10, max_steps=30, save_interval=5,
                                          eval_interval=10, dtype="float16")


def test_an_overflowing_fp16_step_logs_a_grad_norm_that_strict_json_reads(docs_data, tmp_path, monkeypatch):
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def overflow_at_step_5(params, max_norm):  # what an fp16 step that the gradient scaler skips reports
        calls.append(1)
        norm = clip(params, max_norm)
        return norm * math.inf if len(calls) == 5 else norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", overflow_at_step_5)
    lm.main(["train", *train_args(tmp_path / "run", docs_data, max_steps=5, dtype="float16")])

    def not_json(constant):
        raise AssertionError(f"{constant} in metrics.jsonl, which strict JSON readers (jq) refuse")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=not_json) for line in lines]
    assert [r["step"] for r in rows] == [5] and rows[0]["grad_norm"] is None


@pytest.mark.parametrize("resumed", [0, 1])
def test_logged_step_times_leave_out_checkpoint_saves_and_the_first_step(docs_data, tmp_path, monkeypatch, resumed):
    """ms/step, tokens/s and MFU time training steps: not the saves, nor a process's first step, which compiles (a
    minute or more on a GPU), in a new run and in a resumed one alike."""
    if resumed:
        lm.main(["train", *train_args(tmp_path / "run", docs_data, max_steps=5, log_interval=5, save_interval=5)])
    # By the clock train() reads, a step takes 1 us a call to it (the machine's real speed does not count), a save
    # 100 s, and the first step 100 s more
    clock, calls, first = [0.0], itertools.count(), [100.0]
    save, clip = lm.save_checkpoint, torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0] + next(calls) * 1e-6)
    monkeypatch.setattr(lm, "save_checkpoint", lambda *a: (save(*a), clock.__setitem__(0, clock[0] + 100.0)))

    def slow_first(*a):
        clock[0] += first.pop() if first else 0.0
        return clip(*a)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", slow_first)
    lm.main(["train", *train_args(tmp_path / "run", docs_data, max_steps=20, log_interval=5, save_interval=5,
                                  eval_interval=10)])
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [5, 10, 15, 20] and clock[0] == 100 + 100 * (4 - resumed)  # a save a log
    assert max(r["ms_per_step"] for r in rows[resumed:]) < 1000, rows  # either counted: 20,000 ms more


@pytest.mark.parametrize("bad_step, grad_clip", [(1, 0.5), (3, 0.5), (3, 0)])  # --grad_clip 0: no clipping
def test_grad_clip_is_applied_and_a_non_finite_grad_norm_stops_a_float32_run(docs_data, tmp_path, monkeypatch, capsys,
                                                                             bad_step, grad_clip):
    clip, max_norms = torch.nn.utils.clip_grad_norm_, []

    def infinite_at_bad_step(params, max_norm):  # a finite loss with an overflowing gradient: no scaler skips it
        max_norms.append(max_norm)
        norm = clip(params, max_norm)
        return norm * math.inf if len(max_norms) == bad_step else norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", infinite_at_bad_step)
    with pytest.raises(SystemExit) as stopped:
        lm.main(["train", *train_args(tmp_path / "run", docs_data, max_steps=10, save_interval=2,
                                      grad_clip=grad_clip)])
    assert stopped.value.code == 2 and max_norms == [grad_clip or math.inf] * bad_step
    err = capsys.readouterr().err
    assert f"error: training diverged at step {bad_step}: loss " in err
    if bad_step == 1:  # before the first save: nothing to resume
        assert "nothing was saved yet. HINT: start again with a lower --lr" in err
        assert not (tmp_path / "run" / "ckpt_last.pt").exists()
    else:
        assert "ckpt_last.pt is as it was. HINT: resume with a lower --lr" in err
        assert load(tmp_path / "run" / "ckpt_last.pt")["step"] == 2


def test_val_loss_is_measured_without_dropout_and_only_a_lower_one_is_a_new_best(docs_data, tmp_path, monkeypatch):
    run, reads, get = tmp_path / "run", [], lm.Batches.get
    monkeypatch.setattr(lm.Batches, "get", lambda self, step, rows, device: (
        reads.append(list(rows)) if self.seed is None else None, get(self, step, rows, device))[1])
    lm.main(["train", *train_args(run, docs_data, max_steps=10, eval_interval=10, save_interval=10, dropout=0.5)])
    # --eval_iters 2 x global batch (4 x 2): 16 windows spread evenly over val.bin, in file order, 4 at a time
    val = lm.Batches(str(docs_data / "val.bin"), np.uint16, 64, None, global_batch=1)
    spread = [i * val.n_windows // 16 for i in range(16)]
    assert val.n_windows > 16 and reads == [spread[i:i + 4] for i in range(0, 16, 4)]
    tokens = np.fromfile(docs_data / "val.bin", np.uint16)
    assert val.window(3).tolist() == tokens[3 * 64:4 * 64 + 1].tolist() and val.n_windows == (len(tokens) - 1) // 64
    # the same windows through the saved model in eval mode, dropout off, give the logged loss (rounded to 5 decimals)
    monkeypatch.undo()
    model, _ = lm.model_from_checkpoint(str(run / "ckpt_last.pt"), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        loss = sum(model(*val.get(0, rows, torch.device("cpu")))[1].item() for rows in reads) / len(reads)
    assert metrics(run)[-1]["val_loss"] == pytest.approx(loss, abs=1e-5)
    ckpt = load(run / "ckpt_last.pt")
    ckpt["best_val_loss"] = 0.0  # a best no eval can beat; a new file renamed over it, so ckpt_best.pt keeps its bytes
    torch.save(ckpt, run / "edited.pt")
    os.replace(run / "edited.pt", run / "ckpt_last.pt")
    lm.main(["train", *train_args(run, docs_data, max_steps=17, eval_interval=5, save_interval=5, dropout=0.5)])
    assert load(run / "ckpt_best.pt")["step"] == 10 and load(run / "ckpt_last.pt")["step"] == 17
    # the last step is evaluated and saved, exported too, though neither interval divides it and it is no new best
    assert "val_loss" in metrics(run)[-1] and metrics(run)[-1]["step"] == 17
    assert json.loads((run / "config.json").read_text())["step"] == 17


@pytest.mark.parametrize("out", ["data", "other_data"])
def test_a_prepped_data_folder_is_not_trained_into(out, docs_data, tmp_path):
    """Each save copies the run's tokenizer.model into --out_dir: into a data folder, over the one its .bin files
    were encoded with (--out_dir the --data_dir itself, or another corpus's folder)."""
    for name in ("data", "other_data"):
        shutil.copytree(docs_data, tmp_path / name)
    (tmp_path / "other_data" / "tokenizer.model").write_bytes(b"another corpus's tokenizer")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    proc = run_main("train", *train_args(tmp_path / out, tmp_path / "data", max_steps=2))
    assert_user_error(proc, f"--out_dir '{tmp_path / out}' holds prepped data (meta.json)", "HINT: pass a folder")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("theirs", ["converted", "tokenizer alone"])
def test_a_folder_with_another_tool_s_config_or_tokenizer_is_not_trained_into(docs_data, tmp_path, theirs):
    """Each save writes config.json and tokenizer.model: over a converted (or downloaded) model's, it would leave a
    folder that transformers no longer loads."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(b"their tokenizer")
    if theirs == "converted":
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "model.safetensors").write_bytes(b"their weights")
    before = {p: p.read_bytes() for p in folder.iterdir()}
    proc = run_main("train", *train_args(folder, docs_data, max_steps=2))
    names = "config.json and tokenizer.model" if theirs == "converted" else "tokenizer.model"
    assert_user_error(proc, f"--out_dir '{folder}' holds {names} that `train` did not write", "HINT: pass a folder")
    assert {p: p.read_bytes() for p in folder.iterdir()} == before  # no lock file either


@pytest.mark.parametrize("cut_at, left", [
    ("tokenizer.model", ["config.json", "metrics.jsonl", "pytorch_model.bin"]),  # in the export: no checkpoint yet
    ("ckpt_last.pt", ["ckpt_best.pt", "config.json", "metrics.jsonl", "pytorch_model.bin", "tokenizer.model"])])
def test_a_kill_in_the_first_save_then_the_same_command_trains_the_uninterrupted_run(docs_data, tmp_path, monkeypatch,
                                                                                     cut_at, left):
    """A save writes the export (pytorch_model.bin, config.json, tokenizer.model), then ckpt_best.pt for a new best (a
    first save always is one), then ckpt_last.pt. Killed in the export, the first save leaves our files and no
    checkpoint: the run starts again over them. Killed before ckpt_last.pt, it leaves ckpt_best.pt: the run resumes
    it (a new run's first eval would replace it). Either way it trains what the uninterrupted run trains."""
    args = train_args(tmp_path / "run", docs_data, max_steps=20, eval_interval=10, save_interval=10)
    kill_at_write(monkeypatch, cut_at)
    assert run_main("train", *args).returncode == 130
    monkeypatch.undo()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [".train.lock", *left]
    out = run_main("train", *args, check=True).stdout
    assert (f"resuming {run / 'ckpt_best.pt'} at step 10" in out) == (cut_at == "ckpt_last.pt"), out
    run_main("train", *train_args(tmp_path / "whole", docs_data, max_steps=20, eval_interval=10, save_interval=10),
             check=True)
    assert_same_weights(run, tmp_path / "whole")
    assert untimed(run) == untimed(tmp_path / "whole") and len(untimed(run)) == 4  # logged at 5, 10, 15, 20


def test_a_val_loss_equal_to_the_best_is_no_new_best(docs_data, tmp_path):
    run = tmp_path / "run"
    lm.main(["train", *train_args(run, docs_data, max_steps=2, eval_interval=2, save_interval=2)])
    # one step more at a learning rate too small to move a float32 weight: the same val loss, measured again
    lm.main(["train", *train_args(run, docs_data, max_steps=3, eval_interval=2, save_interval=2, lr=1e-12)])
    rows = [r for r in metrics(run) if "val_loss" in r]
    assert [r["step"] for r in rows] == [2, 3] and rows[0]["val_loss"] == rows[1]["val_loss"]
    assert load(run / "ckpt_best.pt")["step"] == 2 and load(run / "ckpt_last.pt")["step"] == 3
    assert not os.path.samefile(run / "ckpt_best.pt", run / "ckpt_last.pt")


def test_ctrl_c_asks_for_a_save_and_again_3_s_later_stops_at_once():
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = lm.StopSignal()
        assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) == stop._handle
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        os.kill(os.getpid(), signal.SIGINT)  # again at once: the same request (a scheduler may repeat it)
        stop.since -= 4
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def test_train_help_shows_every_training_default(capsys):
    with pytest.raises(SystemExit):
        lm.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split()).split(" options: ", 1)[1]  # past the usage line
    for flag, default in (("batch_size", 16), ("lr", 0.0006), ("max_steps", 200000), ("compile", 0), ("dtype", "auto")):
        assert re.search(rf"--{flag} \S+ [^-]*\(default: {default}\)", text), flag
    assert "--min_lr MIN_LR (default: lr / 10)" in text and "(default: None)" not in text


@pytest.mark.parametrize("command", [["prep", "--text_path", "x"], ["train", "--out_dir", "x"],
                                     ["generate", "--ckpt", "x"], ["demo"]])
def test_help_shows_the_default_of_every_flag_that_has_one(command, capsys):
    parser = lm.build_parser().commands[command[0]]
    for action in parser._actions:
        if action.option_strings and action.default not in (None, "", argparse.SUPPRESS):
            formatter = parser._get_formatter()  # this flag's own help entry: a default shared with another flag
            formatter.add_argument(action)  # must not pass for both
            assert f"(default: {action.default})" in " ".join(formatter.format_help().split()), action.dest
    with pytest.raises(SystemExit) as e:  # and a flag it does not have is named with this subcommand's --help
        lm.main([*command, "--bogus", "1"])
    assert e.value.code == 2 and f"{command[0]} --help` lists the flags" in capsys.readouterr().err


def test_a_checkpoint_of_another_version_is_refused(tmp_path):
    for version, shown in ((99, "99"), ("1", "'1'")):  # (a string: not "version 1, this script reads 1")
        torch.save({"format": lm.CKPT_FORMAT, "version": version}, tmp_path / "ckpt.pt")
        with pytest.raises(lm.UserError, match=f"has checkpoint version {shown}, this script reads 1"):
            lm.load_checkpoint(str(tmp_path / "ckpt.pt"))


@pytest.mark.parametrize("tie", [0, 1])
def test_a_new_model_draws_each_weight_once(tie):
    """The weights of a new model are exactly init_weights()'s draws from the seed: nothing else draws first (nn.Linear
    and nn.Embedding's own initialisation, which init_weights() replaced, took 4.3 of 11.5 s at 700m on 2 cores)."""
    cfg = lm.ModelConfig(**lm.PRESETS["tiny"], vocab_size=320, tie_embeddings=tie)
    torch.manual_seed(0)
    model = lm.Transformer(cfg)
    built = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    model.init_weights()
    assert all(torch.equal(built[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in built.items() if k.endswith("layernorm.weight"))


@pytest.mark.parametrize("tie", [0, 1])
def test_a_model_built_from_saved_weights_is_the_saved_model_without_drawing_new_ones(tie):
    """Resume, generate and convert build the model straight from the saved weights (no random initialisation to
    overwrite: 14 of 15 s at 700m on 2 cores), on the device that runs it: the same logits, a tied matrix still one
    parameter, the RoPE tables (not saved) computed, and no random numbers drawn."""
    cfg = lm.ModelConfig(**lm.PRESETS["tiny"], vocab_size=320, tie_embeddings=tie)
    saved = lm.Transformer(cfg).eval()
    rng = torch.get_rng_state()
    model = lm.model_with_weights(cfg, lm.cpu_state_dict(saved)).eval()
    assert torch.equal(torch.get_rng_state(), rng)
    assert (model.lm_head.weight is model.embed_tokens.weight) == bool(tie)
    assert len(list(model.parameters())) == len(list(saved.parameters())) == 14 + (not tie)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    with torch.no_grad():
        assert torch.equal(model(x)[0], saved(x)[0])
    with warnings.catch_warnings():  # ("copying into a meta parameter is a no-op")
        warnings.simplefilter("ignore")
        elsewhere = lm.model_with_weights(cfg, lm.cpu_state_dict(saved), device="meta")
    tensors = itertools.chain(elsewhere.parameters(), elsewhere.buffers())
    assert {t.device.type for t in tensors} == {"meta"}  # the RoPE tables too
    assert (elsewhere.lm_head.weight is elsewhere.embed_tokens.weight) == bool(tie)


def test_compiled_deterministic_run_resumes_bit_identically_and_exports_clean_files(docs_data, tmp_path):
    # Compiled, a backward adds with atomics in a varying order; --deterministic 1 takes kernels without them. With
    # bf16 autocast, as on a GPU (CPU autocast runs the same code), and tied embeddings.
    log = kill_then_resume_equals_uninterrupted(docs_data, tmp_path, kill_at=6, max_steps=18, save_interval=3,
                                                eval_interval=6, dropout=0.1, compile=1, deterministic=1,
                                                dtype="bfloat16", tie_embeddings=1)
    assert "compile True (the first step compiles: a minute or more" in log  # not a hang: it says so
    out = tmp_path / "full"
    assert all(math.isfinite(r["loss"]) for r in metrics(out))
    state = load(out / "pytorch_model.bin")
    assert not any(k.startswith(("_orig_mod.", "module.")) or "._orig_mod." in k for k in state)
    assert state["lm_head.weight"].data_ptr() == state["embed_tokens.weight"].data_ptr()  # tied stays tied
    config = json.loads((out / "config.json").read_text())
    cfg = lm.ModelConfig.from_dict({k: v for k, v in config.items() if k not in ("format", "step")})
    model = lm.Transformer(cfg)
    model.load_state_dict(state, strict=True)
    assert (out / "tokenizer.model").read_bytes() == (docs_data / "tokenizer.model").read_bytes()
    for name in ("ckpt_last.pt", "ckpt_best.pt"):
        ckpt = load(out / name)
        assert ckpt["model"].keys() == state.keys() and ckpt["format"] == lm.CKPT_FORMAT
    assert not [p for p in os.listdir(out) if ".tmp" in p]


def test_deterministic_is_strict_and_an_op_without_such_a_kernel_is_one_error_line(docs_data, tmp_path, monkeypatch):
    # warn_only would let GPU attention keep its backward with atomics (torch only warns); strict, an op that has no
    # deterministic kernel stops the run instead. put_ without accumulate has none on any device.
    forward = lm.Transformer.forward

    def with_put(self, *args, **kwargs):
        torch.zeros(4).put_(torch.tensor([1]), torch.ones(1))
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(lm.Transformer, "forward", with_put)
    proc = run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=2, deterministic=1))
    assert_user_error(proc, "--deterministic 1: put_ has no deterministic kernel on cpu", "--deterministic 0")
    assert not torch.are_deterministic_algorithms_enabled()  # the harness put it back: later tests run as usual


def test_lr_schedule_and_which_parameters_decay():
    lr, min_lr, warmup, max_steps = 1.0, 0.1, 10, 110  # linear warmup to lr, cosine to min_lr, then min_lr
    lrs = [lm.lr_at(step, lr, min_lr, warmup, max_steps) for step in (0, 9, 10, 60, 110, 200)]
    assert lrs == pytest.approx([0.1, 1.0, 1.0, 0.55, 0.1, 0.1])
    model = lm.Transformer(lm.ModelConfig(**lm.PRESETS["tiny"], vocab_size=300))
    decay, no_decay = lm.make_optimizer(model, 1e-3, 0.1, torch.device("cpu")).param_groups
    assert decay["weight_decay"] == 0.1 and {p.ndim for p in decay["params"]} == {2}  # embeddings, projections
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 2 * 2 + 1  # the norm gains
    assert {p.ndim for p in no_decay["params"]} == {1}


def test_every_parameter_group_follows_the_schedule_and_a_resume_takes_the_commands_weight_decay(docs_data,
                                                                                                  tmp_path):
    run = tmp_path / "run"
    lm.main(["train", *train_args(run, docs_data, max_steps=2, warmup_steps=5, eval_interval=2, save_interval=2)])
    groups = load(run / "ckpt_last.pt")["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [lm.lr_at(1, 3e-3, 3e-4, 5, 2)] * 2  # the norm gains' group too
    assert metrics(run)[-1]["lr"] == pytest.approx(groups[0]["lr"])
    lm.main(["train", *train_args(run, docs_data, max_steps=4, warmup_steps=5, weight_decay=0)])
    assert [g["weight_decay"] for g in load(run / "ckpt_last.pt")["optimizer"]["param_groups"]] == [0.0, 0.0]
    lm.main(["train", *train_args(run, docs_data, max_steps=6, warmup_steps=5)])
    assert [g["weight_decay"] for g in load(run / "ckpt_last.pt")["optimizer"]["param_groups"]] == [0.1, 0.0]


def test_a_resume_whose_flags_raise_the_learning_rate_says_so_and_how_to_keep_it(docs_data, tmp_path, capsys):
    run, kept = tmp_path / "run", tmp_path / "kept"
    lm.main(["train", *train_args(run, docs_data, max_steps=6, warmup_steps=2, log_interval=1)])
    shutil.copytree(run, kept)
    ended = metrics(run)[-1]["lr"]  # near min_lr: the cosine has run out
    lm.main(["train", *train_args(run, docs_data, max_steps=12, warmup_steps=2, log_interval=1)])
    risen = lm.lr_at(6, 3e-3, 3e-4, 2, 12)
    assert metrics(run)[6]["lr"] == pytest.approx(risen, rel=1e-5) and risen > 2 * ended
    note = next(line for line in capsys.readouterr().out.splitlines() if "learning rate goes on" in line)
    assert f"at {risen:.3g}, up from the {ended:.3g}" in note
    keep = shlex.split(note[note.index("pass ") + 5:])  # its flags, run as they are printed
    for max_steps in (12, 14):  # more steps at the rate the run ended with: no jump, no note
        lm.main(["train", *train_args(kept, docs_data, max_steps=max_steps, warmup_steps=2, log_interval=1), *keep])
        assert "learning rate goes on" not in capsys.readouterr().out
    assert [row["lr"] for row in metrics(kept)[6:]] == pytest.approx([float(keep[1])] * 8)


def test_a_big_model_that_falls_back_to_the_cpu_is_noted(docs_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lm, "BIG_FOR_A_CPU", 200_000)  # the tiny preset's 234,816 parameters count as big here
    lm.main(["train", *train_args(tmp_path / "auto", docs_data, max_steps=1, device="auto")])
    noted = "note: no GPU, so this trains on the CPU, where 0M parameters take minutes" in capsys.readouterr().out
    assert noted == (lm.resolve_device("auto").type == "cpu")
    lm.main(["train", *train_args(tmp_path / "cpu", docs_data, max_steps=1, device="cpu")])  # asked for: no note
    assert "note: no GPU" not in capsys.readouterr().out


def test_float16_clips_and_logs_the_unscaled_gradient(docs_data, tmp_path):
    rows = {}
    for dtype in ("float32", "float16"):  # the scaler multiplies the loss by 65,536: clipping must see through it
        lm.main(["train", *train_args(tmp_path / dtype, docs_data, max_steps=3, grad_accum_steps=1, log_interval=1,
                                      eval_interval=3, save_interval=3, grad_clip=0.5, dtype=dtype)])
        rows[dtype] = metrics(tmp_path / dtype)
    assert [r["grad_norm"] for r in rows["float16"]] == pytest.approx([r["grad_norm"] for r in rows["float32"]],
                                                                      rel=0.01)
    assert [r["loss"] for r in rows["float16"]] == pytest.approx([r["loss"] for r in rows["float32"]], abs=2e-3)


def test_preset_shapes_and_the_initial_weights_scale():
    widths = {name: lm.ModelConfig(**cfg).ffn_hidden for name, cfg in lm.PRESETS.items()}
    assert widths == {"tiny": 192, "138m": 2048, "350m": 2816, "700m": 3584}  # 2/3 of 4 x d_model, rounded up
    torch.manual_seed(0)
    model = lm.Transformer(lm.ModelConfig(n_layer=8, n_head=4, d_model=256, vocab_size=2000))
    for name, p in model.named_parameters():  # N(0, 0.02); what writes into the residual stream / sqrt(2 n_layer)
        if p.ndim == 2:
            std = 0.02 / 4 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            assert p.std().item() == pytest.approx(std, rel=0.05), name


def test_rope_tables_are_cos_and_sin_rounded_once_from_float64():
    """The same command must build the same tables in every process: torch's pow and cos on a CPU gave other last bits
    in their first call of some processes, and two otherwise identical runs then trained apart. The angles are HF
    LLaMA's float32 ones: its exponent, power, reciprocal and angle each rounded to float32 (tests/test_convert.py
    compares with its tables)."""
    cfg = lm.ModelConfig(**lm.PRESETS["tiny"], vocab_size=300)
    f32 = np.float32
    inv_freq = torch.tensor([f32(1) / f32(cfg.rope_theta ** float(f32(i) / f32(cfg.head_dim)))
                             for i in range(0, cfg.head_dim, 2)])
    angles = torch.outer(torch.arange(cfg.seq_len, dtype=torch.float32), inv_freq).repeat(1, 2).double().tolist()
    cos, sin = lm.rope_tables(cfg)
    assert torch.equal(cos, torch.tensor([[math.cos(a) for a in row] for row in angles], dtype=torch.float32))
    assert torch.equal(sin, torch.tensor([[math.sin(a) for a in row] for row in angles], dtype=torch.float32))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_cpu_run_reuses_freed_memory_instead_of_faulting_it_in_again():
    """train and generate on a CPU keep freed blocks: a tensor freed and made again, as each step does, comes back
    without page faults. Counted in a fresh process, whose allocator no other test has touched."""
    code = """if True:
        import resource, sys, torch
        import standalone_transformer_lm as lm
        def faults():  # minor page faults while 64 MB tensors are made, filled and freed, as in a step
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(4):
                torch.ones(1 << 24)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        faults()
        default = faults()
        lm.settle_cpu(torch.device("cpu"))
        faults()  # the first ones come from the kernel once
        print(default, faults())
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(SCRIPT), check=True)
    default, kept = map(int, proc.stdout.split())
    assert default >= 4 * 32 and kept * 10 < default, (default, kept)  # 32: 64 MB in 2 MB huge pages


@pytest.mark.parametrize("tie, backend", [(0, None), (1, None), (0, "aot_eager")])
def test_the_fused_float32_loss_equals_cross_entropy_over_the_logits(tie, backend):
    """The training loss (lm_head and cross-entropy in one step, the logits' gradient computed over them in place)
    and every gradient equal autograd's F.cross_entropy over the logits, -1 targets ignored; compiled too (aot_eager
    traces it as inductor would, without the C++ compile)."""
    cfg = lm.ModelConfig(**lm.PRESETS["tiny"], vocab_size=320, tie_embeddings=tie)
    torch.manual_seed(0)
    model = lm.Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
    y = x.roll(-1, 1)
    y[0, :7] = y[2, 30:] = -1
    y[1, 5] = 0  # id 0 is a target like any other; only -1 is ignored
    torch._dynamo.reset()
    loss = (torch.compile(model, backend=backend) if backend else model)(x, y)[1]
    fused = torch.autograd.grad(loss / 3, list(model.parameters()))  # as a micro-step's loss, scaled
    logits = model(x)[0]
    assert logits.requires_grad  # the plain path: lm_head's output, then autograd's loss
    ref = F.cross_entropy(logits.view(-1, cfg.vocab_size), y.view(-1), ignore_index=-1)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    wanted = torch.autograd.grad(ref / 3, list(model.parameters()))
    for (name, _), got, want in zip(model.named_parameters(), fused, wanted):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-8), (name, (got - want).abs().max().item())
    assert model(x, torch.full_like(y, -1))[1].isnan()  # no target counted: nan, as F.cross_entropy
    with torch.no_grad():  # logits hundreds apart: most targets' probabilities underflow float32, their loss does not
        model.lm_head.weight.mul_(3000)
        far = F.cross_entropy(model(x)[0].view(-1, cfg.vocab_size), y.view(-1), ignore_index=-1)
        assert far.item() > 200 and model(x, y)[1].item() == pytest.approx(far.item(), rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast: the plain loss over the 16-bit logits (the
        plain = F.cross_entropy(model(x)[0].float().view(-1, cfg.vocab_size), y.view(-1), ignore_index=-1)
        assert model(x, y)[1].item() == pytest.approx(plain.item(), abs=1e-6)  # fused one is 1e-3 away)


def test_an_epoch_reads_every_window_once_in_a_seeded_order(tmp_path):
    path = tmp_path / "split.bin"
    np.arange(16 * 40 + 5, dtype=np.uint16).tofile(path)
    starts = {seed: [int(lm.Batches(str(path), np.uint16, 16, seed, global_batch=4).window(i)[0]) for i in range(39)]
              for seed in (0, 1)}
    for order in starts.values():
        shift = min(order)  # the epoch's seeded shift of the window grid
        assert sorted(order) == list(range(shift, shift + 16 * 39, 16)) and order != sorted(order)
    assert starts[0] != starts[1]
    batches = lm.Batches(str(path), np.uint16, 16, 0, global_batch=4)
    epochs = [[int(batches.window(e * 39 + i)[0]) for i in range(39)] for e in range(5)]
    shifts = [min(order) for order in epochs]
    for order, shift in zip(epochs, shifts):
        assert sorted(order) == list(range(shift, shift + 16 * 39, 16))
    assert len({tuple(o) for o in epochs}) == 5 and len(set(shifts)) > 1  # each epoch its own order and grid shift


@pytest.mark.parametrize("tokens", [17, 21, 31, 32, 33, 55])
def test_every_window_lies_inside_the_split_however_short(tmp_path, tokens):
    # a split needs seq_len + 1 tokens, one window; the seeded shift of the window grid must stay inside it
    path = tmp_path / "split.bin"
    np.arange(tokens, dtype=np.uint16).tofile(path)
    batches = lm.Batches(str(path), np.uint16, 16, seed=0, global_batch=4)
    for step in range(25):  # many epochs, each with its own order and shift
        x, y = batches.get(step, range(4), torch.device("cpu"))
        assert x.shape == y.shape == (4, 16) and torch.equal(y, x + 1)  # consecutive tokens, none past the end
    with pytest.raises(lm.UserError, match="not one sequence"):
        lm.Batches(str(path), np.uint16, tokens, seed=0, global_batch=4)


def test_a_vocabulary_over_65536_trains_from_uint32_token_files(tmp_path, monkeypatch):
    """prep writes uint32 ids when the vocabulary exceeds 65,536 and says so in meta.json; train must read them as
    such (as uint16, every id would be cut into two small ones, and training would run on garbage without a word)."""
    vocab, n = 70_000, 4_000
    data = tmp_path / "data"
    data.mkdir()
    for name, first in (("train.bin", 65_000), ("val.bin", 0)):  # consecutive ids, most of train's above 65,535
        ((np.arange(n) + first) % vocab).astype(np.uint32).tofile(data / name)
    (data / "tokenizer.model").write_bytes(b"a stand-in: train only hashes it and copies it")
    meta = {"vocab_size": vocab, "dtype": "uint32", "tokenizer_sha256": lm.file_sha256(str(data / "tokenizer.model")),
            "train": {"tokens": n}, "val": {"tokens": n}}
    (data / "meta.json").write_text(json.dumps(meta))
    seen, forward = [], lm.Transformer.forward

    def recording(self, idx, targets=None, pos=None):
        if self.training:
            seen.append((idx.clone(), targets.clone()))
        return forward(self, idx, targets, pos)
    monkeypatch.setattr(lm.Transformer, "forward", recording)
    proc = run_main("train", *train_args(tmp_path / "run", data, max_steps=2, grad_accum_steps=1, device="cpu"))
    assert proc.returncode == 0, proc.stderr
    assert f"of train.bin ({n:,} tokens)" in proc.stdout
    x, y = torch.cat([x for x, _ in seen]), torch.cat([y for _, y in seen])
    assert x.max() > 65_535 and torch.equal(y, (x + 1) % vocab)  # the file's ids, whole and in order
    assert abs(metrics(tmp_path / "run")[0]["loss"] - math.log(vocab)) < 0.5  # a fresh model over 70,000 ids


def test_resume_switches_between_bfloat16_and_float16(docs_data, tmp_path):
    # A bf16 run resumed on a GPU without bf16 (where --dtype auto picks float16): the loss scaler starts fresh; and
    # back again, the float16 run's scaler state is dropped.
    for max_steps, dtype in ((4, "bfloat16"), (8, "float16"), (12, "bfloat16")):
        out = run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=max_steps, save_interval=4,
                                            eval_interval=4, dtype=dtype), check=True).stdout
        ckpt = load(tmp_path / "run" / "ckpt_last.pt")
        assert ckpt["step"] == max_steps and bool(ckpt["scaler"]) == (dtype == "float16")
    assert "resuming" in out and "dtype bfloat16" in out


# Eager: each rank accumulates too, so its micro-steps must read its own rows of the global batch; the two ranks are
def test_halving_the_batch_and_doubling_accumulation_on_resume_continues_the_same_run(docs_data, tmp_path):
    """The out-of-memory hint's way on: the same global batch in smaller micro-batches trains the same steps and
    measures the same val loss, so ckpt_best.pt is still chosen as the uninterrupted run would choose it."""
    run_main("train", *train_args(tmp_path / "one", docs_data, max_steps=10, eval_interval=5), check=True)
    run_main("train", *train_args(tmp_path / "two", docs_data, max_steps=5, eval_interval=5), check=True)
    run_main("train", *train_args(tmp_path / "two", docs_data, max_steps=10, eval_interval=5, batch_size=2,
                                  grad_accum_steps=4), check=True)
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-5)  # sums in another order: rounding apart
    rows = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [5, 10]
    for key in ("loss", "grad_norm", "val_loss"):
        assert [r[key] for r in rows[0]] == pytest.approx([r[key] for r in rows[1]], abs=1e-4), key


def test_gradients_kept_for_cuda_graphs_train_the_same_run(docs_data, tmp_path, monkeypatch):
    """With inductor's CUDA graphs asked for (TORCHINDUCTOR_CUDAGRAPHS=1), a graph's replay would overwrite gradients
    that autograd took from its memory, so `train` makes them before the first step, keeps them, and zeroes them in
    place; each micro-step adds into them. That trains the run it trains without (here on a CPU, where the variable
    changes nothing else), bit for bit."""
    had_grads, forward = [], lm.Transformer.forward

    def spy(self, *args, **kwargs):  # at each training micro-step: does every parameter hold a gradient already?
        if self.training:
            had_grads.append(all(p.grad is not None for p in self.parameters()))
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(lm.Transformer, "forward", spy)
    run_main("train", *train_args(tmp_path / "one", docs_data, max_steps=6, eval_interval=3, dropout=0.1),
             check=True)
    assert had_grads == [False, True] * 6  # freed after each step, made again by its first backward
    had_grads.clear()
    run_main("train", *train_args(tmp_path / "kept", docs_data, max_steps=6, eval_interval=3, dropout=0.1),
             env={"TORCHINDUCTOR_CUDAGRAPHS": "1"}, check=True)
    assert had_grads == [True] * 12
    assert_same_weights(tmp_path / "one", tmp_path / "kept")
    assert untimed(tmp_path / "one") == untimed(tmp_path / "kept") and len(untimed(tmp_path / "one")) == 3


# two "nodes" of one process each, started as the README starts several nodes (a torchrun per node, c10d rendezvous).
# Compiled: d_model 384 makes 17 MB of weights, two of DDP's gradient buckets, so dynamo splits the compiled graph at
# the bucket boundary (TORCH_LOGS=ddp_graphs shows submod_0 and submod_1) and each bucket's all-reduce must still see
# its gradients.
@pytest.mark.parametrize("accum, model", [(2, {}), (1, {"compile": 1, "d_model": 384})], ids=["eager", "compiled"])
def test_two_gloo_ranks_match_one_process_with_accumulation(docs_data, tmp_path, accum, model):
    one_thread = {"OMP_NUM_THREADS": "1"}  # as each rank: sums split over threads may round differently
    run_main("train", *train_args(tmp_path / "one", docs_data, grad_accum_steps=2 * accum, max_steps=12, **model),
             check=True, threads=1)
    args = [SCRIPT, "train", *train_args(tmp_path / "two", docs_data, grad_accum_steps=accum, max_steps=12, **model)]
    logs = [tmp_path / f"launcher{i}.log" for i in range(2)]
    launch = [dict(stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **one_thread}) for log in logs]
    if model:
        procs = [subprocess.Popen(torchrun(*args), **launch[0])]
    else:
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        nodes = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                 "--rdzv_id=test"]
        procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *nodes, *args], **launch[i])
                 for i in range(2)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p, kw in zip(procs, launch):
            p.kill()
            kw["stdout"].close()
    stdout = "".join(log.read_text() for log in logs if log.exists())  # rank 0's, from whichever node it ran on
    assert codes == [0] * len(procs), stdout[-5000:]
    assert "x 2 process(es)" in stdout and f"grad_accum_steps {accum} x world_size 2" in stdout, stdout
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-5)
    losses = [r["loss"] for r in metrics(tmp_path / "one")], [r["loss"] for r in metrics(tmp_path / "two")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)
    val = [[r["val_loss"] for r in metrics(tmp_path / run) if "val_loss" in r] for run in ("one", "two")]
    assert len(val[0]) == 2 and val[0] == pytest.approx(val[1], abs=1e-4)  # the same windows, however many ranks
    rng = load(tmp_path / "two" / "ckpt_last.pt")["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # each rank its own dropout masks


def test_a_rank_added_on_resume_draws_its_own_dropout_masks(docs_data, tmp_path):
    args = train_args(tmp_path / "run", docs_data, grad_accum_steps=2, max_steps=5, dropout=0.1)
    run_main("train", *args, check=True)  # one process; then resumed on two, each reading half of the same global batch
    proc = subprocess.run(torchrun(SCRIPT, "train", *args, "--grad_accum_steps", "1", "--max_steps", "10"),
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "changed since the checkpoint: grad_accum_steps 2 -> 1, max_steps 5 -> 10, processes 1 -> 2" in proc.stdout
    rng = load(tmp_path / "run" / "ckpt_last.pt")["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # not a copy of rank 0's stream


def test_three_ranks_stopped_and_resumed_with_dropout_train_what_their_uninterrupted_run_trains(docs_data, tmp_path):
    """Each rank resumes its own RNG stream (its dropout masks), not rank 0's nor a fresh one. The warmup covers every
    step, so the learning rate does not depend on --max_steps: a run to 2 resumed to 4 is the run to 4, step by step.
    Three ranks, with accumulation: from three on, an all-reduce's sums depend on where each gradient lies in DDP's
    buckets, and a resumed process's first step must use the layout that the uninterrupted run's step used."""
    def start(out, max_steps):
        args = train_args(out, docs_data, grad_accum_steps=2, max_steps=max_steps, warmup_steps=4, dropout=0.1,
                          eval_interval=2, save_interval=2, log_interval=1)
        log = open(tmp_path / f"{out.name}{max_steps}.log", "w")
        return subprocess.Popen(torchrun(SCRIPT, "train", *args, nproc=3), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}), log

    def wait(*started):
        try:
            codes = [proc.wait(timeout=600) for proc, _ in started]
        finally:
            for proc, log in started:
                proc.kill()
                log.close()
        for code, (_, log) in zip(codes, started):
            assert code == 0, open(log.name).read()[-5000:]
    wait(start(tmp_path / "full", 4), start(tmp_path / "resumed", 2))  # side by side: one process start less to wait
    wait(start(tmp_path / "resumed", 4))
    assert_same_weights(tmp_path / "full", tmp_path / "resumed")
    full, resumed = load(tmp_path / "full" / "ckpt_last.pt"), load(tmp_path / "resumed" / "ckpt_last.pt")
    assert len(resumed["rng"]) == 3 and not torch.equal(resumed["rng"][0]["torch"], resumed["rng"][1]["torch"])
    assert all(torch.equal(a["torch"], b["torch"]) for a, b in zip(full["rng"], resumed["rng"], strict=True))
    assert [r["loss"] for r in metrics(tmp_path / "full")] == [r["loss"] for r in metrics(tmp_path / "resumed")]


def wait_for_metrics(out_dir):
    deadline = time.time() + 120
    while not ((out_dir / "metrics.jsonl").exists() and (out_dir / "metrics.jsonl").read_text()):
        assert time.time() < deadline, "no log line in 120 s"
        time.sleep(0.05)


def test_a_live_run_keeps_a_second_out_and_repeated_sigterm_saves_and_exits_cleanly(docs_data, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    (tmp_path / "run").mkdir()
    names = ("ckpt_last.pt", "ckpt_best.pt", "pytorch_model.bin", "config.json", "tokenizer.model", "metrics.jsonl")
    stale = [tmp_path / "run" / f".{name}.tmp{gone.pid}" for name in names]  # every file a run writes
    live = tmp_path / "run" / f".config.json.tmp{os.getpid()}"
    for path in stale:
        path.write_text("left by a run killed while it saved")
    live.write_text("being written by a live process")
    cmd = [sys.executable, SCRIPT, "train", *train_args(tmp_path / "run", docs_data, max_steps=100000,
                                                        save_interval=100000, eval_interval=100000)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_metrics(tmp_path / "run")
        # The same command again (here as `srun` would start a copy) while the first trains: refused, nothing touched
        second = run_main(*cmd[2:], "--max_steps", "2", env={"SLURM_STEP_NUM_TASKS": "2"})  # (unlocked: it ends)
        assert_user_error(second, f"another training run (pid {proc.pid} on", "srun started 2 copies", "--out_dir")
        assert live.exists() and proc.poll() is None
        # A scheduler signals every process and torchrun forwards the signal again; some repeat it until the end. A
        # repeat during the save, or after it while the process winds down, must not turn the clean exit into an error.
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.002)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
    finally:  # a failed check must not leave it training through the tests after this one
        proc.kill()
    ckpt = load(tmp_path / "run" / "ckpt_last.pt")
    assert 5 <= ckpt["step"] < 100000 and f"stopped by signal at step {ckpt['step']:,}" in stdout
    assert metrics(tmp_path / "run")[-1]["step"] == ckpt["step"]
    assert not [path.name for path in stale if path.exists()] and live.exists()


def torchrun(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
@pytest.mark.parametrize("killed_while", ["training", "starting"])
def test_workers_save_and_stop_when_torchrun_is_killed(docs_data, tmp_path, killed_while):
    """Orphaned while they train, the workers must notice, save and stop, not train on unseen. Killed while they load
    torch, before they meet, they would wait for each other until --dist_timeout (1800 s; or join the next torchrun on
    the port), or, met, train the whole run."""
    cmd = torchrun(SCRIPT, "train", *train_args(tmp_path / "run", docs_data, max_steps=3000, save_interval=100000,
                                                eval_interval=100000, log_interval=1))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    workers = []
    try:
        if killed_while == "training":
            wait_for_metrics(tmp_path / "run")
        deadline = time.time() + 120
        while killed_while == "starting" and time.time() < deadline:  # until both map torch's library: they have
            kids = children(proc.pid)  # taken torchrun's pid, which they take before they load torch
            if len(kids) == 2 and all("libtorch" in read(f"/proc/{pid}/maps") for pid in kids):
                break
            time.sleep(0.01)
        workers = children(proc.pid)  # (torchrun starts each in a session of its own: not in the launcher's group)
        assert len(workers) == 2
        proc.kill()
        proc.wait()
        deadline = time.time() + 120
        while not all(map(stopped, workers)) and time.time() < deadline:
            time.sleep(0.1)
        assert all(map(stopped, workers))
        if killed_while == "training" or (tmp_path / "run" / "ckpt_last.pt").exists():  # (starting: met, then stopped)
            step = load(tmp_path / "run" / "ckpt_last.pt")["step"]
            assert step < 3000 and metrics(tmp_path / "run")[-1]["step"] == step
    finally:  # workers that failed to stop would train on through the tests after this one
        for pid in [proc.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def read(path: str) -> str:  # "" for a process that ended meanwhile
    with contextlib.suppress(OSError):
        with open(path) as f:
            return f.read()
    return ""


def stopped(pid: int) -> bool:  # ended: gone, or a zombie that whoever adopted it has not reaped yet
    return read(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()[:1] in ([], ["Z"], ["X"])


def children(pid: int) -> list[int]:
    kids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):  # (one that ended meanwhile)
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:  # the field after the state: the parent's id
                    kids.append(int(entry))
    return kids


def test_ranks_that_see_different_out_dirs_refuse_to_train(docs_data, tmp_path):
    # two "nodes", each with its own folder: --out_dir run is a different folder for each rank
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
    run_main("train", *train_args("run", docs_data, max_steps=5, save_interval=5), check=True, cwd=tmp_path / "node0")
    wrapper = tmp_path / "node.sh"
    wrapper.write_text(f'cd "{tmp_path}/node$LOCAL_RANK" && exec "{sys.executable}" "{SCRIPT}" "$@"\n')
    cmd = torchrun("--no-python", "sh", wrapper, "train", *train_args("run", docs_data, max_steps=10))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "error: the processes start at different steps [5, 0] (windows read [40, 0])" \
        in proc.stderr
    assert load(tmp_path / "node0" / "run" / "ckpt_last.pt")["step"] == 5
    shutil.copytree(tmp_path / "node0" / "run", tmp_path / "node1" / "run")  # copies of the run that went apart
    ckpt = load(tmp_path / "node1" / "run" / "ckpt_last.pt")
    ckpt["data"]["windows"] = 20
    (tmp_path / "node1" / "run" / "ckpt_last.pt").unlink()  # (a hard link to ckpt_best.pt)
    torch.save(ckpt, tmp_path / "node1" / "run" / "ckpt_last.pt")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "different steps [5, 5] (windows read [40, 20])" in proc.stderr


def test_processes_started_with_different_flags_refuse_to_train(docs_data, tmp_path):
    wrapper = tmp_path / "node.sh"  # the second "node" started with one flag more: it would train apart, or hang
    wrapper.write_text(f'extra=""; [ "$LOCAL_RANK" = 1 ] && extra="--lr 0.01"\n'
                       f'exec "{sys.executable}" "{SCRIPT}" "$@" $extra\n')
    cmd = torchrun("--no-python", "sh", wrapper, "train", *train_args(tmp_path / "run", docs_data, max_steps=10))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and ("error: the processes were started with different settings: --lr 0.003 in "
                                     "process 0, 0.01 in process 1. HINT: run the same command") in proc.stderr
    assert not (tmp_path / "run" / "ckpt_last.pt").exists()


@pytest.mark.parametrize("env, missing", [({"RANK": "0"}, "WORLD_SIZE, MASTER_ADDR, MASTER_PORT"),
                                          ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, "MASTER_ADDR")])
def test_a_rank_left_in_the_environment_without_torchrun_is_one_error_line(env, missing, docs_data, tmp_path,
                                                                          monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # of a shell that has them
        monkeypatch.delenv(name, raising=False)
    assert_user_error(run_main("train", *train_args(tmp_path / "run", docs_data), env=env),
                      f"RANK is set but {missing} not", "HINT: start it with torchrun, or unset RANK")
    assert not (tmp_path / "run").exists()


def test_a_closed_stdout_saves_and_stops_as_a_signal_does(docs_data, tmp_path):
    # `train ... | head -n 8`: the reader goes away mid-run; the steps since the last save are not lost
    proc = subprocess.Popen([sys.executable, SCRIPT, "train", *train_args(tmp_path / "run", docs_data, max_steps=100000,
                                                                         save_interval=100000, log_interval=1)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not proc.stdout.readline().startswith("step 3 |"):
            assert proc.poll() is None, proc.stderr.read()
        proc.stdout.close()
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        proc.kill()
    assert 3 < load(tmp_path / "run" / "ckpt_last.pt")["step"] < 100000


def test_divergence_stops_with_error_and_keeps_the_last_good_checkpoint(docs_data, tmp_path):
    proc = run_main("train", *train_args(tmp_path / "run", docs_data, lr=1e9, warmup_steps=40, max_steps=200,
                                         save_interval=2, grad_clip=0))
    assert_user_error(proc, "training diverged at step", "grad norm", "lower --lr")
    ckpt = load(tmp_path / "run" / "ckpt_last.pt")
    assert ckpt["step"] >= 2
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_grad_clip_0_turns_clipping_off_rather_than_clipping_to_zero(docs_data, tmp_path):
    # --grad_clip 0 is "no clipping", the same steps as a limit no gradient reaches; a clip to norm 0 would zero every
    # gradient and leave weight decay alone to move the weights
    for name, clip in (("off", 0), ("unreached", 1e9)):
        lm.main(["train", *train_args(tmp_path / name, docs_data, max_steps=2, eval_interval=2, save_interval=2,
                                      log_interval=1, grad_clip=clip)])
    assert_same_weights(tmp_path / "off", tmp_path / "unreached")
    off, unreached = metrics(tmp_path / "off"), metrics(tmp_path / "unreached")
    assert [(r["loss"], r["grad_norm"]) for r in off] == [(r["loss"], r["grad_norm"]) for r in unreached]


GPU_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.6 GiB"
CPU_OOM = ("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 2147483648 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("error, message, device, detail", [
    (torch.cuda.OutOfMemoryError, GPU_OOM, "GPU", " (Tried to allocate 2.00 GiB)"),
    (RuntimeError, GPU_OOM, "GPU", " (Tried to allocate 2.00 GiB)"),  # RuntimeError: compile's wrapper
    (RuntimeError, CPU_OOM, "CPU", " (tried to allocate 2147483648 bytes)"),
    (MemoryError, "Unable to allocate 3.64 TiB for an array", "CPU", ";")])  # numpy's: a batch of a huge --batch_size
def test_out_of_memory_is_one_line_with_the_fix_and_keeps_the_checkpoint(docs_data, tmp_path, monkeypatch, capsys,
                                                                          error, message, device, detail):
    run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=4, save_interval=2), check=True)
    before = (tmp_path / "run" / "ckpt_last.pt").read_bytes()

    def oom(*args, **kwargs):
        raise error(message)
    monkeypatch.setattr(lm.Transformer, "forward", oom)
    with pytest.raises(SystemExit) as e:
        lm.main(["train", *train_args(tmp_path / "run", docs_data, max_steps=8)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: out of {device} memory at --batch_size 4{detail}"), err
    assert "halve --batch_size and double --grad_accum_steps" in err[0]
    assert (tmp_path / "run" / "ckpt_last.pt").read_bytes() == before


def test_ctrl_c_that_stops_the_first_compile_is_an_interruption_not_a_failed_compile(docs_data, tmp_path, monkeypatch,
                                                                                     capsys):
    """Ctrl-C reaches the whole process group, the C++ compiler that inductor runs too, whose compile then fails."""
    run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=2), check=True)
    before = (tmp_path / "run" / "ckpt_last.pt").read_bytes()
    try:
        failure = torch._dynamo.exc.BackendCompilerFailed(lm.Transformer.forward, RuntimeError("C++ compile error"),
                                                          None)
    except TypeError:  # an older torch: no frame argument
        failure = torch._dynamo.exc.BackendCompilerFailed(lm.Transformer.forward, RuntimeError("C++ compile error"))

    def compiler_stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        raise failure
    monkeypatch.setattr(lm.Transformer, "forward", compiler_stopped)
    with pytest.raises(SystemExit) as e:
        lm.main(["train", *train_args(tmp_path / "run", docs_data, max_steps=4)])
    assert e.value.code == 130 and capsys.readouterr().err.strip().splitlines()[-1] == "error: interrupted"
    assert (tmp_path / "run" / "ckpt_last.pt").read_bytes() == before
    monkeypatch.setattr(lm.Transformer, "forward", lambda *a, **k: (_ for _ in ()).throw(failure))  # no signal:
    with pytest.raises(SystemExit) as e:  # a compile that failed of itself
        lm.main(["train", *train_args(tmp_path / "run", docs_data, max_steps=4)])
    assert e.value.code == 2 and "error: torch.compile failed" in capsys.readouterr().err


@pytest.mark.parametrize("cut_by", ["a full disk", "a second Ctrl-C"])
def test_a_save_cut_short_is_one_error_line_and_keeps_the_checkpoint(cut_by, docs_data, tmp_path, monkeypatch):
    run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=2), check=True)
    before = (tmp_path / "run" / "ckpt_last.pt").read_bytes()

    class CutShort(io.RawIOBase):  # takes 4 kB, then fails as a full disk does, or is interrupted (StopSignal raises
        def __init__(self, f):  # KeyboardInterrupt at a Ctrl-C 3 s after the first), which torch.save wraps
            self.f, self.left = f, 4096

        def writable(self):
            return True

        def write(self, b):
            if len(b) > self.left:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if cut_by == "a full disk" else KeyboardInterrupt
            self.left -= len(b)
            return self.f.write(b)

    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: save(obj, CutShort(f)))
    proc = run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=4))
    if cut_by == "a full disk":
        assert_user_error(proc, "No space left on device", "pytorch_model.bin", "HINT: check the path, its "
                                                                                 "permissions and the free space")
    else:
        assert proc.returncode == 130 and proc.stderr.strip().splitlines()[-1] == "error: interrupted", proc.stderr
    assert (tmp_path / "run" / "ckpt_last.pt").read_bytes() == before
    assert not [p for p in os.listdir(tmp_path / "run") if ".tmp" in p]


def test_a_temporary_name_left_by_a_killed_process_of_this_pid_is_not_written_through(tmp_path):
    """A kill between linking ckpt_best.pt's bytes to ckpt_last.pt's temporary name and the rename leaves that name
    behind, a second name of ckpt_best.pt; the next run may have the same pid (a container's). Writing into it would
    overwrite the best checkpoint."""
    best = tmp_path / "ckpt_best.pt"
    best.write_bytes(b"best")
    os.link(best, tmp_path / f".ckpt_last.pt.tmp{os.getpid()}")
    lm.atomic_write(str(tmp_path / "ckpt_last.pt"), lambda f: f.write(b"last"))
    assert best.read_bytes() == b"best" and (tmp_path / "ckpt_last.pt").read_bytes() == b"last"
    assert sorted(os.listdir(tmp_path)) == ["ckpt_best.pt", "ckpt_last.pt"]


def test_a_gpu_that_torch_cannot_use_is_an_error_not_a_run_on_the_cpu(tmp_path, monkeypatch, capsys):
    (tmp_path / "nvidiactl").touch()  # as if the NVIDIA driver's device were there
    monkeypatch.setattr(lm, "NVIDIA_DEVICE", str(tmp_path / "nvidiactl"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only build of torch on a GPU machine
    with pytest.raises(SystemExit) as e:
        lm.main(["generate", "--ckpt", str(tmp_path / "ckpt_last.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "cannot use a GPU here (it is a CPU-only build)" in err[0], err
    assert "--device cpu" in err[0] and lm.resolve_device("cpu").type == "cpu"

    def too_old():  # a CUDA build whose CUDA needs a newer driver: torch warns and sees no GPU
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 12020). "
                      "Please update your GPU driver")
        return False
    monkeypatch.setattr(torch.cuda, "is_available", too_old)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(lm.UserError, match=r"driver on your system is too old \(found version 12020\)"):
        lm.resolve_device("auto")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # GPUs hidden on purpose: the CPU is meant
    assert lm.resolve_device("auto").type == "cpu"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(lm, "NVIDIA_DEVICE", str(tmp_path / "absent"))  # no GPU: auto is the CPU, cuda an error
    assert lm.resolve_device("auto").type == "cpu"
    with pytest.raises(lm.UserError, match="--device cpu"):
        lm.resolve_device("cuda")


TORCH_2_11_ON_A_V100 = """Found GPU0 Tesla V100-SXM2-16GB which is of compute capability (CC) 7.0.
The following list shows the CCs this version of PyTorch was built for and the hardware CCs it supports:
- 7.5 which supports hardware CC >=7.5,<8.0
Please follow the instructions at https://pytorch.org/get-started/locally/ to install a PyTorch release that supports \
one of these CUDA versions: 12.6, 12.8"""
TORCH_2_7_ON_A_V100 = """
    Found GPU0 Tesla V100-SXM2-16GB which is of cuda capability 7.0.
    PyTorch no longer supports this GPU because it is too old.
    The minimum cuda capability supported by this library is 7.5.
    """


@pytest.mark.parametrize("wording", ["this torch's", "torch 2.11's", "torch 2.7's"])
def test_a_gpu_too_old_for_the_build_or_too_many_processes_is_an_error_not_a_crash(monkeypatch, wording):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla V100-SXM2-16GB")
    message = TORCH_2_7_ON_A_V100 if wording == "torch 2.7's" else TORCH_2_11_ON_A_V100
    if wording == "this torch's":  # what its check says at CUDA init for a V100 (7.0) and a CUDA 13.0 build
        if not hasattr(torch.cuda, "_warn_unsupported_code"):
            pytest.skip("this torch's check is older: the torch 2.7 case has its wording")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda._warn_unsupported_code(0, 70, [75, 80, 86, 90, 120])  # kernels for 7.5 and newer
        message = str(caught[0].message)
    monkeypatch.setattr(torch.cuda, "init", lambda: warnings.warn(message))
    with pytest.raises(lm.UserError) as e:
        lm.resolve_device("auto")
    assert "has no kernels for this GPU (Tesla V100-SXM2-16GB, compute capability 7.0)" in str(e.value)
    # the CUDA 12.6 build still has kernels for 7.0: 2.13 names its pip command, 2.11 the CUDA versions, 2.7 neither
    fix = (f"pip install torch=={torch.__version__.split('+')[0]} --index-url https://download.pytorch.org/whl/cu126"
           if "pip install" in message else "install a build for CUDA 12.6, 12.8" if "12.8" in message
           else "install a build for it (https://pytorch.org/get-started/locally/)")
    assert fix in str(e.value), str(e.value)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)  # a GPU this build has kernels for
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")  # `torchrun --nproc_per_node=2` on a machine with one GPU
    with pytest.raises(lm.UserError, match=r"torchrun started process 1 on a node with 1 GPU\(s\). HINT: pass "
                                           r"--nproc_per_node=1"):
        lm.resolve_device("auto")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert lm.resolve_device("auto") == torch.device("cuda", 0)


def test_auto_precision_is_fp16_on_a_gpu_that_only_emulates_bf16(monkeypatch):
    def t4(including_emulation=True):  # torch's answer on a T4 or V100: bf16 tensors work, through emulation
        return including_emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", t4)
    assert lm.resolve_dtype("auto", torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and newer
    assert lm.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert lm.resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_a_new_best_checkpoint_is_linked_not_written_twice(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.model").write_bytes(b"sp")
    cfg = dataclasses.asdict(lm.ModelConfig(**lm.PRESETS["tiny"]))

    def save(names, step):
        ckpt = {"format": lm.CKPT_FORMAT, "version": lm.CKPT_VERSION, "step": step, "model_config": cfg,
                "model": {"w": torch.full((4,), float(step))}}
        lm.save_checkpoint(str(tmp_path), names, ckpt, (tmp_path / "tokenizer.model").read_bytes())

    last, best = tmp_path / "ckpt_last.pt", tmp_path / "ckpt_best.pt"
    save(["ckpt_best.pt", "ckpt_last.pt"], 1)
    assert os.path.samefile(last, best) and lm.load_checkpoint(str(best))["step"] == 1
    save(["ckpt_last.pt"], 2)  # a later save replaces ckpt_last.pt's name, not the bytes ckpt_best.pt holds
    assert lm.load_checkpoint(str(last))["step"] == 2 and lm.load_checkpoint(str(best))["step"] == 1

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")  # a filesystem without hard links
    monkeypatch.setattr(os, "link", no_links)
    save(["ckpt_best.pt", "ckpt_last.pt"], 3)
    assert not os.path.samefile(last, best) and lm.load_checkpoint(str(best))["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_best.pt", "ckpt_last.pt", "config.json",
                                                         "pytorch_model.bin", "tokenizer.model"]  # no temp files


def test_each_saved_file_is_on_disk_before_its_rename_and_its_rename_before_the_next_file(tmp_path, monkeypatch):
    """save_checkpoint's order (the export, then ckpt_best.pt, then ckpt_last.pt) holds on disk after a power cut only
    if each file's bytes are synced before its rename, and the folder (the rename) before the next file."""
    cfg = dataclasses.asdict(lm.ModelConfig(**lm.PRESETS["tiny"]))
    ckpt = {"format": lm.CKPT_FORMAT, "version": lm.CKPT_VERSION, "step": 1, "model_config": cfg,
            "model": {"w": torch.ones(4)}}
    events = spy_on_syncs(monkeypatch)
    lm.save_checkpoint(str(tmp_path), ["ckpt_best.pt", "ckpt_last.pt"], ckpt, b"sp")
    renames = [i for i, event in enumerate(events) if event[0] == "replace"]
    assert [events[i][1] for i in renames] == ["pytorch_model.bin", "config.json", "tokenizer.model", "ckpt_best.pt",
                                              "ckpt_last.pt"]
    assert all(events[i + 1] == ("fsync", os.stat(tmp_path).st_ino) for i in renames)


@pytest.mark.parametrize("cut_at", ["pytorch_model.bin", "ckpt_best.pt"])
def test_a_final_save_cut_short_is_redone_by_the_resume(docs_data, tmp_path, monkeypatch, cut_at):
    """A kill at the final save, before ckpt_last.pt commits it: the resume trains the last steps again and writes the
    whole save, not "nothing to train" beside an export or a best checkpoint from the save before."""
    args = train_args(tmp_path / "run", docs_data, max_steps=20, eval_interval=10, save_interval=10)
    kill_at_write(monkeypatch, cut_at, nth=2)  # the save at step 20
    assert run_main("train", *args).returncode == 130
    monkeypatch.undo()
    run_main("train", *args, check=True)
    run = tmp_path / "run"
    last, best = load(run / "ckpt_last.pt"), load(run / "ckpt_best.pt")
    assert last["step"] == json.loads((run / "config.json").read_text())["step"] == 20
    assert all(torch.equal(v, last["model"][k]) for k, v in load(run / "pytorch_model.bin").items())
    val = {row["step"]: row["val_loss"] for row in metrics(run) if "val_loss" in row}
    assert best["best_val_loss"] == min(val.values()) == val[best["step"]]


def test_a_ckpt_last_removed_by_hand_resumes_the_best_and_puts_it_back(docs_data, tmp_path, monkeypatch):
    """Without ckpt_last.pt the same command resumes ckpt_best.pt, rather than start a new run whose first eval would
    replace it, and ckpt_last.pt is that file again (for `generate` and the README's commands)."""
    args = train_args(tmp_path / "run", docs_data, max_steps=20, eval_interval=10, save_interval=10)
    run_main("train", *args, check=True)
    run = tmp_path / "run"
    best = (run / "ckpt_best.pt").read_bytes()
    (run / "ckpt_last.pt").unlink()

    def no_links(src, dst):  # a filesystem without hard links: ckpt_last.pt is then a copy of ckpt_best.pt
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    proc = run_main("train", *args, check=True)
    assert f"nothing to train: {run / 'ckpt_best.pt'} is at step 20" in proc.stdout  # the best is the last step's
    assert (run / "ckpt_best.pt").read_bytes() == best == (run / "ckpt_last.pt").read_bytes()


def test_resume_refuses_another_architecture_or_tokenizer(docs_corpus, docs_data, tmp_path):
    run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=5, save_interval=5), check=True)
    proc = run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=10, n_layer=3))
    assert_user_error(proc, "n_layer 2 -> 3", "HINT: drop --n_layer to continue that run", "new --out_dir")
    proc = run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=10, preset="138m", seq_len=64))
    assert_user_error(proc, "n_layer 2 -> 12", "HINT: drop --preset 138m to continue")  # (seq_len 64: the same)
    other = tmp_path / "other"  # the same corpus and vocabulary size, a tokenizer trained on another sample
    lm.prep(str(docs_corpus), str(other), vocab_size=1000, val_fraction=0.05, num_workers=1, sample_lines=3000,
            progress=False)
    assert_user_error(run_main("train", *train_args(tmp_path / "run", other, max_steps=10)),
                      "trained with another tokenizer", "--data_dir")
    # a checkpoint with 8 heads, resumed with the preset's 4: named as such, not as a derived value's conflict
    run_main("train", *train_args(tmp_path / "run8", docs_data, max_steps=5, save_interval=5, n_head=8), check=True)
    assert_user_error(run_main("train", *train_args(tmp_path / "run8", docs_data, max_steps=10)),
                      "n_head 8 -> 4")
    # a damaged ckpt_last.pt (a disk fault: ours are renamed into place whole): the hint says how to go on
    last, best = tmp_path / "run8" / "ckpt_last.pt", tmp_path / "run8" / "ckpt_best.pt"
    torn = last.read_bytes()[:5000]
    last.unlink()  # (a hard link to ckpt_best.pt's bytes)
    last.write_bytes(torn)
    assert_user_error(run_main("train", *train_args(tmp_path / "run8", docs_data, max_steps=10, n_head=8)),
                      "ckpt_last.pt' is not a loadable checkpoint (the file is cut short or damaged). HINT: remove it "
                      "to resume ckpt_best.pt, or pass a new --out_dir")
    last.unlink()  # as the hint says
    assert run_main("train", *train_args(tmp_path / "run8", docs_data, max_steps=10, n_head=8),
                    check=True).returncode == 0
    assert lm.load_checkpoint(str(last))["step"] == 10
    last.unlink()
    os.link(best, last)  # the best of the last save is that file, a hard link: a fault damages both
    with open(last, "r+b") as f:
        f.truncate(5000)
    assert_user_error(run_main("train", *train_args(tmp_path / "run8", docs_data, max_steps=20, n_head=8)),
                      "is not a loadable checkpoint", "HINT: restore it from a backup, or pass a new --out_dir")


def test_a_checkpoint_edited_by_hand_is_refused_on_resume_and_the_run_left_as_it_was(docs_data, tmp_path):
    run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=4, save_interval=2), check=True)
    last, log = tmp_path / "run" / "ckpt_last.pt", tmp_path / "run" / "metrics.jsonl"
    saved, logged = load(last), log.read_bytes()

    def moment_of_another_shape(c):
        c["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)  # (the fused step crashed the process)

    def nan_in_a_moment(c):  # (a divergence blamed on --lr, whatever --lr the resume was given)
        c["optimizer"]["state"][1]["exp_avg"].view(-1)[0] = math.nan
    edits = {"optimizer": lambda c: c.pop("optimizer"), "step": lambda c: c.update(step=-100),
             "best_val_loss": lambda c: c.update(best_val_loss="low"), "rng": lambda c: c.update(rng="x"),
             "model_config['n_layer']": lambda c: c["model_config"].update(n_layer="2"),
             "data['windows']": lambda c: c["data"].update(windows=-1),
             "data['global_batch']": lambda c: c["data"].update(global_batch=1.5),
             "data['seed']": lambda c: c["data"].update(seed=torch.tensor([1337, 1])),
             "data['val_of_best']": lambda c: c["data"].update(val_of_best={"windows": 16.0, "tokens": 5}),
             "an optimizer state that cannot be resumed (a moment of another shape": moment_of_another_shape,
             "an optimizer state that cannot be resumed (nan or inf in a moment)": nan_in_a_moment}
    for needle, edit in edits.items():
        edited = copy.deepcopy(saved)
        edit(edited)
        last.unlink()  # (a hard link to ckpt_best.pt's bytes)
        torch.save(edited, last)
        before = last.read_bytes()
        assert_user_error(run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=6)), needle,
                          "HINT: remove it to resume ckpt_best.pt")
        assert last.read_bytes() == before and log.read_bytes() == logged


def test_each_save_copies_the_tokenizer_the_run_started_with(docs_data, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(docs_data, data)
    read_meta = lm.read_meta

    def prep_again_after_the_start(data_dir):  # as if `prep` wrote another tokenizer into --data_dir meanwhile
        meta = read_meta(data_dir)
        (data / "tokenizer.model").write_bytes(b"another tokenizer")
        return meta
    monkeypatch.setattr(lm, "read_meta", prep_again_after_the_start)
    run_main("train", *train_args(tmp_path / "run", data, max_steps=2), check=True)
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == (docs_data / "tokenizer.model").read_bytes()


def test_the_schedule_line_counts_epochs_and_a_run_shorter_than_its_warmup_says_so(docs_data, tmp_path):
    out = run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=4, warmup_steps=8, eval_interval=4,
                                        save_interval=4, batch_size=16, grad_accum_steps=4), check=True).stdout
    n = json.loads((docs_data / "meta.json").read_text())["train"]["tokens"]
    assert f"at step 4, {4 * 64 * 64 / n:,.2f} epochs of train.bin ({n:,} tokens)" in out, out  # 64 rows of 64 a step
    assert "--warmup_steps 8 is not below --max_steps 4, so the learning rate only climbs, to 0.0015" in out, out
    assert metrics(tmp_path / "run")[-1]["lr"] == 0.0015


def test_resume_drops_a_torn_metrics_line_and_a_finished_run_has_nothing_to_train(docs_data, tmp_path):
    run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=10), check=True)
    with open(tmp_path / "run" / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 15, "lo\xff\xfe')  # what a crash in the middle of a write, or a disk fault, could leave
    run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=20), check=True)
    assert [r["step"] for r in metrics(tmp_path / "run")] == [5, 10, 15, 20]
    out = run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=20), check=True).stdout
    assert "nothing to train" in out and "raise --max_steps" in out
    assert [r["step"] for r in metrics(tmp_path / "run")] == [5, 10, 15, 20]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mappings (Linux)")
def test_a_resumed_run_holds_no_mapping_of_the_checkpoint_it_resumed_from(docs_data, tmp_path, monkeypatch):
    run = tmp_path / "run"  # else the file that the next save replaces stays on disk until the process ends
    run_main("train", *train_args(run, docs_data, max_steps=10), check=True)
    held, save = [], lm.save_checkpoint

    def mappings_at_save(*args):
        with open("/proc/self/maps") as f:
            held.append([line.split()[-1] for line in f if str(run) in line])
        save(*args)
    monkeypatch.setattr(lm, "save_checkpoint", mappings_at_save)
    run_main("train", *train_args(run, docs_data, max_steps=20), check=True)
    assert held == [[]]


def test_resume_notes_train_data_prepped_again_with_the_same_tokenizer(docs_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(docs_data, data)
    run_main("train", *train_args(tmp_path / "run", data, max_steps=10), check=True)
    meta = json.loads((data / "meta.json").read_text())  # as a prep with another --val_fraction would leave it
    tokens = np.fromfile(data / "train.bin", dtype=np.uint16)[:-2000]
    tokens.tofile(data / "train.bin")
    (data / "meta.json").write_text(json.dumps({**meta, "train": {**meta["train"], "tokens": len(tokens)}}))
    out = run_main("train", *train_args(tmp_path / "run", data, max_steps=20), check=True).stdout
    assert re.search(r"note: .*train.bin is not the one this run trained on \([\d,]+ windows, was [\d,]+: other text, "
                     r"or prepped again\)", out), out
    out = run_main("train", *train_args(tmp_path / "run", data, max_steps=30), check=True).stdout
    assert "resuming" in out and "prepped again" not in out


def test_a_val_loss_is_compared_with_the_best_only_when_measured_on_the_same_windows(docs_data, tmp_path,
                                                                                      monkeypatch):
    """The best checkpoint is the one of the lowest val loss, so a val loss is compared with the best's only when both
    were measured on the same windows: they do not depend on --seed, a resume with another global batch (a job
    requeued on fewer GPUs) keeps the run's set, and after a resume with another set (--eval_iters, val.bin) the next
    evaluation replaces the best, which a stop before that evaluation does not forget."""
    reads, get = [], lm.Batches.get
    monkeypatch.setattr(lm.Batches, "get", lambda self, step, rows, device: (
        reads.append(list(rows)) if self.seed is None else None, get(self, step, rows, device))[1])
    for seed in (1337, 7):
        lm.main(["train", *train_args(tmp_path / f"seed{seed}", docs_data, max_steps=10, seed=seed)])
    assert len(reads) == 8 and reads[:4] == reads[4:]  # 16 windows, 4 at a time, the same for both seeds
    run = tmp_path / "seed1337"
    out = run_main("train", *train_args(run, docs_data, max_steps=20, batch_size=2), check=True).stdout
    assert "val loss over 16 windows of val.bin" in out and "replaces ckpt_best.pt" not in out  # not 2 x 2 x 2 = 8
    out = run_main("train", *train_args(run, docs_data, max_steps=25, batch_size=2, eval_iters=4), check=True).stdout
    assert "val loss over 16 windows of val.bin" in out and "replaces ckpt_best.pt" not in out  # 4 x 2 x 2: the same
    best = load(run / "ckpt_best.pt")
    init = lm.StopSignal.__init__

    def asked_at_once(self):  # as a SIGTERM during the first step: saved at its end, before any evaluation
        init(self)
        self.requested = True
    with monkeypatch.context() as m:
        m.setattr(lm.StopSignal, "__init__", asked_at_once)
        out = run_main("train", *train_args(run, docs_data, max_steps=40, eval_iters=1), check=True).stdout
    assert (f"note: the val loss is measured on other windows than the best's {best['best_val_loss']:.4f} was (8 "
            f"windows, was 16), so the next evaluation's checkpoint replaces ckpt_best.pt") in out, out
    assert load(run / "ckpt_last.pt")["step"] == 26 and load(run / "ckpt_best.pt")["step"] == best["step"]
    out = run_main("train", *train_args(run, docs_data, max_steps=30), check=True).stdout  # the best's 16 windows again
    assert f"(best val loss {best['best_val_loss']:.4f})" in out and "replaces ckpt_best.pt" not in out, out
    run_main("train", *train_args(run, docs_data, max_steps=35, eval_iters=1), check=True)
    assert load(run / "ckpt_best.pt")["step"] == 35 and load(run / "ckpt_best.pt")["best_val_loss"] == \
        metrics(run)[-1]["val_loss"]  # whether lower or not
    ckpt = load(run / "ckpt_last.pt")  # (a new file renamed over it: ckpt_best.pt keeps its bytes)
    ckpt["data"]["val"] = {**ckpt["data"]["val"], "windows": 10**6}  # more than val.bin has: edited by hand
    torch.save(ckpt, run / "edited.pt")
    os.replace(run / "edited.pt", run / "ckpt_last.pt")
    out = run_main("train", *train_args(run, docs_data, max_steps=36, eval_iters=1), check=True).stdout
    assert "val loss over 8 windows of val.bin" in out and "replaces ckpt_best.pt" not in out, out


def test_a_resume_on_other_train_data_or_another_seed_reads_a_whole_first_pass_of_it(docs_data, tmp_path, monkeypatch):
    """The windows read so far count in the order of the data and seed they were read with: on a train.bin prepped
    again (more text) or with another --seed, going on from that count would leave part of the new order unread."""
    read, window = [], lm.Batches.window
    monkeypatch.setattr(lm.Batches, "window", lambda self, index: (
        read.append(index) if self.path.endswith("train.bin") else None, window(self, index))[1])
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(docs_data, data)
    run_main("train", *train_args(run, data, max_steps=10), check=True)  # 8 windows a step
    meta = json.loads((data / "meta.json").read_text())
    tokens = np.fromfile(data / "train.bin", dtype=np.uint16)[:-2000]
    tokens.tofile(data / "train.bin")
    (data / "meta.json").write_text(json.dumps({**meta, "train": {**meta["train"], "tokens": len(tokens)}}))
    read.clear()
    out = run_main("train", *train_args(run, data, max_steps=15), check=True).stdout
    assert "so a first pass over it starts here" in out and read[:40] == list(range(40))
    assert f"{15 * 8 * 64 / len(tokens) - 10 * 8 * 64 / len(tokens):,.2f} epochs of train.bin" in out, out
    read.clear()
    out = run_main("train", *train_args(run, data, max_steps=20, seed=7), check=True).stdout
    assert "with another --seed, a new pass over train.bin starts here" in out and read[:40] == list(range(40))
    assert load(run / "ckpt_last.pt")["data"]["windows"] == 40


def test_resume_accepts_new_max_steps_lr_dropout_and_batch(docs_data, tmp_path):
    run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=10), check=True)
    out = run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=20, lr=1e-3, dropout=0.1,
                                        batch_size=2), check=True).stdout
    assert "max_steps 10 -> 20" in out and "lr 0.003 -> 0.001" in out and "dropout 0.0 -> 0.1" in out
    assert "note: the global batch is now 4 sequences (was 8): the batches go on from the 80 windows read so far" in out
    assert "cosine from lr 0.001 to 0.0001 at step 20" in out
    assert load(tmp_path / "run" / "ckpt_last.pt")["step"] == 20


def test_a_resume_with_another_global_batch_goes_on_with_the_windows_not_yet_read(docs_data, tmp_path, monkeypatch):
    """A job requeued on half the GPUs with the same flags halves its global batch. Row g of step s can then no longer
    be window s x global batch + g, which would read again the windows of the run's second half (or, on more GPUs, skip
    windows): the run goes on from the windows read so far. A checkpoint saved before that count was kept goes on from
    step x its global batch, where such a run read on."""
    read, window = [], lm.Batches.window

    def recording(self, index):
        if self.path.endswith("train.bin"):
            read.append(index)
        return window(self, index)

    monkeypatch.setattr(lm.Batches, "window", recording)
    run = tmp_path / "run"
    run_main("train", *train_args(run, docs_data, max_steps=10), check=True)  # 4 x 2 = 8 windows a step
    assert read[:80] == list(range(80))
    ckpt = load(run / "ckpt_last.pt")
    assert ckpt["data"]["windows"] == 80
    del ckpt["data"]["windows"]  # as an older version saved it
    torch.save(ckpt, run / "ckpt_last.pt")
    read.clear()
    run_main("train", *train_args(run, docs_data, max_steps=20, batch_size=2), check=True)  # 4 a step
    assert read[:40] == list(range(80, 120))
    read.clear()
    run_main("train", *train_args(run, docs_data, max_steps=25), check=True)  # 8 a step again
    assert read[:40] == list(range(120, 160))
    assert load(run / "ckpt_last.pt")["data"]["windows"] == 160


@pytest.mark.parametrize("tie, n_kv_head, dropout, autocast", [(0, 4, 0.0, False), (1, 2, 0.1, True)])
def test_the_training_forward_is_one_graph_compiled_once(tie, n_kv_head, dropout, autocast):
    """--compile 1 traces the training forward as one graph (a graph break would run the rest eagerly, silently
    slower) and compiles it once for the whole run, bf16 autocast included. Compiled as train compiles it (no
    fullgraph, which would fold a .item() into the graph instead of breaking it), with a backend that counts graphs
    and does not run inductor; error_on_recompile raises at any recompile."""
    cfg = lm.ModelConfig(**lm.PRESETS["tiny"], vocab_size=320, n_kv_head=n_kv_head, tie_embeddings=tie)
    model = lm.Transformer(cfg, dropout)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                compiled(x, x.roll(-1, 1))[1].backward()
    assert counter.frame_count == 1
    assert all(p.grad is not None for p in model.parameters())


def test_a_file_in_a_folder_this_user_may_not_open_is_not_said_to_be_missing(tmp_path, monkeypatch):
    # (as `chmod 000 data` does to a user other than root: then nothing in it seems to exist)
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != str(tmp_path))
    with pytest.raises(lm.UserError, match=r"meta.json' cannot be read: the folder's permissions do not let this user "
                                           r"in. HINT: check them \(`ls -ld "):
        lm.require_file(str(tmp_path / "meta.json"), "data file", "run prep first")


def test_bad_train_input(docs_data, tmp_path):
    assert_user_error(run_cli("train", *train_args(tmp_path / "r", tmp_path / "nothing"), check=False),
                      "does not exist", "prep")
    assert_user_error(run_main("train", *train_args(tmp_path / "r", tmp_path / "my data")),  # a command that runs
                      f"--out_dir '{tmp_path / 'my data'}'` first")
    assert not (tmp_path / "r").exists()  # a typo in --data_dir leaves no empty --out_dir behind
    assert_user_error(run_main("train", *train_args(tmp_path / "r2", docs_data, seq_len=100000)),
                      "not one sequence", "--val_fraction")
    for flag, value, needle in (("n_head", 0, "must be positive and finite, got n_head 0"),
                                ("n_kv_head", 0, "n_kv_head 0"), ("ffn_mult", -1, "ffn_mult -1"),
                                ("ffn_mult", "inf", "ffn_mult inf"), ("ffn_mult", 0.001, "leaves the SwiGLU"),
                                ("ffn_mult", 1e30, "GiB in float32, more than this machine's"),  # (int64 overflow)
                                ("n_layer", 10 ** 8, "GiB in float32, more than this machine's"),  # (hours building)
                                ("min_lr", 1, "--min_lr must be at most --lr (0.003), got 1.0"),
                                ("seed", 1 << 63, "--seed must be below 2**63"),
                                ("dropout", 1.5, "--dropout must be in [0, 1)"),
                                ("lr", -1e-3, "--lr must be above 0"), ("grad_clip", -1, "--grad_clip must be 0"),
                                ("seed", -1, "--seed must be 0 or more, and finite, got -1"),
                                ("weight_decay", "inf", "--weight_decay must be 0 or more, and finite, got inf"),
                                ("lr", "inf", "--lr must be above 0 and finite"),
                                ("dist_timeout", 0, "--dist_timeout must be at least 1, got 0"),
                                ("batch_size", "x", "invalid int value"),
                                ("n_kv_head", 3, "n_head 4 is not a multiple of n_kv_head 3"),
                                ("head_dim", 15, "head_dim 15 must be even")):
        assert_user_error(run_main("train", *train_args(tmp_path / "r2", docs_data, **{flag: value})),
                          needle)
    assert not (tmp_path / "r2").exists()  # nor does a bad model shape, a split too short for it or a training flag
    (tmp_path / "file").write_text("x")
    assert_user_error(run_main("train", *train_args(tmp_path / "file", docs_data)),
                      "cannot be made a folder")
    assert_user_error(run_main("train", *train_args(tmp_path / "r", tmp_path / "file")),
                      "is not a folder")
    (tmp_path / "data").mkdir()
    for name in ("train.bin", "val.bin", "tokenizer.model"):
        (tmp_path / "data" / name).write_bytes((docs_data / name).read_bytes())
    meta = json.loads((docs_data / "meta.json").read_text())
    for edited in ('{"vocab_size": 1000', "null", json.dumps({**meta, "vocab_size": "1000"}),
                   json.dumps({**meta, "dtype": "bogus"}), json.dumps({**meta, "train": None})):  # torn or edited
        (tmp_path / "data" / "meta.json").write_text(edited)
        assert_user_error(run_main("train", *train_args(tmp_path / "r", tmp_path / "data")),
                          "is not a meta.json that prep wrote")
    (tmp_path / "data" / "meta.json").write_bytes((docs_data / "meta.json").read_bytes())
    (tmp_path / "data" / "val.bin").write_bytes((docs_data / "val.bin").read_bytes()[:-2])  # a prep killed mid-way
    assert_user_error(run_main("train", *train_args(tmp_path / "r", tmp_path / "data")),
                      "not the ones its meta.json describes")
    (tmp_path / "data" / "val.bin").write_bytes(b"\xff" * (docs_data / "val.bin").stat().st_size)  # bits gone bad
    assert_user_error(run_main("train", *train_args(tmp_path / "r", tmp_path / "data", max_steps=2, eval_interval=1)),
                      "val.bin holds token id 65535, beyond the 1000-token vocabulary", "HINT: run prep again")
    (tmp_path / "data" / "val.bin").write_bytes((docs_data / "val.bin").read_bytes())
    assert_user_error(run_main("train", *train_args(tmp_path / "r", docs_data, n_head=5, d_model=64)),
                      "not divisible", "head count that divides it (4 or 8)", "--head_dim")
    (tmp_path / "corpus.txt").write_text("a line of text\n")  # the corpus, where its prepped folder goes
    assert_user_error(run_main("train", *train_args(tmp_path / "r", tmp_path / "corpus.txt")),
                      f"pass the folder that prep wrote (`prep --text_path {tmp_path / 'corpus.txt'} --out_dir data`")
    assert (tmp_path / "corpus.txt").read_text() == "a line of text\n"
    assert_user_error(run_main("train", *train_args(tmp_path / "r", docs_data / "train.bin")),  # as nanoGPT's users do
                      f"HINT: pass the folder that holds it, --data_dir {docs_data}")
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "ckpt_last.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    for folder in ("r2", "hf"):  # a run's or a converted model's folder as the data: prep would refuse them
        assert_user_error(run_main("train", *train_args(tmp_path / "r3", tmp_path / folder)), "' does not exist. HINT: "
                          "that is a training run's or a model's folder: pass the folder that prep")
    assert (tmp_path / "data" / "meta.json").exists()  # (made above) then the folder the guide preps into is named
    assert_user_error(run_main("train", *train_args("r3", "r2"), cwd=tmp_path),
                      "model's folder: pass the folder that prep wrote, e.g. --data_dir ./data")
    assert_user_error(run_main("train", *train_args(tmp_path / "r2", docs_data)), "not a loadable")
    (tmp_path / "r2" / "ckpt_last.pt").write_bytes(b"")  # a save cut short by a full disk
    assert_user_error(run_main("train", *train_args(tmp_path / "r2", docs_data)), "not a loadable")


@pytest.mark.parametrize("name", ["meta.json", "train.bin", "val.bin", "tokenizer.model"])
def test_a_data_folder_missing_a_file_is_refused_with_the_prep_command(docs_data, tmp_path, name):
    data = tmp_path / "data"
    shutil.copytree(docs_data, data)
    (data / name).unlink()
    assert_user_error(run_main("train", *train_args(tmp_path / "run", data)), f"{name}' does not exist",
                      "prep --text_path corpus.txt")
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_that_a_later_prep_renamed_in_is_refused(docs_data, tmp_path):
    data = tmp_path / "data"  # a prep killed between its renames: the new tokenizer beside the old token files
    shutil.copytree(docs_data, data)
    (data / "tokenizer.model").write_bytes(b"the tokenizer of a later prep")
    assert_user_error(run_main("train", *train_args(tmp_path / "run", data, max_steps=1)),
                      "not the ones its meta.json describes")


def test_a_nan_loss_stops_a_float16_run_whose_scaler_would_skip_every_step(docs_data, tmp_path, monkeypatch):
    forward, calls = lm.Transformer.forward, []

    def nan_from_step_2(self, idx, targets=None, pos=None):
        logits, loss = forward(self, idx, targets, pos)
        if self.training:
            calls.append(1)
            if len(calls) > 2:  # two micro-steps a step
                loss = loss * math.nan
        return logits, loss
    monkeypatch.setattr(lm.Transformer, "forward", nan_from_step_2)
    proc = run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=6, dtype="float16"))
    assert_user_error(proc, "training diverged at step 2: loss nan")


def test_a_repeated_sigterm_is_the_same_request_and_restore_puts_the_handlers_back():
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        lm.StopSignal().restore()  # nothing requested: the handlers from before come back
        assert {s: signal.getsignal(s) for s in handlers} == handlers
        stop = lm.StopSignal()
        os.kill(os.getpid(), signal.SIGTERM)
        stop.since -= 4
        try:  # a scheduler's repeat seconds later, during a long save: not Ctrl-C's "stop at once"
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            pytest.fail("a repeated SIGTERM stopped the run at once")
        assert stop.requested
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


@pytest.mark.parametrize("tie, n_kv_head, head_dim", [(0, None, None), (1, None, None), (0, 2, 24)])
def test_parameter_count_and_flops_per_token_are_the_built_model_s(tie, n_kv_head, head_dim):
    """The config's count (the log's, and the check that a model fits in memory before it is built) is the built
    model's, and flops_per_token() is PaLM's count of its matrices."""
    cfg = lm.ModelConfig(**lm.PRESETS["tiny"], vocab_size=320, tie_embeddings=tie, n_kv_head=n_kv_head,
                         head_dim=head_dim)
    m = lm.Transformer(cfg)
    assert cfg.n_params == sum(p.numel() for p in m.parameters())  # a tied matrix once
    matrices = {id(mod.weight): mod.weight.numel() for mod in m.modules() if isinstance(mod, lm.Linear)}  # tied: once
    attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.seq_len  # scores and weighted values
    assert m.flops_per_token() == 6 * sum(matrices.values()) + attention


def test_logged_mfu_is_palm_s_flops_of_the_tokens_trained_against_the_peak(docs_data, tmp_path, monkeypatch):
    """The log's MFU (the README's MFU figures rest on it): flops_per_token() x tokens/s over the device's peak. A
    CPU has no peak, so one is given here."""
    monkeypatch.setattr(lm, "peak_bf16_flops", lambda device: 1e11)  # about 0.5 here
    run_main("train", *train_args(tmp_path / "run", docs_data, max_steps=10), check=True)
    per_token = lm.Transformer(lm.ModelConfig(**lm.PRESETS["tiny"], vocab_size=1000)).flops_per_token()
    rows = metrics(tmp_path / "run")
    assert len(rows) == 2 and all(row["mfu"] > 0 for row in rows)
    for row in rows:  # (the log rounds MFU to 4 decimals, tokens/s to an integer)
        assert math.isclose(row["mfu"], per_token * row["tokens_per_s"] / 1e11, abs_tol=1e-4), row


def test_mfu_uses_the_peak_of_the_gpus_own_variant(monkeypatch):
    for name, peak in (("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200 NVL", 835e12),
                       ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        assert lm.peak_bf16_flops(torch.device("cuda", 0)) == peak, name


def test_gpus_hidden_with_cuda_visible_devices_minus_one_mean_the_cpu(tmp_path, monkeypatch):
    (tmp_path / "nvidiactl").touch()
    monkeypatch.setattr(lm, "NVIDIA_DEVICE", str(tmp_path / "nvidiactl"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert lm.resolve_device("auto").type == "cpu"


def test_the_lock_names_this_process_and_another_users_process_counts_as_alive(tmp_path, monkeypatch):
    (tmp_path / ".train.lock").write_text("pid 1 on a node long gone, a longer line than ours\n")
    with lm.out_dir_lock(str(tmp_path)):
        assert (tmp_path / ".train.lock").read_text() == f"pid {os.getpid()} on {os.uname().nodename}\n"

    def not_permitted(pid, sig):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "kill", not_permitted)
    assert lm.pid_alive(1)  # its temporary files in a shared --out_dir are kept
