import copy
import dataclasses
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
import torch.nn.functional as F

import standalone_transformer_lm as lm
from conftest import ROOT, SCRIPT, assert_user_error, run_cli, run_main
from test_train import train_args

DEVICE = os.environ.get("LM_TEST_DEVICE", "cpu")  # cuda: the compiled decode step with CUDA graphs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = lm.ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, d_model=64, seq_len=64, ffn_multiple_of=32)
    m = lm.Transformer(cfg).double().eval()  # float64: no near-ties, so any mismatch is a real bug
    for p in m.parameters():
        p.data.normal_(0, 0.3)
    return m


def greedy_by_full_recomputation(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(model(torch.tensor([ids]))[0][0, -1].argmax().item())
    return ids[len(prompt):]


@pytest.mark.parametrize("prompt_len", [1, 2, 7, 30])
def test_kv_cache_greedy_equals_full_recomputation(model, prompt_len):
    prompt = torch.randint(4, 300, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    n = 64 - prompt_len
    assert lm.generate(model, prompt, n, temperature=0, eos_id=None) == [greedy_by_full_recomputation(model, prompt, n)]


def test_generation_stops_at_eos_and_at_the_context(model):
    full = lm.generate(model, [1, 5, 6], 40, temperature=0, eos_id=None)[0]
    eos = full[5]
    assert lm.generate(model, [1, 5, 6], 40, temperature=0, eos_id=eos)[0] == full[:full.index(eos)]
    assert len(lm.generate(model, [1] * 60, 40, temperature=0, eos_id=None)[0]) == 4  # 64-token context


def test_same_seed_same_sample(model):
    a = lm.generate(model, [1, 9], 30, temperature=1.0, seed=7, eos_id=None)[0]
    b = lm.generate(model, [1, 9], 30, temperature=1.0, seed=7, eos_id=None)[0]
    c = lm.generate(model, [1, 9], 30, temperature=1.0, seed=8, eos_id=None)[0]
    assert a == b and a != c


def test_each_sample_of_a_batch_equals_its_own_full_recomputation(model):
    """--num_samples decodes its samples as one batch: at every step, each row's logits are what that row alone,
    recomputed from scratch, gives; and a row that reaches eos ends there while the others go on."""
    prompt, steps = [1, 9, 33], []

    def step(idx, pos):
        logits, _ = model(idx, pos=pos)
        steps.append(logits[:, -1])
        return logits, None

    rows = lm.generate(model, prompt, 20, temperature=1.0, seed=5, eos_id=None, decode_step=step, num_samples=4)
    assert len(rows) == 4 and len({tuple(r) for r in rows}) == 4 and all(len(r) == 20 for r in rows)
    with torch.no_grad():
        for i, row in enumerate(rows):
            full = model(torch.tensor([prompt + row]))[0][0, len(prompt):-1]  # the last token needs no logits
            torch.testing.assert_close(torch.stack([s[i] for s in steps]), full)
    eos = rows[0][5]
    cut = lm.generate(model, prompt, 20, temperature=1.0, seed=5, eos_id=eos, num_samples=4)
    assert cut == [r[:r.index(eos)] if eos in r else r for r in rows] and cut[0] == rows[0][:5]


def test_each_new_token_after_the_first_costs_one_decode_step(model):
    positions = []

    def step(idx, pos):
        positions.append(int(pos))
        return model(idx, pos=pos)

    assert len(lm.generate(model, [1, 9, 33], 10, eos_id=None, decode_step=step)[0]) == 10
    assert positions == list(range(3, 12))  # the prefill gives the first token; the last needs no step after it


@pytest.mark.parametrize("intel, memory", [(True, 1 << 40), (False, 1 << 40), (True, 1 << 20)])
def test_products_laid_out_for_decoding_equal_the_plain_ones(monkeypatch, intel, memory):
    """What generate() lays out for 1 row and for 4 (every product packed by MKL on an Intel CPU whose torch has MKL
    and whose machine has room for the copies, else lm_head in blocks of the vocabulary), and lm_head's own layout cut
    in blocks, give the plain products, for the rows they were laid out for and for others; the call's end drops
    them."""
    monkeypatch.setattr(lm, "intel_cpu", lambda: intel)
    monkeypatch.setattr(lm, "physical_memory", lambda: memory)  # 1 MiB: no room beside 0.28 MB of weights
    torch.manual_seed(0)
    m = lm.Transformer(lm.ModelConfig(vocab_size=640, n_layer=1, n_head=2, d_model=32, seq_len=16)).eval()
    linears = [mod for mod in m.modules() if isinstance(mod, lm.Linear)]
    assert len(linears) == 5  # qkv, o, gate_up, down, lm_head
    with torch.no_grad():
        for rows in (0, 1, 4):
            m.lay_out_for_decoding(rows)
            packed = rows > 1 and intel and memory > 1 << 20 and torch.backends.mkl.is_available()
            assert all((mod.packed is not None) == packed for mod in linears)
            assert (m.decode_weight is not None) == (rows > 0 and not packed)
            for batch, length in ((rows or 2, 1), (1, 5), (3, 5)):
                x = torch.randn(batch, length, 32)
                torch.testing.assert_close(m.output_layer(x), F.linear(x, m.lm_head.weight), rtol=1e-6, atol=1e-6)
                for mod in linears:
                    x = torch.randn(batch, length, mod.in_features)
                    torch.testing.assert_close(mod(x), F.linear(x, mod.weight), rtol=1e-6, atol=1e-6)
    m.lay_out_for_decoding(0)
    assert m.decode_weight is None and all(mod.packed is None for mod in linears)


def test_a_float32_batch_decodes_each_sample_as_its_own_full_recomputation(model, monkeypatch):
    """The float32 path of a batch, where every product is packed for the batch's rows (torch with MKL)."""
    monkeypatch.setattr(lm, "intel_cpu", lambda: True)
    monkeypatch.setattr(lm, "physical_memory", lambda: 1 << 40)
    m, prompt, steps = copy.deepcopy(model).float(), [1, 9, 33], []

    def step(idx, pos):
        assert (m.layers[0].mlp.down_proj.packed is not None) == torch.backends.mkl.is_available()
        logits, _ = m(idx, pos=pos)
        steps.append(logits[:, -1])
        return logits, None

    rows = lm.generate(m, prompt, 12, temperature=1.0, seed=5, eos_id=None, decode_step=step, num_samples=3)
    assert len(steps) == 11 and len(rows) == 3
    with torch.no_grad():
        for i, row in enumerate(rows):
            full = m(torch.tensor([prompt + row]))[0][0, len(prompt):-1]
            torch.testing.assert_close(torch.stack([s[i] for s in steps]), full, rtol=1e-4, atol=1e-4)


def test_decoding_sees_weights_changed_without_a_trace(model):
    """generate() lays lm_head out for decoding at each call, so a change between two calls that leaves no trace on
    the tensor (a write through .data; a fused AdamW step keeps the version counter too) is seen by the second."""
    m, prompt = copy.deepcopy(model), [1, 17, 42]
    first = lm.generate(m, prompt, 12, eos_id=None)
    with torch.no_grad():
        m.lm_head.weight.data.mul_(-1.0)
    again = lm.generate(m, prompt, 12, eos_id=None)
    assert again == [greedy_by_full_recomputation(m, prompt, 12)] and again != first


def draws(logits, n=4000, **kw):
    gen = torch.Generator().manual_seed(0)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    return {lm.sample_next(logits, seen, generator=gen, **{"temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                                           "repetition_penalty": 1.0, **kw}).item()
            for _ in range(n)}


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()  # most likely first: ids 1, 3, 0, 2
    assert draws(logits) == {0, 1, 2, 3}
    assert draws(logits, top_k=2) == {1, 3}
    assert draws(logits, top_p=0.7) == {1, 3}  # 0.5 < 0.7 needs the second token; 0.8 reaches it
    assert draws(logits, top_p=0.85) == {0, 1, 3}
    assert draws(logits, top_p=0.01) == {1}


def textbook_distribution(logits, top_k, top_p):
    """Top-k, then the nucleus, on the whole vocabulary: mask, renormalise."""
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k).values[:, -1:], float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
    return probs / probs.sum(-1, keepdim=True)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (7, 1.0), (300, 1.0), (0, 0.9), (50, 0.8), (50, 0.01)])
def test_sampling_draws_from_the_textbook_distribution(top_k, top_p):
    """The sampler draws among top_k candidates only (cheap); scattered back over the vocabulary, their
    probabilities are exactly top-k-then-nucleus over the whole vocabulary."""
    logits = 3 * torch.randn(3, 300, generator=torch.Generator().manual_seed(top_k), dtype=torch.float64)
    probs, ids = lm.candidates(logits, top_k, top_p)
    full = probs if ids is None else torch.zeros_like(logits).scatter_(-1, ids, probs)
    torch.testing.assert_close(full / full.sum(-1, keepdim=True), textbook_distribution(logits, top_k, top_p))


def test_repetition_penalty_moves_greedy_off_seen_tokens():
    logits, seen = torch.tensor([[2.0, 1.5, -1.0]]), torch.tensor([[True, False, False]])
    args = dict(temperature=0, top_k=0, top_p=1.0, generator=None)
    assert lm.sample_next(logits, seen, repetition_penalty=1.0, **args).item() == 0
    assert lm.sample_next(logits, seen, repetition_penalty=1.5, **args).item() == 1
    # a negative logit is multiplied, not divided: a seen token gets less likely whatever its sign
    negative, seen = torch.tensor([[-0.5, -1.0]]), torch.tensor([[True, False]])
    assert lm.sample_next(negative, seen, repetition_penalty=3.0, **args).item() == 1


def test_temperature_divides_the_logits():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    seen, args = torch.zeros(4, 50, dtype=torch.bool), dict(top_k=0, top_p=1.0, repetition_penalty=1.0)
    draw = [[lm.sample_next(scaled, seen, temperature=t, generator=torch.Generator().manual_seed(i), **args)
             for i in range(50)] for scaled, t in ((logits, 0.25), (logits / 0.25, 1.0), (logits, 1.0))]
    cold, scaled, plain = (torch.cat(d) for d in draw)
    assert torch.equal(cold, scaled) and not torch.equal(cold, plain)


def test_repetition_penalty_in_the_decode_loop_sees_every_token_so_far(model):
    prompt = [1, 17, 42]
    plain = lm.generate(model, prompt, 30, temperature=0, eos_id=None)[0]
    assert len(set(prompt + plain)) < len(prompt + plain)  # this model repeats itself when greedy
    ids = prompt + lm.generate(model, prompt, 30, temperature=0, repetition_penalty=1e6, eos_id=None)[0]
    assert len(set(ids)) == len(ids)  # a huge penalty: no token of the prompt or of the output comes twice
    k = next(i for i, t in enumerate(plain) if t in prompt + plain[:i])  # greedy's first repeat of its context,
    context = prompt + plain[:k]  # as a prompt of its own: the penalty must count the prompt's tokens as seen
    assert lm.generate(model, context, 1, temperature=0, eos_id=None)[0] == [plain[k]]
    assert lm.generate(model, context, 1, temperature=0, repetition_penalty=1e6, eos_id=None)[0][0] not in context


@pytest.fixture(scope="module")
def trained(docs_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    run_main("train", *train_args(out, docs_data, max_steps=20, save_interval=20), check=True)
    return out


def test_cli_generate_is_reproducible_and_finds_its_tokenizer(trained):
    args = ["generate", "--ckpt", trained / "ckpt_last.pt", "--prompt", "The try statement", "--max_new_tokens", 20,
            "--seed", 3, "--num_samples", 2, "--top_p", 0.9]
    first, second = run_cli(*args).stdout, run_main(*args, check=True).stdout  # a process, then here
    assert first == second and first.count("The try statement") == 2
    other_seed = run_main(*args[:7], "--seed", 4, "--num_samples", 2, "--top_p", 0.9, check=True).stdout
    assert other_seed != first
    assert run_main(args[0], "--ckpt", trained, *args[3:], check=True).stdout == first  # the run's folder: ckpt_last.pt
    assert run_main(*args, "--spm", trained, check=True).stdout == first  # a folder: its tokenizer.model


def test_the_stream_holds_back_half_a_character(capsys):
    class Pieces:  # a tokenizer whose ids 10, 11 and 12 are the three bytes of "€"
        def decode(self, ids):
            return bytes(b"\xe2\x82\xac"[i - 10] if i >= 10 else 97 + i for i in ids).decode(errors="replace")
    stream = lm.TextStream(Pieces(), [0])
    for n in range(1, 4):
        stream([1, 10, 11, 12][:n + 1])
        assert "\ufffd" not in capsys.readouterr().out  # nothing of "€" until its last byte has come
    assert stream([1, 10, 11, 12, 2], final=True) == "ab€c" and capsys.readouterr().out == "c\n"


def test_one_sample_streams_exactly_the_text_it_returns(trained, capsys):
    args = lm.build_parser().parse_args(["generate", "--ckpt", str(trained / "ckpt_last.pt"), "--prompt",
                                         "The try statement", "--max_new_tokens", "30", "--seed", "0"])
    [text] = lm.cmd_generate(args)
    assert capsys.readouterr().out == text + "\n" and text.startswith("The try statement") and len(text) > 40


def test_output_the_terminal_cannot_encode_and_a_prompt_that_is_not_utf8(trained):
    ckpt = trained / "ckpt_last.pt"  # as on Windows, where a redirected stdout writes cp1252
    proc = run_cli("generate", "--ckpt", ckpt, "--prompt", "漢字 The", "--max_new_tokens", 5, "--seed", 0,
                   env={"PYTHONIOENCODING": "cp1252"})
    assert proc.stdout.startswith("?? The") and "Traceback" not in proc.stderr
    assert_user_error(run_main("generate", "--ckpt", ckpt, "--prompt", "caf\udce9"),  # b"caf\xe9" in argv
                      "--prompt is not UTF-8", "iconv")


def test_a_failing_compile_is_one_error_line_with_the_fix(trained, docs_data, tmp_path):
    # no working C++ compiler, as in a slim container: inductor cannot build its CPU kernels
    env = {"CXX": "/nonexistent", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}  # no cached kernels either
    proc = run_cli("train", *train_args(tmp_path / "run", docs_data, max_steps=2, compile=1), check=False, env=env)
    assert_user_error(proc, "torch.compile failed", "C++ compiler", "--compile 0")
    assert not (tmp_path / "run" / "ckpt_last.pt").exists()
    # 4 samples of a prompt, so that some decode step runs compiled (a sample whose first token is eos stops early)
    proc = run_cli("generate", "--ckpt", trained / "ckpt_last.pt", "--prompt", "The try statement", "--num_samples", 4,
                   "--seed", 0, "--max_new_tokens", 3, "--compile", 1, check=False, env=env)
    assert_user_error(proc, "torch.compile failed", "--compile 0")
    assert proc.stderr.startswith("compiling the decode step: the first new token waits for it\n")  # said before


def test_a_decode_step_the_compiler_cannot_take_whole_is_one_error_line(trained, monkeypatch):
    # as torch 2.15 on Python 3.15 met math.gcd in the output layer: dynamo refuses a break in a fullgraph compile
    output_layer = lm.Transformer.output_layer

    def with_a_break(self, x):
        if torch.compiler.is_compiling():
            torch._dynamo.graph_break()
        return output_layer(self, x)
    monkeypatch.setattr(lm.Transformer, "output_layer", with_a_break)
    proc = run_main("generate", "--ckpt", trained / "ckpt_last.pt", "--prompt", "The", "--num_samples", 2,
                    "--max_new_tokens", 3, "--compile", 1)
    assert_user_error(proc, "torch.compile failed", "--compile 0")


def test_output_closed_early_is_one_line_not_a_disk_error(trained):
    # `generate ... | head -c 20`: the reader goes away, here before the first token is written
    proc = subprocess.Popen([sys.executable, SCRIPT, "generate", "--ckpt", trained / "ckpt_last.pt", "--prompt", "The",
                             "--max_new_tokens", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141 and err == "error: the output pipe was closed (by `head`?); stopped\n", err


def test_cli_generate_refuses_bad_input(trained, docs_corpus, tmp_path):
    ckpt = trained / "ckpt_last.pt"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": lm.CKPT_FORMAT, "x": Evil()}, tmp_path / "evil.pt")  # the pickle inside torch's archive
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"format": lm.CKPT_FORMAT, "x": Evil()}))  # a bare pickle
    for evil, why in (("evil.pt", "those are never unpickled"), ("evil.pkl", "not a torch.save archive")):
        assert_user_error(run_cli("generate", "--ckpt", tmp_path / evil, "--spm", trained / "tokenizer.model",
                                  check=False), "not a loadable checkpoint", why)
    assert not marker.exists()
    assert_user_error(run_main("generate", "--ckpt", trained / "pytorch_model.bin"),  # the export
                      "not a checkpoint of this script", "pytorch_model.bin holds the weights alone")
    (tmp_path / "torn.pt").write_bytes(ckpt.read_bytes()[:5000])
    assert_user_error(run_main("generate", "--ckpt", tmp_path / "torn.pt"),
                      "not a loadable checkpoint (the file is cut short or damaged). HINT: pass the ckpt_last.pt")
    with zipfile.ZipFile(tmp_path / "no_pickle.pt", "w") as z:  # torch.load raises EOFError(), with no message
        z.writestr("archive/data.pkl", b"")
        z.writestr("archive/version", b"3\n")
    assert_user_error(run_main("generate", "--ckpt", tmp_path / "no_pickle.pt"),
                      "not a loadable checkpoint (EOFError: the file is damaged). HINT: pass the ckpt_last.pt")
    (tmp_path / "empty.pt").touch()
    assert_user_error(run_main("generate", "--ckpt", tmp_path / "empty.pt"), "(the file is empty). HINT: pass")
    assert_user_error(run_main("generate", "--ckpt", ckpt, "--spm", tmp_path / "empty.pt"),
                      "is not a SentencePiece model", "HINT: pass the tokenizer.model that `prep` wrote")
    lm.prep(str(docs_corpus), str(tmp_path / "other"), vocab_size=500, num_workers=1, progress=False)
    assert_user_error(run_main("generate", "--ckpt", ckpt, "--spm", tmp_path / "other" / "tokenizer.model"),
                      "has 500 tokens but the model has 1000")
    lm.prep(str(docs_corpus), str(tmp_path / "same_size"), vocab_size=1000, sample_lines=500, num_workers=1,
            progress=False)  # another sample of lines: other pieces, the same count
    other = tmp_path / "same_size" / "tokenizer.model"
    assert lm.file_sha256(str(other)) != lm.file_sha256(str(trained / "tokenizer.model"))
    assert_user_error(run_main("generate", "--ckpt", ckpt, "--spm", other), "is not the one", "was trained with")
    assert_user_error(run_main("generate", "--ckpt", ckpt, "--prompt", "word " * 200),
                      "context is 64", "shorten the prompt")
    assert_user_error(run_main("generate", "--ckpt", tmp_path / "missing.pt"), "does not exist")
    assert_user_error(run_main("generate", "--ckpt", ckpt, "--num_samples", 0),
                      "--num_samples must be at least 1, got 0")
    assert_user_error(run_main("generate", "--ckpt", ckpt, "--max_new_tokens", -5),
                      "--max_new_tokens must be 0 or more, got -5")
    for temperature in (-1, 1e-40, "inf", "nan"):  # 1e-40: the logits / temperature overflow, and nothing samples
        assert_user_error(run_main("generate", "--ckpt", ckpt, "--temperature", temperature),
                          "--temperature must be 0 (greedy), or finite and at least 1e-6")
    assert_user_error(run_main("generate", "--ckpt", ckpt, "--top_p", 0), "--top_p must be in (0, 1]")
    assert_user_error(run_main("generate", "--ckpt", ckpt, "--top_k", -1), "--top_k must be 0 (off)")
    for penalty in (0, 1e-39, 1e7):
        assert_user_error(run_main("generate", "--ckpt", ckpt, "--repetition_penalty", penalty),
                          "--repetition_penalty must be from 1e-6 to 1e6")
    assert_user_error(run_main("generate", "--ckpt", ckpt, "--seed", 1 << 64), "--seed must be below 2**63 in size")


def test_compiled_decode_step_matches_eager(model):
    """As `generate --compile 1` compiles it: on a GPU (LM_TEST_DEVICE=cuda) with CUDA graphs, recorded in the third
    call and replayed after, each replay writing the KV cache and the logits that the next token is drawn from."""
    model = copy.deepcopy(model).to(DEVICE)
    prompt, step = [1, 17, 42, 99], torch.compile(model, fullgraph=True, mode="reduce-overhead" if DEVICE == "cuda"
                                                  else None)
    for num_samples in (1, 3):  # one sequence, then a batch (a second graph)
        for temperature in (0.0, 1.0):
            kw = dict(temperature=temperature, seed=11, eos_id=None, num_samples=num_samples)
            eager = lm.generate(model, prompt, 12, **kw)
            assert lm.generate(model, prompt, 12, decode_step=step, **kw) == eager


def test_cli_samples_decode_in_equal_batches(trained, monkeypatch):
    """--num_samples 20 runs two batches of 10, not 16 + 4: one KV cache shape, hence one compiled graph. The first
    batch is what `--num_samples 10` prints; a later batch's seed is drawn from (seed, batch), so no other --seed
    repeats its samples (seed + 10 would have: a sweep over seeds 3, 13, ... would have counted samples twice)."""
    sizes, real = [], lm.generate
    monkeypatch.setattr(lm, "generate", lambda *a, num_samples=1, **kw: sizes.append(num_samples) or
                        real(*a, num_samples=num_samples, **kw))
    args = ["generate", "--ckpt", str(trained / "ckpt_last.pt"), "--prompt", "The", "--max_new_tokens", "8",
            "--temperature", "1.0", "--seed", "3"]
    texts = lm.cmd_generate(lm.build_parser().parse_args([*args, "--num_samples", "20"]))
    assert sizes == [10, 10] and len(texts) == 20
    assert lm.cmd_generate(lm.build_parser().parse_args([*args, "--num_samples", "10"])) == texts[:10]
    assert lm.cmd_generate(lm.build_parser().parse_args([*args, "--num_samples", "20"])) == texts
    other = lm.cmd_generate(lm.build_parser().parse_args([*args[:-1], "13", "--num_samples", "20"]))
    assert not set(texts) & set(other) and len(set(texts)) == 20  # 8 sampled tokens: no two texts alike by chance
    sizes.clear()
    assert len(lm.cmd_generate(lm.build_parser().parse_args([*args, "--num_samples", "17"]))) == 17
    assert sizes == [9, 9]  # the last batch padded with one sample, dropped


def test_sampling_keeps_float32_angles_a_prefill_returns_its_last_position_and_generate_drops_its_layout():
    cfg = lm.ModelConfig(**lm.PRESETS["tiny"], vocab_size=320)
    m = lm.for_sampling(lm.Transformer(cfg), torch.device("cpu"), torch.bfloat16)
    cos, sin = lm.rope_tables(cfg)  # bf16 angles would lose positions
    assert m.rope_cos.dtype == torch.float32 and torch.equal(m.rope_cos, cos) and torch.equal(m.rope_sin, sin)
    m = lm.Transformer(cfg).eval()
    for block in m.layers:
        block.self_attn.cache = lm.KVCache(1, cfg.seq_len, cfg, torch.float32, "cpu")
    with torch.no_grad():  # lm_head over the prompt's last position only: the one that samples
        assert m(torch.tensor([[1, 5, 6, 7]]), pos=torch.arange(4))[0].shape == (1, 1, 320)
    lm.generate(m, [1, 5], 3, eos_id=None, num_samples=2)
    # the copies laid out for decoding go with the call: memory back, and none left stale for a later change of weights
    assert m.decode_weight is None and all(mod.packed is None for mod in m.modules() if isinstance(mod, lm.Linear))


def test_the_nucleus_is_the_fewest_tokens_that_reach_p_however_far_down_the_list():
    flat = torch.zeros(1, 4)  # four tokens of exactly 0.25 each
    assert len(draws(flat, top_p=0.5)) == 2  # two reach 0.5 exactly: a third is not needed
    assert draws(flat, top_p=0.9) == {0, 1, 2, 3}  # three reach only 0.75: the least likely token is needed too


def test_on_token_sees_the_first_samples_tokens_after_every_step(model):
    """What streams `generate`'s text to the terminal as it decodes, not all of it at the end."""
    seen = []
    [out] = lm.generate(model, [1, 9], 6, temperature=0, eos_id=None, on_token=lambda ids: seen.append(list(ids)))
    assert len(out) == 6 and seen == [out[:i] for i in range(1, 7)]


def test_the_prompt_is_bos_then_its_tokens_and_no_prompt_starts_a_document(trained, monkeypatch):
    prompts, real = [], lm.generate
    monkeypatch.setattr(lm, "generate", lambda model, prompt, *a, **kw: prompts.append(prompt) or
                        real(model, prompt, *a, **kw))
    sp = lm.load_tokenizer(str(trained / "tokenizer.model"))
    for text in ("The try statement", ""):  # --prompt left out: a sample from a document's start, as trained
        lm.cmd_generate(lm.build_parser().parse_args(["generate", "--ckpt", str(trained / "ckpt_last.pt"), "--prompt",
                                                      text, "--max_new_tokens", "5", "--seed", "0"]))
    assert prompts == [[lm.BOS_ID] + sp.encode("The try statement"), [lm.BOS_ID]]


def test_a_prompt_that_fills_the_context_is_refused_and_one_token_shorter_is_not(trained):
    sp, ckpt = lm.load_tokenizer(str(trained / "tokenizer.model")), trained / "ckpt_last.pt"  # seq_len 64 (tiny)
    texts = {len(sp.encode(" ".join(["the"] * n))) + 1: " ".join(["the"] * n) for n in range(40, 80)}  # bos included
    assert_user_error(run_main("generate", "--ckpt", ckpt, "--prompt", texts[64], "--max_new_tokens", 5),
                      "the prompt is 64 tokens (bos included), the model's context is 64")  # no room for one more
    assert run_main("generate", "--ckpt", ckpt, "--prompt", texts[63], "--max_new_tokens", 5).returncode == 0


def test_a_checkpoint_with_model_config_keys_this_version_does_not_know_is_one_error_line(tmp_path):
    cfg = {**dataclasses.asdict(lm.ModelConfig(**lm.PRESETS["tiny"], vocab_size=320)), "sliding_window": 4096}
    torch.save({"format": lm.CKPT_FORMAT, "version": lm.CKPT_VERSION, "model_config": cfg, "model": {}},
               tmp_path / "ckpt.pt")
    assert_user_error(run_main("generate", "--ckpt", tmp_path / "ckpt.pt"),
                      "unknown model config keys ['sliding_window']", "a newer version of this script")


def test_a_compile_failure_names_the_backends_own_error(monkeypatch, capsys):
    # torch's wording: "backend='inductor' raised:" on a line of its own, then the error that matters
    inner = RuntimeError("Compiler: /nonexistent is not found")
    try:
        failure = torch._dynamo.exc.BackendCompilerFailed(lm.cmd_generate, inner, None)
    except TypeError:  # an older torch: no frame argument
        failure = torch._dynamo.exc.BackendCompilerFailed(lm.cmd_generate, inner)

    def fails(args):
        raise failure
    monkeypatch.setattr(lm, "cmd_generate", fails)
    with pytest.raises(SystemExit) as e:
        lm.main(["generate", "--ckpt", "x", "--compile", "1"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        "error: torch.compile failed: RuntimeError: Compiler: /nonexistent is not found. HINT: run with --compile 0 "
        "(the same model, slower)\n")


def test_generate_samples_by_default_as_the_readme_and_the_export_say():
    # README: `generate`'s defaults, which convert_to_llama.py writes into generation_config.json too
    args = lm.build_parser().parse_args(["generate", "--ckpt", "x"])
    assert (args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.max_new_tokens,
            args.num_samples, args.prompt, args.spm) == (0.8, 200, 1.0, 1.0, 100, 1, "", None)


def test_eager_decoding_allocates_the_cache_for_the_prompt_and_its_new_tokens_only(model):
    lm.generate(model, [1, 5, 6], 4, temperature=0, eos_id=None, num_samples=2)
    assert {tuple(block.self_attn.cache.k.shape) for block in model.layers} == {(2, 2, 7, 16)}  # not the context's 64
    prompt = [1, 5, 6, 7, 8]  # a longer call allocates anew, and decodes as before
    want = greedy_by_full_recomputation(model, prompt, 20)
    assert lm.generate(model, prompt, 20, temperature=0, eos_id=None) == [want]
    assert {block.self_attn.cache.k.size(2) for block in model.layers} == {25}


def test_running_out_of_memory_while_decoding_is_one_error_line(trained, monkeypatch):
    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 134217728 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(lm, "generate", no_memory)
    for n, rows in ((1, 1), (20, 10)):
        assert_user_error(run_main("generate", "--ckpt", trained / "ckpt_last.pt", "--num_samples", n),
                          f"out of CPU memory decoding {rows} sample(s) at once (tried to allocate 134217728 bytes). "
                          f"HINT: pass fewer --num_samples")


def test_a_checkpoint_with_a_nan_weight_is_refused_by_generate_resume_and_convert(trained, docs_data, tmp_path):
    ckpt = torch.load(trained / "ckpt_last.pt", weights_only=True)
    ckpt["model"]["layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    torch.save(ckpt, run / "ckpt_last.pt")
    want = f"'{run / 'ckpt_last.pt'}' holds non-finite weights (nan or inf in layers.1.mlp.down_proj.weight)"
    assert_user_error(run_main("generate", "--ckpt", run / "ckpt_last.pt"), want, "HINT: use a backup of it")
    before = (run / "ckpt_last.pt").read_bytes()
    assert_user_error(run_main("train", *train_args(run, docs_data, max_steps=30)), want, "HINT: use a backup of it")
    assert (run / "ckpt_last.pt").read_bytes() == before
    convert = [sys.executable, os.path.join(ROOT, "convert_to_llama.py"), "--ckpt", str(run / "ckpt_last.pt")]
    proc = subprocess.run([*convert, "--out", str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    assert_user_error(proc, want, "HINT: use a backup of it")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("damage", ["fewer-layers-in-config", "a-weight-missing", "no-model-config", "ties-two"])
def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_one_error_line(trained, docs_data, tmp_path, damage):
    ckpt = torch.load(trained / "ckpt_last.pt", weights_only=True)
    if damage == "fewer-layers-in-config":
        ckpt["model_config"]["n_layer"] = 1
    elif damage == "a-weight-missing":
        del ckpt["model"]["norm.weight"]
    elif damage == "no-model-config":
        del ckpt["model_config"]
    else:  # the config says tied, the weights hold two matrices
        ckpt["model_config"]["tie_embeddings"] = True
    torch.save(ckpt, tmp_path / "ckpt.pt")
    want = {"fewer-layers-in-config": "(RuntimeError: Unexpected key(s) in state_dict",
            "a-weight-missing": "(RuntimeError: Missing key(s) in state_dict", "no-model-config": "(TypeError: the "
            "model config is NoneType, not a mapping)", "ties-two": "the weights hold two matrices"}[damage]
    assert_user_error(run_main("generate", "--ckpt", tmp_path / "ckpt.pt", "--spm", trained / "tokenizer.model"),
                      "and its model config do not fit together", want, "HINT: pass a ckpt_last.pt")
    if damage == "a-weight-missing":  # and a resume from such a file
        run = tmp_path / "run"
        shutil.copytree(trained, run)
        shutil.copy(tmp_path / "ckpt.pt", run / "ckpt_last.pt")
        args = train_args(run, docs_data, max_steps=30)
        assert_user_error(run_main("train", *args), "do not fit together", "HINT: remove it to resume ckpt_best.pt")


def test_a_prompt_prefilled_in_chunks_gives_the_logits_of_the_whole_prompt_at_once(model):
    """forward() with positions past the cache's first slot (a prompt fed in parts): each chunk's queries see the
    slots before them and their own chunk causally, as a forward over the whole sequence does, and so does every
    layer's cache that a later step reads."""
    m = copy.deepcopy(model)
    for block in m.layers:
        block.self_attn.cache = lm.KVCache(1, 64, m.cfg, torch.float64, "cpu")
    ids = torch.randint(4, 300, (1, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m(ids)[0][0]  # (13, vocab)
        m(ids[:, :5], pos=torch.arange(5))
        torch.testing.assert_close(m(ids[:, 5:12], pos=torch.arange(5, 12))[0][0, -1], full[11])
        torch.testing.assert_close(m(ids[:, 12:], pos=torch.tensor([12]))[0][0, -1], full[12])


def test_each_batch_of_cli_samples_has_a_seed_of_its_own_and_the_first_has_seed_itself(trained, monkeypatch):
    """--num_samples 33 decodes three batches of 11: the first with --seed as given (what generate(seed=...) gives),
    each later one with a seed of its own, so that no batch repeats another's samples."""
    seeds, real = [], lm.generate
    monkeypatch.setattr(lm, "generate", lambda *a, seed=None, **kw: seeds.append(seed) or real(*a, seed=seed, **kw))
    args = ["generate", "--ckpt", str(trained / "ckpt_last.pt"), "--prompt", "The", "--max_new_tokens", "8",
            "--temperature", "1.0", "--seed", "3", "--num_samples", "33"]
    texts = lm.cmd_generate(lm.build_parser().parse_args(args))
    assert len(seeds) == 3 and seeds[0] == 3 and len(set(seeds)) == 3
    assert len(texts) == 33 and len(set(texts)) == 33  # 8 sampled tokens: no two texts alike by chance


def test_a_top_k_of_the_whole_vocabulary_or_more_samples_as_top_k_0():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seen, args = torch.zeros(3, 50, dtype=torch.bool), dict(temperature=1.0, top_p=1.0, repetition_penalty=1.0)
    draw = [torch.cat([lm.sample_next(logits, seen, top_k=k, generator=torch.Generator().manual_seed(i), **args)
                       for i in range(30)]) for k in (0, 50, 80)]
    assert torch.equal(draw[0], draw[1]) and torch.equal(draw[0], draw[2])


def test_a_tokenizer_with_more_tokens_than_the_model_is_refused_by_its_size(trained, tmp_path):
    from conftest import docs_lines
    bigger = tmp_path / "bigger.model"  # its ids past 999 would index past the model's embedding
    bigger.write_bytes(lm.train_tokenizer(docs_lines(), 1200))
    assert_user_error(run_main("generate", "--ckpt", trained / "ckpt_last.pt", "--spm", bigger),
                      "has 1200 tokens but the model has 1000", "HINT: pass the tokenizer.model the model was trained")
