# convert_to_llama.py and test_llama_model.py: the converted folder must behave as our model and tokenizer do.
import dataclasses
import json
import math
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: it reads this once

import convert_to_llama as C  # noqa: E402  (conftest.py puts the repository root on sys.path)
import standalone_transformer_lm as S  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from conftest import assert_user_error, run_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

VOCAB = 2000
TINY = {**S.PRESETS["tiny"], "vocab_size": VOCAB}
ARCHS = {
    "mha-untied": {},
    "gqa-tied": dict(n_kv_head=2, tie_embeddings=1, rope_theta=500000.0, norm_eps=1e-6),  # int, as `train` may store it
    "head_dim-not-d_model/n_head": dict(head_dim=32),
    "n_head-not-dividing-d_model": dict(n_head=6, n_kv_head=3, head_dim=16),  # written as Mistral, see hf_config
    "long-context": dict(seq_len=4096, head_dim=64, n_head=1),  # the RoPE angles of the last positions too
}


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    from pydoc_data.topics import topics
    lines = [line for text in topics.values() for line in text.splitlines() if line.strip()]
    lines += ["中文字符测试 日本語のテキスト 한국어 😀🎉 Ünïcödé"] * 50  # some multi-byte pieces, so they get merged
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(S.train_tokenizer(lines, VOCAB))
    # for a second tokenizer of the same size
    path.with_name("lines.txt").write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sp(spm_path):
    return S.load_tokenizer(str(spm_path))


def make_run(run_dir: Path, spm_path: Path, **overrides) -> Path:
    """A run folder as `train` leaves it: ckpt_last.pt, ckpt_best.pt, pytorch_model.bin, config.json, tokenizer."""
    cfg = S.ModelConfig(**{**TINY, **overrides})
    torch.manual_seed(0)
    model = S.Transformer(cfg)
    with torch.no_grad():  # norms away from 1 and bigger weights: a misrouted tensor must change the logits
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ckpt = {"format": S.CKPT_FORMAT, "version": S.CKPT_VERSION, "model_config": dataclasses.asdict(cfg),
            "model": S.cpu_state_dict(model), "step": 7, "tokenizer_sha256": C.file_sha256(str(spm_path))}
    run_dir.mkdir(parents=True)
    S.save_checkpoint(str(run_dir), ["ckpt_best.pt", "ckpt_last.pt"], ckpt, spm_path.read_bytes())
    return run_dir


def convert(run_dir: Path, out: Path, *extra: str) -> Path:
    C.main(["--ckpt", str(run_dir / "ckpt_last.pt"), "--out", str(out), *extra])  # --spm: the copy beside it
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory, spm_path):
    tmp = tmp_path_factory.mktemp("conv")
    run_dir = make_run(tmp / "run", spm_path)
    return run_dir, convert(run_dir, tmp / "hf")


def run_cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_model_matches_ours(tmp_path, spm_path, sp, arch):
    run_dir = make_run(tmp_path / "run", spm_path, **ARCHS[arch])
    out = convert(run_dir, tmp_path / "hf")
    ours, _ = C.load_our_model(str(run_dir / "ckpt_last.pt"))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    c, h = ours.cfg, hf.config
    assert type(hf).__name__ == ("LlamaForCausalLM" if c.d_model % c.n_head == 0 else "MistralForCausalLM")
    assert (h.vocab_size, h.num_hidden_layers, h.hidden_size, h.num_attention_heads, h.num_key_value_heads,
            h.head_dim, h.intermediate_size, h.max_position_embeddings, h.rms_norm_eps, h.tie_word_embeddings,
            h.rope_parameters["rope_theta"], h.bos_token_id, h.eos_token_id, h.pad_token_id) == \
        (c.vocab_size, c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.head_dim, c.ffn_hidden, c.seq_len, c.norm_eps,
         c.tie_embeddings, c.rope_theta, sp.bos_id(), sp.eos_id(), sp.pad_id())
    ids = torch.randint(0, VOCAB, (3, c.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids)[0] - hf(ids).logits).abs().max().item() < 1e-4
        # HF's RoPE angles are ours: its cos and sin (torch's float32 ones) differ only in their last bit
        cos, sin = hf.model.rotary_emb(ids[:, :, None].float(), torch.arange(c.seq_len)[None])
        assert torch.allclose(cos[0], ours.rope_cos, rtol=0, atol=2e-7) and torch.allclose(sin[0], ours.rope_sin,
                                                                                          rtol=0, atol=2e-7)

    prompt = [sp.bos_id()] + sp.encode("The sun is")
    mine = S.generate(ours, prompt, 30, eos_id=sp.eos_id())[0]  # stops before eos
    theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=30)[0, len(prompt):].tolist()
    assert len(mine) > 0 and mine == [t for t in theirs if t != sp.eos_id()]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pool = list("abcdefghij XYZ  .,:;'\"\t\n\r\x00\x7f") + list("éüßñ中文日本語한국어😀🎉👍🏽\u00a0\u200b\u2028\ufeff▁")
    pool += [chr(c) for c in rng.sample(range(0x20, 0x30000), 300) if not 0xD800 <= c < 0xE000]  # mostly unseen
    return ["".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def test_autotokenizer_ids_equal_sentencepiece(converted, sp, tmp_path):
    from pydoc_data.topics import topics
    _, out = converted
    doc = topics["if"] + topics["for"]
    texts = C.PARITY_TEXTS + doc.splitlines() + [doc, " " + doc] + random_texts(3000)
    tok = AutoTokenizer.from_pretrained(out)
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == [sp.bos_id()] + sp.encode(text), repr(text)  # bos added, no eos, as LLaMA
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:]), repr(text)
        if "▁" not in text:  # SentencePiece itself reads a literal "▁" back as a space
            assert tok.decode(ids, skip_special_tokens=True) == text, repr(text)

    # what generate(**tok(text)) accepts; transformers 4.x's generic class also returns token_type_ids unless told
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["model_input_names"] == list(tok("x")) == ["input_ids", "attention_mask"]
    # transformers reads the post-processor; other readers of the folder (llama.cpp's converter) read these flags
    assert (config["add_bos_token"], config["add_eos_token"]) == (True, False)
    batch = tok(["The sun is", "a"], padding=True)["input_ids"]  # left padding with pad, for batched generation
    short = [sp.bos_id()] + sp.encode("a")
    assert batch[1] == [sp.pad_id()] * (len(batch[0]) - len(short)) + short

    no_spm = tmp_path / "no_spm"  # tokenizer.model beside tokenizer.json must not change what AutoTokenizer loads
    shutil.copytree(out, no_spm)
    (no_spm / "tokenizer.model").unlink()
    tok2 = AutoTokenizer.from_pretrained(no_spm)
    assert [tok2(t)["input_ids"] for t in C.PARITY_TEXTS] == [tok(t)["input_ids"] for t in C.PARITY_TEXTS]


