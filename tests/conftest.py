import contextlib
import io
import os
import signal
import subprocess
import sys
import traceback

import pydoc_data.topics
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "standalone_transformer_lm.py")
sys.path.insert(0, ROOT)


def run_cli(*args, check=True, timeout=600, env=None, cwd=None):
    """Run the script as a user would; returns the CompletedProcess (text mode)."""
    proc = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def run_main(*args):
    """The script's main() in this process, for input it must refuse: run_cli's code path (main is all that
    `python standalone_transformer_lm.py` runs) without starting Python and importing torch again, which takes 2-3 s
    a call on 2 cores. An exception that escapes main() comes back as exit 1 with its traceback on stderr."""
    import standalone_transformer_lm as lm
    out, err, code = io.StringIO(), io.StringIO(), 0
    handler = signal.getsignal(signal.SIGTERM)  # main() makes SIGTERM raise KeyboardInterrupt, as in the script
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            lm.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)  # sys.exit(): 0; a message: 1
    except Exception:
        err.write(traceback.format_exc())
        code = 1
    finally:
        signal.signal(signal.SIGTERM, handler)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


def docs_lines() -> list[str]:
    """Python's own documentation, one non-blank line per sample (about 8,700 lines)."""
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    return [line for line in text.split("\n") if line.strip()]


@pytest.fixture(scope="session")
def docs_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n".join(docs_lines()) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def docs_data(docs_corpus, tmp_path_factory):
    """A prepped data folder (vocab 1000) shared by the training tests."""
    out = tmp_path_factory.mktemp("data")
    run_cli("prep", "--text_path", docs_corpus, "--out_dir", out, "--vocab_size", 1000, "--val_fraction", 0.05,
            "--num_workers", 1)
    return out
