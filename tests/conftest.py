import contextlib
import io
import os
import signal
import subprocess
import sys
import traceback

import pydoc_data.topics
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "standalone_transformer_lm.py")
sys.path.insert(0, ROOT)
import standalone_transformer_lm as lm  # noqa: E402  (after the path insert)

# Before any test computes: main() settles a new process's CPU math at its start, and run_main() runs it in this one,
# whose bits must then match those of the script run as a process (a settle after another first exp would be late).
lm.settle_cpu(torch.device("cpu"))


def run_cli(*args, check=True, timeout=600, env=None, cwd=None):
    """Run the script as a user would; returns the CompletedProcess (text mode)."""
    proc = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def run_main(*args, check=False, cwd=None, env=None, threads=None, main=None):
    """The script's main() in this process: run_cli's code path (main is all that `python standalone_transformer_lm.py`
    runs) without starting Python and importing torch, and for training torch._dynamo (which torch.optim imports),
    again: 6-7 s a call on 2 cores. An exception that escapes main() comes back as exit 1 with its traceback on
    stderr. What a run sets for its process is put back: signal handlers, deterministic algorithms, the environment,
    the thread count, the working folder. threads: as OMP_NUM_THREADS would for a new process. main: another
    script's main(), such as test_llama_model.py's."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    deterministic, n_threads, environ, folder = torch.are_deterministic_algorithms_enabled(), \
        torch.get_num_threads(), dict(os.environ), os.getcwd()
    try:
        os.environ.update(env or {})
        if cwd:
            os.chdir(cwd)
        if threads:
            torch.set_num_threads(threads)
        torch._dynamo.reset()  # --compile 1 compiles from nothing, as in a new process
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            (main or lm.main)([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)  # sys.exit(): 0; a message: 1
    except Exception:
        err.write(traceback.format_exc())
        code = 1
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(n_threads)
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(folder)
    if check and code != 0:
        raise AssertionError(f"exit {code}\nstdout:\n{out.getvalue()}\nstderr:\n{err.getvalue()}")
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
    run_main("prep", "--text_path", docs_corpus, "--out_dir", out, "--vocab_size", 1000, "--val_fraction", 0.05,
             "--num_workers", 1, check=True)
    return out


def spy_on_syncs(monkeypatch) -> list:
    """Records os.fsync (by inode) and os.replace (by target name) in order; a rename of bytes never synced fails."""
    synced, events, fsync, replace = set(), [], os.fsync, os.replace

    def spy_fsync(fd):
        synced.add(os.fstat(fd).st_ino)
        events.append(("fsync", os.fstat(fd).st_ino))
        fsync(fd)

    def spy_replace(src, dst):
        assert os.stat(src).st_ino in synced, f"{dst} renamed into place before its bytes were synced"
        events.append(("replace", os.path.basename(dst)))
        replace(src, dst)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    return events