def test_a_bare_hf_generate_samples_as_our_generate_does_by_default(converted, sp):
    from transformers import GenerationConfig
    hf, ours = GenerationConfig.from_pretrained(converted[1]), S.build_parser().parse_args(["generate", "--ckpt", "x"])
    assert hf.do_sample and (hf.temperature, hf.top_k) == (ours.temperature, ours.top_k)
    # it stops at the model's context, as ours does, and a caller's max_length (lm-eval passes one) is obeyed: a
    # max_new_tokens in the file would win over it
    model = AutoModelForCausalLM.from_pretrained(converted[1])
    assert hf.max_length == model.config.max_position_embeddings and hf.max_new_tokens is None
    out = model.generate(torch.tensor([[sp.bos_id()]]), max_length=5, suppress_tokens=[sp.eos_id()])
    assert out.shape == (1, 5)
    assert ours.top_p == ours.repetition_penalty == 1.0 and {hf.top_p, hf.repetition_penalty} <= {None, 1.0}  # off
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (S.BOS_ID, S.EOS_ID, S.PAD_ID)


def test_llama_tokenizer_class_would_break_parity(converted, sp, tmp_path):
    # Why tokenizer_config.json names the generic class: LlamaTokenizer swaps in a Metaspace pre-tokenizer that drops
    # the dummy prefix of a text starting with a space. The parity check must catch that.
    _, out = converted
    llama = tmp_path / "llama_class"
    shutil.copytree(out, llama)
    cfg = json.loads((llama / "tokenizer_config.json").read_text(encoding="utf-8"))
    (llama / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "LlamaTokenizer"}))
    tok = AutoTokenizer.from_pretrained(llama)
    assert tok(" leading space")["input_ids"] != [sp.bos_id()] + sp.encode(" leading space")
    with pytest.raises(S.UserError):
        C.check_tokenizer(lambda t: tok(t)["input_ids"], tok.decode, sp, add_bos=True)


def test_bfloat16_export_loads(tmp_path, spm_path, sp):
    run_dir = make_run(tmp_path / "run", spm_path)
    out = convert(run_dir, tmp_path / "hf", "--dtype", "bfloat16")
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    assert hf.generate(torch.tensor([[sp.bos_id()]]), do_sample=False, max_new_tokens=5).shape == (1, 6)
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    assert C.max_logit_diff(str(out), C.load_our_model(str(run_dir / "ckpt_last.pt"))[0], ids) < 1e-4


@pytest.mark.parametrize("name", ["ckpt_best.pt", "pytorch_model.bin"])
def test_best_checkpoint_and_export_give_the_same_weights(converted, tmp_path, name):
    run_dir, out = converted  # out: ckpt_last.pt converted, when it was also the best checkpoint and the export
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    later = torch.load(run / "ckpt_last.pt", weights_only=True)  # then training went on: a ckpt_last.pt of its own
    later["model"] = {k: v + 1 for k, v in later["model"].items()}
    (run / "ckpt_last.pt").unlink()
    torch.save(later, run / "ckpt_last.pt")
    for ckpt, hf in ((run / name, tmp_path / "hf"), (run / "ckpt_last.pt", tmp_path / "hf_last")):
        C.main(["--ckpt", str(ckpt), "--out", str(hf)])
    want, got = load_file(out / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)  # the file it was given
    last = load_file(tmp_path / "hf_last" / "model.safetensors")  # (and not the folder's ckpt_last.pt)
    assert not any(torch.equal(want[k], last[k]) for k in want)


class Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # unpickling this creates the marker file
        return open, (self.marker, "w")


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused_without_running(tmp_path, spm_path, writer):
    armed = tmp_path / "armed"  # the payload works: plain unpickling runs it
    pickle.loads(pickle.dumps(Evil(str(armed))))
    assert armed.exists()

    marker, evil = tmp_path / "pwned", tmp_path / "ckpt_last.pt"
    if writer == "pickle":
        evil.write_bytes(pickle.dumps({"model": Evil(str(marker)), "model_config": {}}))
    else:
        torch.save({"model": Evil(str(marker)), "model_config": {}, "step": 0}, evil)
    r = run_cli("convert_to_llama.py", "--ckpt", str(evil), "--spm", str(spm_path), "--out", "hf", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error:") and "Traceback" not in r.stderr
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_non_empty_out_needs_force_and_failed_verify_keeps_old_folder(converted, tmp_path, capsys, monkeypatch):
    run_dir, _ = converted
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("an earlier conversion's")
    with pytest.raises(SystemExit) as e:
        convert(run_dir, out)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--force" in err and (out / "config.json").exists()

    with monkeypatch.context() as m, pytest.raises(SystemExit) as e:  # a failed verification replaces nothing
        m.setattr(C, "max_logit_diff", lambda *a: 0.5)
        convert(run_dir, out, "--force", "--verify")
    assert e.value.code == 1 and capsys.readouterr().err.startswith("error: the converted model's logits differ")
    assert os.listdir(out) == ["config.json"] and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]

    with monkeypatch.context() as m:  # NaN logits are no match either
        m.setattr(C, "max_logit_diff", lambda *a: math.nan)
        with pytest.raises(SystemExit) as e:
            convert(run_dir, out, "--force", "--verify")
        assert e.value.code == 1 and capsys.readouterr().err.startswith("error:") and os.listdir(out) == ["config.json"]
    convert(run_dir, out, "--force", "--verify")
    assert "verified:" in capsys.readouterr().out
    assert (out / "config.json").read_text() != "an earlier conversion's" and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folders left behind

    (tmp_path / "link").symlink_to(out)  # --out a link to a folder: the folder is replaced, the link stays
    (out / "config.json").write_text("old")
    convert(run_dir, tmp_path / "link", "--force")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link" / "model.safetensors").exists()
    assert (out / "config.json").read_text() != "old" and sorted(p.name for p in tmp_path.iterdir()) == ["hf", "link"]


@pytest.mark.parametrize("mistake", ["missing", "directory", "truncated", "text", "bin-without-config",
                                     "vocab-mismatch", "out-is-file", "bad-flag-value", "other-tokenizer",
                                     "out-holds-the-run", "float16-overflow", "config-not-json", "config-types",
                                     "config-other-shape", "config-ties-two-matrices", "bin-other-tokenizer",
                                     "tol-nan", "out-under-a-file"])
