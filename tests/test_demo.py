from conftest import assert_user_error, run_cli


def test_demo_runs_then_runs_again_and_refuses_another_vocabulary(tmp_path):
    # the README's first command, shortened; run again, it resumes the finished run and samples again
    args = ("demo", "--out_dir", tmp_path / "demo", "--max_steps", 20, "--vocab_size", 500, "--device", "cpu")
    out = run_cli(*args).stdout
    assert "== 3/3 generate ==" in out and "done: loss" in out and "after 20 steps" in out
    out = run_cli(*args).stdout
    assert "nothing to train" in out and "after 20 steps" in out and "done: loss nan" not in out
    tokenizer = (tmp_path / "demo" / "data" / "tokenizer.model").read_bytes()
    proc = run_cli(*args[:-4], "--vocab_size", 600, check=False)
    assert_user_error(proc, "500-token vocabulary", "--vocab_size 500")
    assert (tmp_path / "demo" / "data" / "tokenizer.model").read_bytes() == tokenizer