def test_user_mistakes_give_one_error_line(converted, tmp_path, spm_path, capsys, mistake):
    run_dir, _ = converted
    ckpt, out, extra = run_dir / "ckpt_last.pt", tmp_path / "hf", []
    if mistake == "missing":
        ckpt = tmp_path / "nope.pt"
    elif mistake == "directory":  # (a run's folder stands for its ckpt_last.pt)
        ckpt = tmp_path / "folder"
        ckpt.mkdir()
    elif mistake in ("truncated", "text"):
        data = (run_dir / "ckpt_last.pt").read_bytes()
        ckpt = tmp_path / "bad.pt"
        ckpt.write_bytes(data[: len(data) // 2] if mistake == "truncated" else b"not a checkpoint\n")
    elif mistake == "bin-without-config":
        ckpt = tmp_path / "pytorch_model.bin"
        shutil.copy(run_dir / "pytorch_model.bin", ckpt)
    elif mistake.startswith("config-"):  # the export with a config.json beside it that is broken or edited
        ckpt = tmp_path / "pytorch_model.bin"
        shutil.copy(run_dir / "pytorch_model.bin", ckpt)
        config = json.loads((run_dir / "config.json").read_text())
        edit = {"config-types": {"n_layer": "2"}, "config-other-shape": {"d_model": 96},
                "config-ties-two-matrices": {"tie_embeddings": True}}.get(mistake, {})
        (tmp_path / "config.json").write_text("{" if mistake == "config-not-json" else json.dumps({**config, **edit}))
    elif mistake == "vocab-mismatch":
        ckpt = make_run(tmp_path / "run", spm_path, vocab_size=VOCAB + 8) / "ckpt_last.pt"
    elif mistake == "out-is-file":
        out.write_text("")
    elif mistake == "out-under-a-file":
        (tmp_path / "file").write_text("keep")
        out = tmp_path / "file" / "hf"
    elif mistake == "bad-flag-value":
        extra = ["--tol", "small"]
    elif mistake == "tol-nan":  # no difference is within it: all the work, then a failed check
        extra = ["--verify", "--tol", "nan"]
    elif mistake.endswith("other-tokenizer"):  # as many pieces, other text: what a later prep leaves in ./data
        lines = [line.upper() for line in spm_path.with_name("lines.txt").read_text(encoding="utf-8").splitlines()]
        (tmp_path / "other.model").write_bytes(S.train_tokenizer(lines, VOCAB))
        extra = ["--spm", str(tmp_path / "other.model")]
        if mistake == "bin-other-tokenizer":  # the export, checked against the tokenizer.model that train put beside it
            for name in ("pytorch_model.bin", "config.json", "tokenizer.model"):
                shutil.copy(run_dir / name, tmp_path / name)
            ckpt = tmp_path / "pytorch_model.bin"
    elif mistake == "out-holds-the-run":  # --force would replace the folder and the checkpoint with it
        ckpt, out, extra = make_run(tmp_path / "run", spm_path) / "ckpt_last.pt", tmp_path, ["--force"]
    elif mistake == "float16-overflow":
        ckpt = make_run(tmp_path / "run", spm_path, d_model=64) / "ckpt_last.pt"
        state = torch.load(ckpt, weights_only=True)
        state["model"]["norm.weight"][0] = 1e6
        torch.save(state, ckpt)
        extra = ["--dtype", "float16"]
    with pytest.raises(SystemExit) as e:
        C.main(["--ckpt", str(ckpt), "--spm", str(spm_path), "--out", str(out)] + extra)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and err.count("\n") == 1, err
    needle = {"missing": "does not exist", "directory": "is a directory", "truncated": "cut short or damaged",
              "text": "not a torch.save archive", "bin-without-config": "config.json' does not exist",
              "vocab-mismatch": "has 2000 pieces but the model's vocabulary is 2008", "out-is-file": "is a file",
              "bad-flag-value": "--tol: invalid float value", "other-tokenizer": "is not the one",
              "bin-other-tokenizer": "is not the one",
              "out-holds-the-run": "which replacing it would delete", "float16-overflow": "not finite in float16",
              "config-not-json": "is not the config.json that `train` wrote",
              "config-types": "do not fit together (TypeError", "config-other-shape": "size mismatch for",
              "config-ties-two-matrices": "the config ties lm_head to the embedding",
              "tol-nan": "--tol must be 0 or more, got nan", "out-under-a-file": "cannot be written (Not a directory)"}
    assert needle[mistake] in err, err
    assert mistake in ("out-is-file", "out-holds-the-run") or not out.exists()
    assert mistake != "out-holds-the-run" or ckpt.exists()


def test_test_llama_model_generates_and_compares(converted, tmp_path, spm_path, monkeypatch):
    import test_llama_model as T
    run_dir, out = converted
    r = run_cli("test_llama_model.py", str(out), "--ckpt", str(run_dir / "ckpt_last.pt"), "--max_new_tokens", "8",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "greedy : The sun is" in r.stdout and "sampled: The sun is" in r.stdout
    assert "largest logit difference" in r.stdout
    r = run_main(str(out), "--temperature", "0", "--max_new_tokens", "4", main=T.main)  # then in this process
    assert r.returncode == 0 and "greedy : The sun is" in r.stdout and "sampled" not in r.stdout, r.stderr
    r = run_main(str(out), "--ckpt", run_dir, "--max_new_tokens", "2", main=T.main)  # the run's folder: ckpt_last.pt
    assert r.returncode == 0 and "largest logit difference vs " + str(run_dir / "ckpt_last.pt") in r.stdout, r.stderr
    with monkeypatch.context() as m:  # NaN logits are no match
        m.setattr(T, "max_logit_diff", lambda *a: math.nan)
        r = run_main(str(out), "--ckpt", str(run_dir / "ckpt_last.pt"), "--max_new_tokens", "2", main=T.main)
        assert r.returncode == 1 and r.stderr.startswith("error:") and "logits differ" in r.stderr, r.stderr

    torn = tmp_path / "torn"  # a copy cut short: one error line, no traceback
    shutil.copytree(out, torn)
    weights = (torn / "model.safetensors").read_bytes()
    (torn / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    r = run_main(str(torn), main=T.main)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1].startswith("error:") and "does not load with transformers" in r.stderr

    for given, what in ((run_dir, "a training run's folder"), (run_dir / "ckpt_last.pt", "a file")):  # to convert
        assert_user_error(run_main(str(given), main=T.main), f"{str(given)!r} is {what}, not a converted model "
                          f"folder. HINT: run `python ", f"convert_to_llama.py --ckpt {run_dir / 'ckpt_last.pt'} --out")
    gpt2 = tmp_path / "gpt2"  # another model's folder: its weights would not load into ours, random ones would
    shutil.copytree(out, gpt2)
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 64}))
    for extra in ((), ("--ckpt", str(run_dir / "ckpt_last.pt"))):
        assert_user_error(run_main(str(gpt2), *extra, main=T.main), "holds a gpt2 model, where convert_to_llama.py "
                          "writes llama or mistral ones")
    other = make_run(tmp_path / "other", spm_path, vocab_size=VOCAB + 8, seq_len=32)  # not the folder's checkpoint
    r = run_main(str(out), "--ckpt", str(other / "ckpt_last.pt"), main=T.main)
    assert_user_error(r, "was not converted from", ": vocabulary 2000 against 2008, context 64 against 32 (the folder")
    assert_user_error(run_main(str(out), "--top_k", "-3", main=T.main), "--top_k must be at least 1, got -3")
    for temperature in ("nan", "1e-40"):  # HF's sampling divides by it too: inf logits, and nothing to sample
        assert_user_error(run_main(str(out), "--temperature", temperature, main=T.main),
                          "--temperature must be 0 (greedy only), or finite and at least 1e-6")
    assert_user_error(run_main(str(out), "--seed", str(1 << 64), main=T.main), "--seed must be in [0, 2**63)")
    assert_user_error(run_main(str(out), "--tol", "nan", main=T.main), "--tol must be 0 or more, got nan")
    r = run_main(str(out), "--prompt", "word " * 100, main=T.main)  # one line, no transformers warning before it
    assert_user_error(r, "the model's context is 64")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr

    damaged = tmp_path / "damaged"  # a nan weight; then another conversion's tokenizer, of a larger vocabulary
    shutil.copytree(out, damaged)
    w = load_file(damaged / "model.safetensors")
    w["model.norm.weight"][0] = math.nan
    save_file(w, damaged / "model.safetensors", metadata={"format": "pt"})
    assert_user_error(run_main(str(damaged), main=T.main), "holds non-finite weights (nan or inf in model.norm.weight)")
    shutil.copy(out / "model.safetensors", damaged / "model.safetensors")
    tokenizer = json.loads((damaged / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["<an extra piece>"] = VOCAB
    (damaged / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert_user_error(run_main(str(damaged), main=T.main), f"holds a tokenizer of {VOCAB + 1} tokens beside a model "
                      f"of {VOCAB}")

    broken = tmp_path / "broken"  # the comparison must notice a wrong weight: swap q and k of layer 0
    shutil.copytree(out, broken)
    w = load_file(broken / "model.safetensors")
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    w[q], w[k] = w[k].clone(), w[q].clone()
    save_file(w, broken / "model.safetensors", metadata={"format": "pt"})
    r = run_main(str(broken), "--ckpt", str(run_dir / "ckpt_last.pt"), "--max_new_tokens", "4", main=T.main)
    assert r.returncode == 1 and r.stderr.splitlines()[-1].startswith("error: logits differ by up to"), r.stderr
    assert "HINT: if it was converted from another checkpoint of this shape" in r.stderr  # (a user's likelier slip)


def test_the_check_and_test_llama_model_need_no_kernels_from_the_hub(converted, tmp_path, monkeypatch):
    """From version 5.25, transformers' from_pretrained swaps in kernels fetched from the Hub unless told not to: a GPU
    node without network, or without the `kernels` package, must not stop `--verify` or test_llama_model.py. Here
    from_pretrained acts as 5.25 does where those kernels cannot be had, then as a transformers that loads nothing."""
    import test_llama_model as T
    load = AutoModelForCausalLM.from_pretrained.__func__

    def like_5_25_without_kernels(cls, *args, use_kernels=None, **kwargs):
        if use_kernels is not False:
            raise ValueError("Kernels are not available. Please install a compatible version")
        return load(cls, *args, use_kernels=use_kernels, **kwargs)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(like_5_25_without_kernels))
    run_dir, _ = converted
    out = convert(run_dir, tmp_path / "hf", "--verify")
    r = run_main(str(out), "--ckpt", str(run_dir / "ckpt_last.pt"), "--max_new_tokens", "4", main=T.main)
    assert r.returncode == 0 and "greedy : The sun is" in r.stdout and "largest logit difference" in r.stdout, r.stderr
    # and where transformers cannot load a folder at all, --verify says so in one line and writes nothing
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(lambda cls, *a, **k: 1 / 0))
    r = run_main("--ckpt", str(run_dir / "ckpt_last.pt"), "--out", str(tmp_path / "hf2"), "--verify", main=C.main)
    assert r.returncode == 1 and "Traceback" not in r.stderr and not (tmp_path / "hf2").exists(), r.stderr
    assert r.stderr.strip().endswith("(ZeroDivisionError: division by zero)") and "cannot load" in r.stderr


@pytest.mark.parametrize("script, missing, args", [
    ("convert_to_llama.py", "safetensors", ["--ckpt", "run/ckpt_last.pt", "--out", "hf_new"]),
    ("convert_to_llama.py", "tokenizers", ["--ckpt", "run/ckpt_last.pt", "--out", "hf_new"]),
    ("convert_to_llama.py", "transformers", ["--ckpt", "run/ckpt_last.pt", "--out", "hf_new", "--verify"]),
    ("test_llama_model.py", "transformers", ["hf"]),
])
def test_a_missing_conversion_package_is_one_error_line(converted, script, missing, args):
    """The guide's first install is torch, sentencepiece, tqdm and numpy: enough to train, not to convert."""
    run_dir, _ = converted
    code = (f"import runpy, sys; sys.modules[{missing!r}] = None; sys.path.insert(0, {str(ROOT)!r}); "
            f"sys.argv = [{script!r}, *{args!r}]; runpy.run_path({str(ROOT / script)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=run_dir.parent, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and missing in lines[0] and "HINT: pip install -r requirements.txt" in lines[0], lines
    assert not (run_dir.parent / "hf_new").exists()  # refused before anything is written


def test_converting_needs_no_protobuf(converted):
    """The piece types are read from the model's bytes: sentencepiece's generated protobuf module refuses every
    protobuf but the version it was generated for (requirements.txt allows any from 3.20)."""
    run_dir, _ = converted
    code = (f"import runpy, sys; sys.modules['google'] = sys.modules['google.protobuf'] = None; "
            f"sys.path.insert(0, {str(ROOT)!r}); sys.argv = ['convert_to_llama.py', '--ckpt', 'run', '--out', "
            f"'hf_noproto']; runpy.run_path({str(ROOT / 'convert_to_llama.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=run_dir.parent, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir.parent / "hf_noproto" / "tokenizer.json").exists()


def test_config_fields_that_other_readers_use_and_a_readable_tagged_weights_file(tmp_path, spm_path):
    from safetensors import safe_open
    run = make_run(tmp_path / "run", spm_path, n_kv_head=2, rope_theta=500000.0, seq_len=128)
    out = convert(run, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 500000.0  # transformers 4.x and llama.cpp
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 128
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(out / "model.safetensors").st_mode & 0o777 == 0o666 & ~umask  # not owner-only in a shared folder
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers 4.x refuses a file without it


def test_out_as_the_working_folder_is_refused_even_with_force(converted, tmp_path, monkeypatch, capsys):
    run_dir, _ = converted
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("precious")
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit) as e:
        C.main(["--ckpt", str(run_dir / "ckpt_last.pt"), "--out", ".", "--force"])
    assert e.value.code == 2 and "which replacing it would delete" in capsys.readouterr().err
    assert (work / "notes.txt").read_text() == "precious"


def test_verify_compares_positions_enough_to_see_a_swap_of_q_and_k(converted, sp, tmp_path):
    run_dir, out = converted
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    w = load_file(broken / "model.safetensors")
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    w[q], w[k] = w[k].clone(), w[q].clone()  # invisible at one position: one key, attention weight 1
    save_file(w, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(C.VerificationError):
        C.verify(str(broken), C.load_our_model(str(run_dir / "ckpt_last.pt"))[0], sp, 1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# More of the folder's contract, and of test_llama_model.py's


def test_a_mistral_folder_attends_to_the_whole_context(tmp_path, spm_path):
    """n_head not dividing d_model is written as Mistral, whose config defaults to a 4,096-token sliding window: the
    folder turns it off, or a model trained on a longer context would attend to its last 4,096 tokens alone."""
    from transformers import AutoConfig
    out = convert(make_run(tmp_path / "run", spm_path, **ARCHS["n_head-not-dividing-d_model"]), tmp_path / "hf")
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "mistral" and config.sliding_window is None


def test_special_tokens_for_transformers_and_for_readers_of_tokenizer_json_alone(converted, sp):
    from tokenizers import Tokenizer
    _, out = converted
    tok = AutoTokenizer.from_pretrained(out)
    ids = (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id())
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == ids
    # a pair as LLaMA's tokenizer frames it: bos before each text
    assert tok("The sun", "is")["input_ids"] == [sp.bos_id(), *sp.encode("The sun"), sp.bos_id(), *sp.encode("is")]
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))  # `tokenizers` alone (Rust, tokenizers.js, servers)
    assert raw.decode([*ids, *sp.encode("The sun is")], skip_special_tokens=True) == "The sun is"
    # "</s>" in a text is text, as it was in training (AutoTokenizer's ids equal SentencePiece's on every string). For
    # a fine-tuning recipe that appends eos_token to each text (or a chat template) the README says to load with
    # split_special_tokens=False, which reads special-token text as Meta's LLaMA tokenizers do, and tokenizer.json
    # alone does
    assert tok("Hi" + tok.eos_token)["input_ids"] == [sp.bos_id(), *sp.encode("Hi</s>")]
    framed = [sp.bos_id(), *sp.encode("Hi"), sp.eos_id()]
    loose = AutoTokenizer.from_pretrained(out, split_special_tokens=False)
    assert loose("Hi" + loose.eos_token)["input_ids"] == raw.encode("Hi</s>").ids == framed
    loose.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    assert loose.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True, return_dict=False) == framed


def test_the_parity_check_compares_decoded_text_too(sp):
    C.check_tokenizer(sp.encode, sp.decode, sp)  # SentencePiece agrees with itself
    with pytest.raises(S.UserError, match="decodes 'tab"):  # the right ids, a decoder that loses the tab
        C.check_tokenizer(sp.encode, lambda ids: sp.decode(ids).replace("\t", " "), sp)


def test_an_empty_out_and_a_run_folder_named_like_out_need_no_force(converted, tmp_path):
    run_dir, _ = converted
    run = tmp_path / "hf-run"  # its path starts with --out's, but it is not inside --out
    shutil.copytree(run_dir, run)
    (tmp_path / "hf").mkdir()  # made beforehand and empty: nothing to replace
    convert(run, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists() and (run / "ckpt_last.pt").exists()


def test_converting_without_verify_needs_no_transformers(converted, tmp_path, capsys, monkeypatch):
    run_dir, _ = converted
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    convert(run_dir, tmp_path / "hf")
    assert "verified:" not in capsys.readouterr().out and (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.parametrize("mistake", ["tied-config-without-the-embedding", "checkpoint-without-model-config"])
def test_more_checkpoints_that_do_not_fit_give_one_error_line(converted, tmp_path, capsys, mistake):
    run_dir, _ = converted
    state = torch.load(run_dir / "pytorch_model.bin", weights_only=True)
    if mistake == "tied-config-without-the-embedding":  # the export's config edited to tie, or another tool's names
        ckpt = tmp_path / "pytorch_model.bin"
        del state["embed_tokens.weight"]
        torch.save(state, ckpt)
        config = json.loads((run_dir / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, "tie_embeddings": True}))
    else:  # weights and a step, as another trainer saves them
        ckpt = tmp_path / "ckpt.pt"
        torch.save({"model": state, "step": 7}, ckpt)
    with pytest.raises(SystemExit) as e:
        C.main(["--ckpt", str(ckpt), "--spm", str(run_dir / "tokenizer.model"), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and err.count("\n") == 1, err
    assert {"tied-config-without-the-embedding": "do not fit together (KeyError",
            "checkpoint-without-model-config": "holds neither a training checkpoint nor a state_dict"}[mistake] in err


@pytest.mark.parametrize("flag", ["--top_k", "--max_new_tokens"])
def test_test_llama_model_refuses_zero_for_flags_that_need_one(converted, flag):
    import test_llama_model as T
    assert_user_error(run_main(str(converted[1]), flag, "0", main=T.main), f"{flag} must be at least 1, got 0")


def test_ctrl_c_in_test_llama_model_is_one_line(converted, monkeypatch):
    import test_llama_model as T

    def ctrl_c(*args, **kwargs):  # as Ctrl-C while it generates
        raise KeyboardInterrupt
    monkeypatch.setattr(T, "max_logit_diff", ctrl_c)
    r = run_main(str(converted[1]), "--ckpt", str(converted[0] / "ckpt_last.pt"), main=T.main)
    assert (r.returncode, r.stderr) == (130, "error: interrupted\n")


def test_test_llama_model_samples_by_its_seed_and_top_k(converted):
    import test_llama_model as T

    def texts(*flags):  # (greedy, sampled)
        r = run_main(str(converted[1]), "--max_new_tokens", "8", "--temperature", "1", *flags, main=T.main)
        assert r.returncode == 0, r.stderr
        greedy, sampled = r.stdout.split("greedy : ", 1)[1].split("\nsampled: ", 1)
        return greedy, sampled.removesuffix("\n")
    greedy, sampled = texts("--seed", "5")
    assert sampled != greedy  # (so that the next lines can tell)
    assert texts("--seed", "5") == (greedy, sampled)  # same seed, same text
    assert texts("--top_k", "1") == (greedy, greedy)  # only the most likely token: greedy decoding


def test_test_llama_model_keeps_prompt_and_continuation_within_the_context(converted, sp, monkeypatch):
    import test_llama_model as T
    from transformers import GenerationMixin
    words = lambda n: " ".join(["the"] * n)  # noqa: E731
    assert len(sp.encode(words(63))) == 63  # one token a word
    assert_user_error(run_main(str(converted[1]), "--prompt", words(63), main=T.main),  # with bos: 64 tokens
                      "the prompt is 64 tokens, the model's context is 64")
    asked, generate = [], GenerationMixin.generate
    monkeypatch.setattr(GenerationMixin, "generate",
                        lambda self, *a, **k: asked.append(k["max_new_tokens"]) or generate(self, *a, **k))
    r = run_main(str(converted[1]), "--prompt", words(60), "--temperature", "0", main=T.main)  # 61 tokens
    assert r.returncode == 0 and asked == [3], (r.stderr, asked)  # not --max_new_tokens' 50: past the context


def test_test_llama_model_refuses_a_checkpoint_of_another_shape(converted, tmp_path, spm_path):
    import test_llama_model as T
    other = make_run(tmp_path / "other", spm_path, seq_len=32)  # all else as the folder's
    r = run_main(str(converted[1]), "--ckpt", str(other / "ckpt_last.pt"), main=T.main)
    assert_user_error(r, "was not converted from", ": context 64 against 32 (the folder's, then the checkpoint's)")
    for shape, want in (({"n_kv_head": 2}, ": kv heads 4 against 2 ("), ({"n_head": 2}, ": heads 4 against 2, kv heads "
                        "4 against 2, head size 16 against 32 (")):
        other = make_run(tmp_path / str(shape), spm_path, **shape)
        assert_user_error(run_main(str(converted[1]), "--ckpt", str(other / "ckpt_last.pt"), main=T.main),
                          "was not converted from", want)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_force_swaps_the_folder_in_waits_for_the_new_one(converted, tmp_path, monkeypatch, capsys,
                                                                         signum):
    run_dir, ref = converted
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model.safetensors").write_text("an earlier conversion")
    replace = os.replace

    def signalled(src, dst):  # right after the old folder moves aside: --out is missing
        replace(src, dst)
        os.kill(os.getpid(), signum)
    monkeypatch.setattr(os, "replace", signalled)
    with pytest.raises(SystemExit) as e:
        convert(run_dir, out, "--force")
    assert e.value.code == 130 and capsys.readouterr().err.strip().endswith("error: interrupted")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())  # the new one, whole
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # the old one gone, nothing half-built left


def test_force_replaces_an_earlier_conversion_not_a_model_card_a_run_prepped_data_or_a_subfolder(converted, tmp_path,
                                                                                                 capsys):
    """Only the files a conversion writes are replaced: a model card written beside them, another run's or prepped
    data's files, a subfolder, or any file of the user's stops --force, with or without an earlier conversion."""
    run_dir, ref = converted
    for name, content in (("train.bin", "data"), ("ckpt_best.pt", "run"), ("data", None), ("README.md", "card"),
                          ("config.json", None)):  # a folder of that name
        out = tmp_path / f"out-{name}"
        out.mkdir()
        (out / name).mkdir() if content is None else (out / name).write_text(content)
        with pytest.raises(SystemExit) as e:
            convert(run_dir, out, "--force")
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"holds {name}, which a converted folder does not" in err, err
        assert sorted(p.name for p in out.iterdir()) == [name]
    out = tmp_path / "hub"  # a conversion, and the model card written for it since
    shutil.copytree(ref, out)
    (out / "README.md").write_text("card")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as e:
        convert(run_dir, out, "--force")
    assert e.value.code == 2 and "holds README.md" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_only_folders_that_a_killed_conversion_left_are_removed(converted, tmp_path):
    run_dir, ref = converted
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],  # alive until told, however
                            stdin=subprocess.PIPE)  # slow the conversion
    out = tmp_path / "hf"
    shutil.copytree(ref, out)

    def folder(path, partial=None):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"weights")
        if partial:
            (path / C.PARTIAL).write_text(f"{partial[0]} {partial[1]}\n")
        return path
    host = socket.gethostname()
    left = [folder(tmp_path / f"hf.tmp{dead.pid}", (host, dead.pid)), folder(out / f".tmp{dead.pid}", (host, dead.pid)),
            folder(tmp_path / f"hf.old{dead.pid}", (host, dead.pid))]  # the folder it was replacing, marked
    kept = [folder(tmp_path / f"hf.tmp{live.pid}", (host, live.pid)),  # a live conversion's
            folder(tmp_path / f"hf.tmp{dead.pid}0", ("another-host", dead.pid)),  # a shared volume's
            folder(tmp_path / "hf.old20240611"), folder(tmp_path / "hf.tmp3"),  # the user's own, named alike
            folder(tmp_path / "hf.old20240611120000"), folder(tmp_path / "hf2.tmp3", (host, dead.pid))]
    try:
        convert(run_dir, out, "--force")
    finally:
        live.kill()
        live.communicate()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())  # no .partial left in it
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)


def test_a_mount_point_as_out_is_filled_in_place(converted, tmp_path, monkeypatch, capsys):
    run_dir, ref = converted
    out = tmp_path / "volume"  # a container's volume: it cannot be renamed, nor a folder renamed over it
    out.mkdir()
    (out / "lost+found").mkdir()  # a fresh ext4 volume's: neither a reason to need --force nor ours to delete
    (out / "lost+found" / "x").write_text("recovered")
    inode = out.stat().st_ino
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.path.realpath(p) == str(out) or real_ismount(p))
    convert(run_dir, out)
    (out / "generation_config.json").write_text("an earlier conversion")
    with pytest.raises(SystemExit) as e:
        convert(run_dir, out)
    assert e.value.code == 2 and "--force" in capsys.readouterr().err
    assert (out / "generation_config.json").read_text() == "an earlier conversion"
    convert(run_dir, out, "--force")
    assert out.stat().st_ino == inode and (out / "lost+found" / "x").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(["lost+found", *(p.name for p in ref.iterdir())])
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]


@pytest.mark.parametrize("failure", ["disk-full", "safetensors-disk-full"])
def test_a_full_disk_is_one_error_line_and_leaves_no_folder(converted, tmp_path, monkeypatch, capsys, failure):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        if failure == "disk-full":
            raise OSError(28, "No space left on device", args[1])
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")
    monkeypatch.setattr(C, "save_file", full)
    with pytest.raises(SystemExit) as e:
        convert(converted[0], tmp_path / "hf")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "No space left on device" in err, err
    assert err.rstrip().endswith("HINT: check the path, its permissions and the free space")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_stops_a_conversion_and_removes_the_folder_it_was_building(converted, tmp_path):
    run_dir, ref = converted
    out = tmp_path / "hf"
    shutil.copytree(ref, out)  # the folder --force would replace
    proc = subprocess.Popen([sys.executable, str(ROOT / "convert_to_llama.py"), "--ckpt", str(run_dir / "ckpt_last.pt"),
                             "--out", str(out), "--force", "--verify"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    while not (tmp_path / f"hf.tmp{proc.pid}" / "tokenizer.model").exists():  # built; transformers loads to verify
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "error: interrupted", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()


def test_a_tokenizer_with_more_pieces_than_the_model_has_ids_for_is_refused(tmp_path, spm_path, capsys):
    """Its ids past the model's vocabulary would index past the embedding: refused as one with fewer is."""
    run_dir = make_run(tmp_path / "run", spm_path, vocab_size=VOCAB - 8)  # tokenizer.model beside it: the same file
    with pytest.raises(SystemExit) as e:
        convert(run_dir, tmp_path / "hf")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "has 2000 pieces but the model's vocabulary is 1992" in err, err
    assert not (tmp_path / "hf").exists()


def test_a_runs_folder_as_ckpt_converts_its_ckpt_last(converted, tmp_path):
    run_dir, hf = converted
    C.main(["--ckpt", str(run_dir), "--out", str(tmp_path / "hf"), "--spm", str(run_dir)])  # its tokenizer.model
    assert sorted(os.listdir(tmp_path / "hf")) == sorted(os.listdir(hf))
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (hf / "model.safetensors").read_bytes()


def test_a_tokenizer_with_user_defined_symbols_is_refused(tmp_path, spm_path, capsys):
    """`prep --spm` takes a tokenizer that prep did not train. SentencePiece matches a user-defined symbol whole, inside
    a word too, where the converted BPE would spell it out: AutoTokenizer's ids would not be those the model learnt."""
    import io
    import sentencepiece as spm
    lines = spm_path.with_name("lines.txt").read_text(encoding="utf-8").splitlines()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(line.replace(". ", ". <|sep|> ") for line in lines),
                                   model_writer=model, vocab_size=VOCAB, user_defined_symbols=["<|sep|>"],
                                   **S.SP_TRAINER_OPTIONS)
    foreign = tmp_path / "foreign.model"
    foreign.write_bytes(model.getvalue())
    assert S.load_tokenizer(str(foreign)).encode("a<|sep|>b", out_type=str) == ["▁a", "<|sep|>", "b"]
    run_dir = make_run(tmp_path / "run", foreign)
    with pytest.raises(SystemExit) as e:
        convert(run_dir, tmp_path / "hf")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "has user-defined symbols ('<|sep|>')" in err and "HINT" in err, err
    assert not (tmp_path / "hf").exists()


def test_test_llama_model_names_the_layers_width_and_ffn_of_another_checkpoint(converted, tmp_path, spm_path):
    import test_llama_model as T
    for shape, want in (({"n_layer": 1}, ": layers 2 against 1 ("), ({"ffn_mult": 2.0}, ": FFN width 192 against 96 ("),
                        ({"d_model": 128, "head_dim": 16}, ": d_model 64 against 128, FFN width 192 against 352 (")):
        other = make_run(tmp_path / str(shape), spm_path, **shape)
        assert_user_error(run_main(str(converted[1]), "--ckpt", str(other / "ckpt_last.pt"), main=T.main),
                          "was not converted from", want)


def test_test_llama_model_compares_logits_over_the_prompt_and_its_greedy_continuation(converted, sp, monkeypatch):
    import test_llama_model as T
    run_dir, out = converted
    compared = []
    monkeypatch.setattr(T, "max_logit_diff", lambda folder, model, ids: compared.append(ids) or 0.0)
    r = run_main(str(out), "--ckpt", str(run_dir / "ckpt_last.pt"), "--max_new_tokens", "6", "--temperature", "0",
                 main=T.main)
    assert r.returncode == 0, r.stderr
    [ids] = compared
    prompt = [sp.bos_id()] + sp.encode("The sun is")
    assert ids.shape == (1, len(prompt) + 6) and ids[0, :len(prompt)].tolist() == prompt, ids
    assert f"greedy : {sp.decode(ids[0, 1:].tolist())}\n" in r.stdout and f"on {len(prompt) + 6} tokens" in r.stdout


def test_verify_names_a_tokenizer_or_a_model_that_is_not_the_checkpoints(converted, sp, tmp_path):
    run_dir, folder = converted
    ours, _ = C.load_our_model(str(run_dir / "ckpt_last.pt"))
    copy = tmp_path / "hf"
    shutil.copytree(folder, copy)
    tok = json.loads((copy / "tokenizer.json").read_text(encoding="utf-8"))
    tok["normalizer"] = None  # no dummy prefix, spaces not escaped: other ids from the first word on
    (copy / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    with pytest.raises(C.VerificationError, match="^AutoTokenizer disagrees with SentencePiece: the converted "
                                                  "tokenizer gives"):
        C.verify(str(copy), ours, sp, 1e-3)
    other = S.Transformer(S.ModelConfig(**{**TINY, "vocab_size": 1000}))  # another checkpoint's model
    with pytest.raises(C.VerificationError, match=r"gives logits of shape \(1, 8, 2000\), our checkpoint \(1, 8, "
                                                  r"1000\): the folder was not converted from this checkpoint"):
        C.max_logit_diff(str(folder), other, torch.zeros(1, 8, dtype=torch.long))
