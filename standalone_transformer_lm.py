"""Train a LLaMA-style language model from one text file: tokenizer, packing, training, sampling.

    python standalone_transformer_lm.py prep --text_path corpus.txt --out_dir ./data --vocab_size 32000
    python standalone_transformer_lm.py train --out_dir ./runs/lm138 --data_dir ./data --preset 138m --compile 1
    torchrun --nproc_per_node=2 standalone_transformer_lm.py train --out_dir ./runs/ddp --data_dir ./data
    python standalone_transformer_lm.py generate --ckpt ./runs/lm138/ckpt_last.pt --prompt "The sun is"
    python standalone_transformer_lm.py demo        # the whole workflow on a corpus that ships with Python

On disk. `prep` writes DATA/tokenizer.model (SentencePiece BPE; unk=0 bos=1 eos=2 pad=3, byte fallback, no
normalisation, so decode(encode(line)) == line), DATA/train.bin and DATA/val.bin (raw little-endian uint16 token
ids, uint32 if the vocabulary exceeds 65,536; each input line becomes one sample [bos] + ids + [eos]; val is the
tail of the corpus) and DATA/meta.json (counts, dtype, special ids, tokenizer hash, options). `train` writes
OUT/ckpt_last.pt and OUT/ckpt_best.pt (tensors and plain values only: they load with weights_only=True),
OUT/pytorch_model.bin + OUT/config.json + OUT/tokenizer.model (the export) and OUT/metrics.jsonl.
Every file but metrics.jsonl (appended; a line torn by a crash is dropped on resume) is written to a temporary name
and renamed, so a crash leaves the old file or the new one.

RoPE follows Hugging Face LLaMA's rotate-half convention (pairs are (i, i + head_dim/2)), and parameters carry
HF LLaMA's names, so export to `transformers` is a rename plus splitting the fused qkv and gate/up rows.
"""

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import functools
import hashlib
import inspect
import io
import json
import math
import multiprocessing
import os
import pickle
import platform
import random
import re
import shlex
import shutil
import signal
import sys
import threading
import time
import warnings
import zipfile
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import chain

# torchrun's agent, taken before torch loads (seconds): the workers of a torchrun killed outright from then on stop
LAUNCHER = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (ignored: left so)
    # Ctrl-C while torch loads, for a second or more before main() takes over: one line, not a traceback
    signal.signal(signal.SIGINT, lambda signum, frame: (print("error: interrupted", file=sys.stderr), os._exit(130)))

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------------------
# Configuration


class UserError(Exception):
    """A mistake the user can fix; main() prints it as one `error:` line and exits with status 2."""


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    n_kv_head: int | None = None  # None: n_head (no grouped-query attention)
    head_dim: int | None = None  # None: d_model // n_head; set it when d_model is not divisible by n_head
    ffn_mult: float = 4.0
    ffn_multiple_of: int = 256
    seq_len: int = 1024  # longest context; RoPE tables are built for it
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self):
        self.tie_embeddings = bool(self.tie_embeddings)  # flags arrive as 0/1; the saved config says true/false
        sizes = {k: getattr(self, k) for k in ("vocab_size", "n_layer", "n_head", "d_model", "n_kv_head", "head_dim",
                                                "ffn_mult", "ffn_multiple_of", "seq_len", "rope_theta", "norm_eps")}
        bad = [f"{k} {v}" for k, v in sizes.items() if v is not None and not 0 < v < math.inf]
        if bad:
            raise UserError(f"model sizes must be positive and finite, got {', '.join(bad)}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.d_model % self.n_head:
                divisors = [k for k in range(1, self.d_model + 1) if self.d_model % k == 0]
                near = [max(k for k in divisors if k < self.n_head), *[k for k in divisors if k > self.n_head][:1]]
                raise UserError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}. HINT: pick a "
                                f"head count that divides it ({' or '.join(map(str, near))}), or set the head size "
                                f"with --head_dim (attention is then n_head x head_dim wide; 64 is usual)")
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise UserError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.head_dim % 2:
            raise UserError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.ffn_hidden < 1:
            raise UserError(f"ffn_mult {self.ffn_mult} leaves the SwiGLU of d_model {self.d_model} no width. HINT: "
                            f"LLaMA's is 4 (see --help)")

    @property
    def ffn_hidden(self) -> int:  # LLaMA: 2/3 of ffn_mult * d_model (SwiGLU has three matrices), rounded up
        hidden = int(self.ffn_mult * self.d_model * 2 / 3)
        return self.ffn_multiple_of * math.ceil(hidden / self.ffn_multiple_of)

    @property
    def n_params(self) -> int:  # as Transformer builds it (a tied matrix once), known before it is built
        d, width, kv_width = self.d_model, self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        block = d * (width + 2 * kv_width) + width * d + 3 * d * self.ffn_hidden + 2 * d  # attention, SwiGLU, norms
        return self.vocab_size * d * (1 if self.tie_embeddings else 2) + self.n_layer * block + d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise TypeError(f"the model config is {type(d).__name__}, not a mapping")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"unknown model config keys {sorted(unknown)}: this checkpoint is from another tool or "
                            f"a newer version of this script")
        return cls(**d)


# The user's table, with one change: d_model 1024 and 1280 are not divisible by its 20 and 24 heads, and
# transformers' LlamaConfig refuses such shapes, so those rows keep the head size of 64 and take 16 and 20 heads
# (which also brings them nearer their nominal 350M and 700M). The table's own head counts still train with
# --head_dim 64 and then export as Mistral. "tiny" is for tests and CPU smoke runs.
PRESETS = {
    "tiny": dict(n_layer=2, n_head=4, d_model=64, ffn_mult=4.0, ffn_multiple_of=32, seq_len=64),
    "138m": dict(n_layer=12, n_head=12, d_model=768, ffn_mult=4.0, seq_len=1024),
    "350m": dict(n_layer=24, n_head=16, d_model=1024, ffn_mult=4.0, seq_len=1024),
    "700m": dict(n_layer=32, n_head=20, d_model=1280, ffn_mult=4.0, seq_len=1024),
}

# ----------------------------------------------------------------------------------------------------------------------
# Runtime utilities


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def write_synced(path: str, write_fn) -> None:
    with open(path, "wb") as f:
        write_fn(f)
        f.flush()
        os.fsync(f.fileno())


def sync_folder(folder: str) -> None:
    if os.name == "posix":  # the renames in it survive a power cut (Windows cannot open a folder to sync it)
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def atomic_write(path: str, write_fn, link_from: str | None = None) -> None:
    """write_fn(file_object) writes the content; readers see the old file or the new one, never a torn one. link_from:
    a file with that content already, hard-linked instead where the filesystem allows it (no second write)."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with contextlib.suppress(FileNotFoundError):  # one a killed process of this pid left (a container's pids
            os.remove(tmp)  # repeat): it may be a link to another file of ours, which writing into would overwrite
        linked = False
        if link_from:
            with contextlib.suppress(OSError):  # a filesystem without hard links: write it
                os.link(link_from, tmp)
                linked = True
        if not linked:
            write_synced(tmp, write_fn)
        os.replace(tmp, path)
        sync_folder(os.path.dirname(tmp))
    except RuntimeError as e:  # torch.save's archive writer reports a failed write (a full disk) as an error of its own
        if isinstance(e.__context__, KeyboardInterrupt):  # (a second Ctrl-C during a save)
            raise KeyboardInterrupt from None
        if isinstance(e.__context__, OSError):
            raise OSError(e.__context__.errno, e.__context__.strerror, path) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait for the end of the block, then stop as they would have (KeyboardInterrupt): renames
    that belong together all happen. (Python runs handlers in its main thread, whichever thread the kernel picked.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if got:
        raise KeyboardInterrupt


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def remove_stale_tmp(folder: str, names) -> None:
    """Temporary files of ours that a killed process left behind (a checkpoint's can take gigabytes)."""
    for entry in os.listdir(folder):
        m = re.fullmatch(r"\.(.+)\.tmp(\d+)", entry)
        if m and m.group(1) in names and not pid_alive(int(m.group(2))):
            os.remove(os.path.join(folder, entry))


def pid_alive(pid: int) -> bool:
    if os.name != "posix":  # on Windows os.kill(pid, 0) would send that process a Ctrl-C: assume alive, keep its file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, PermissionError):  # an id no process can have (not a name of ours); another user's: alive
        pass
    return True


def make_dir(path: str, flag: str) -> str | None:
    """Returns the topmost folder of the path that it made, None if the folder was there."""
    top, parent = None, os.path.abspath(path)
    while not os.path.exists(parent):
        top, parent = parent, os.path.dirname(parent)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a file in the way, no permission
        raise UserError(f"{flag} {path!r} cannot be made a folder ({e.strerror}). HINT: pass another path") from None
    return top


def another(given: str, example: str) -> str:
    """The example folder that a hint refusing `given` suggests: a new one (example, example2, ...)."""
    n, path = 1, example
    while os.path.exists(path) or os.path.abspath(path) == os.path.abspath(given):
        n, path = n + 1, f"{example}{n + 1}"
    return path


def file_in(path: str, name: str) -> str:
    """A folder passed for a file stands for the file of that name in it: --ckpt a run's folder for its ckpt_last.pt
    (nanoGPT and litgpt sample from a folder), --spm a data or run folder for its tokenizer.model."""
    inside = os.path.join(path, name)
    return inside if os.path.isdir(path) and os.path.isfile(inside) else path


def require_file(path: str, what: str, hint: str) -> None:
    if os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a directory, expected a file. HINT: {hint}")
    if not os.path.exists(path):
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(folder) and not os.access(folder, os.R_OK | os.X_OK):  # (then nothing in it seems to exist)
            raise UserError(f"{what} {path!r} cannot be read: the folder's permissions do not let this user in. HINT: "
                            f"check them (`ls -ld {folder}`), or run as its owner")
        raise UserError(f"{what} {path!r} does not exist. HINT: {hint}")
    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} is not a regular file (a pipe or a device?); it is read more than once. "
                        f"HINT: save it to a file first")


def settle_cpu(device: torch.device) -> None:
    """Two habits of the libraries, met for a run on the CPU:
    - MKL's vector math (torch's exp, log, tanh, sin, cos, sqrt on a CPU) sets itself up at its first call. When that
      call was split over 2 threads, one thread's half came out in other last bits in 5 of 60 processes (exp of
      512,000 floats), and two runs of one command trained apart from their first step. A first call on one thread
      settles it (0 of 80).
    - glibc hands large freed blocks back to the kernel, so the next step's tensors of the same sizes are faulted in
      again, page by page, zeroed: 10-20 % of a training step and of batch-16 decoding on 2 cores. Told to keep them
      (as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1 would from outside), the process holds its peak memory instead.
      Not for a GPU run, whose checkpoint copies would stay held; other libcs: no change."""
    if device.type != "cpu":
        return
    torch.ones(8).exp()  # under the 2,048 elements that torch splits over threads
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None)
            libc.mallopt(-4, 0)  # M_MMAP_MAX: no block gets a mapping of its own, which free() would unmap
            libc.mallopt(-1, -1)  # M_TRIM_THRESHOLD: never shrink the heap


@functools.cache
def intel_cpu() -> bool:
    """MKL's small products differ by vendor: on an AMD EPYC its plain product ran one row on one core, and its packed
    product (see Linear) was measured on Intel Xeons only."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            return "GenuineIntel" in f.read(4096)
    return "Intel" in platform.processor()  # Windows: "Intel64 Family 6 ..., GenuineIntel"


def physical_memory() -> int:
    with contextlib.suppress(AttributeError, ValueError, OSError):  # (Windows has no sysconf: 0)
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 0


def beside_me(name: str = os.path.basename(__file__)) -> str:
    """This script, or a file beside it, as a command printed for the user names it: from the working folder if it is
    under it, else in full (so that `python path/to/standalone_transformer_lm.py demo` prints commands that run)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    with contextlib.suppress(ValueError):  # (Windows: another drive)
        rel = os.path.relpath(path)
        path = path if rel.startswith("..") else rel
    return shlex.quote(path)  # (a folder with a space in its name)


def check_flags(args, checks) -> None:
    """checks: (flag name, whether its value is fine, what it must be)."""
    for name, ok, want in checks:
        if not ok:
            raise UserError(f"--{name} must be {want}, got {getattr(args, name)}")


def out_of_memory(e: Exception) -> tuple[str, str] | None:
    """("out of GPU memory", " (Tried to allocate 2.00 GiB)") when e is a failed allocation; compile wraps them."""
    # (mostly the kernel's OOM killer ends it first); MemoryError: numpy's, or Python's
    cpu = isinstance(e, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(e)
    if not (isinstance(e, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(e) or cpu):
        return None
    detail = re.search(r"[Tt]ried to allocate [\d.]+ \w+", str(e))
    return f"out of {'CPU' if cpu else 'GPU'} memory", f" ({detail[0]})" if detail else ""


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and token files

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
PREP_FILES = ("tokenizer.model", "train.bin", "val.bin", "meta.json")  # in the order prep renames them into place
# What marks a folder as a training run's or a model's (config.json: a converted one too), and as prepped data: each
# command refuses to write into the other's
MODEL_FILES = ("ckpt_last.pt", "ckpt_best.pt", "pytorch_model.bin", "config.json")
DATA_FILES = ("meta.json", "train.bin")
SP_MAX_LINE_BYTES = 4192  # SentencePiece's training limit per sentence; longer lines are still encoded in full
BLOCK_BYTES = 1 << 18  # prep reads and encodes the corpus in blocks of about this many bytes
MAX_LINE_BYTES = 1 << 26  # 64 MB; encoding a line takes 50-90 bytes of memory per byte of it (more for short words)
MIN_VOCAB, MAX_VOCAB = 300, 1 << 20  # 4 specials + 256 byte pieces need room; a million is beyond any sane LM

# Trainer options, chosen so that decode(encode(line)) == line for every line (but one holding "▁", which SentencePiece
# decodes as a space), as with LLaMA's tokenizer:
# identity normalisation and no whitespace cleanup keep tabs, runs of spaces and leading spaces (nmt_nfkc would turn
# tabs into spaces and merge double spaces); byte fallback means no text is ever unknown; split digits as LLaMA does;
# the dummy prefix makes a line's first word the same token as it is mid-line. sentencepiece is imported where used.
SP_TRAINER_OPTIONS = dict(
    model_type="bpe", unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, byte_fallback=True,
    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
    allow_whitespace_only_pieces=True, character_coverage=0.9995, max_sentence_length=SP_MAX_LINE_BYTES,
    shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2,
    num_threads=16,  # fixed, not the core count: the model file records it, and the same input must give the same file
)


def load_tokenizer(path: str):
    import sentencepiece as spm
    require_file(path, "tokenizer", "run `prep` first, or pass --spm path/to/tokenizer.model")
    with open(path, "rb") as f:  # read here: SentencePiece cannot open a path that is not UTF-8
        proto = f.read()
    try:
        if not proto:  # (SentencePiece would take it as a model of no pieces)
            raise RuntimeError("the file is empty")
        return spm.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, OSError) as e:
        raise UserError(f"{path!r} is not a SentencePiece model ({e}). HINT: pass the tokenizer.model that `prep` "
                        f"wrote") from None


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def read_blocks(path: str, start: int, end: int):
    """Yield byte blocks of [start, end) that each end at a line end."""
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        while pos < end:
            block = f.read(min(BLOCK_BYTES, end - pos))
            if pos + len(block) < end and not block.endswith(b"\n"):
                line_start = pos + block.rfind(b"\n") + 1
                rest = f.readline(MAX_LINE_BYTES)
                block += rest
                if pos + len(block) < end and len(rest) < MAX_LINE_BYTES and not rest.endswith(b"\n"):
                    raise UserError(f"{path!r} got shorter while prep read it (it ended at byte "
                                    f"{pos + len(block):,} of {end:,}). HINT: prep a copy of it that nothing writes to")
                if pos + len(block) < end and not block.endswith(b"\n"):
                    line, q = block[line_start - pos:], shlex.quote(path)
                    fix = f"e.g. `fold -s -w 10000 {q} > corpus.folded.txt`"
                    if line.count(b" ") * 10_000 < len(line):  # fold would find no space, and cut through characters
                        fix = f"cut at sentence ends, e.g. `sed 's/。/。\\n/g' {q} > corpus.split.txt`"
                    raise UserError(f"{path!r} has a line of more than {MAX_LINE_BYTES >> 20} MB (from byte "
                                    f"{line_start:,}); a line is one sample, and encoding that much at once takes "
                                    f"gigabytes. HINT: write one document per line, {fix}")
            pos += len(block)
            yield block


def clean_lines(block: bytes, normalize_ws: bool, stats: Counter) -> list[str]:
    """Bytes to the samples they hold: one per line, CR of CRLF and a leading byte order mark dropped, invalid UTF-8
    replaced, blank lines out."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        text = block.decode("utf-8", errors="replace")
        stats["invalid UTF-8 sequences replaced"] += text.count("\ufffd") - block.count("\ufffd".encode())
    lines = text.split("\n")  # not splitlines(): that would also split on \x0b, \x1c, \u2028 inside a sample
    if lines[-1] == "":
        lines.pop()
    if "\r" in text:
        stats["CRLF line ends"] += sum(line.endswith("\r") for line in lines)
        lines = [line.removesuffix("\r") for line in lines]
    if "\ufeff" in text:  # `cat *.txt` puts each file's UTF-8 byte order mark at the start of a line
        stats["byte order marks removed"] += sum(line.startswith("\ufeff") for line in lines)
        lines = [line.lstrip("\ufeff") for line in lines]
    if normalize_ws:
        lines = [" ".join(line.split()) for line in lines]
    kept = [line for line in lines if line and not line.isspace()]
    stats["lines read"] += len(lines)
    stats["blank lines skipped"] += len(lines) - len(kept)
    return kept


def drop_duplicates(lines: list[str], seen: set | None, stats: Counter) -> list[str]:
    if seen is None:
        return lines
    kept = []
    for line in lines:
        key = hashlib.blake2b(line.encode(), digest_size=8).digest()
        if key not in seen:
            seen.add(key)
            kept.append(line)
    stats["duplicate lines skipped"] += len(lines) - len(kept)
    return kept


def train_tokenizer(lines: list[str], vocab_size: int) -> bytes:
    import sentencepiece as spm
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                       **SP_TRAINER_OPTIONS)
    except RuntimeError as e:
        m = re.search(r"Please set it to a value <= (\d+)", str(e))
        if m:
            most = int(m.group(1))
            fix = f"pass --vocab_size {most} or less, or use more text" if most >= MIN_VOCAB else "use more text"
            raise UserError(f"the corpus is too small for --vocab_size {vocab_size}: its tokenizer sample supports "
                            f"at most {most}. HINT: {fix}") from None
        m = re.search(r"(\d+) vs (\d+)", str(e))  # the characters to cover, plus 4 special and 256 byte pieces
        if m and "required_chars" in str(e):
            need = int(m.group(2))
            raise UserError(f"--vocab_size {vocab_size} cannot hold the {need - 260} distinct characters that make "
                            f"99.95 % of the corpus, beside 260 special and byte tokens. HINT: pass --vocab_size "
                            f"{need} or more") from None
        raise UserError(f"SentencePiece could not train a tokenizer: {e}") from None
    return model.getvalue()


# SentencePiece's words: a run of "▁" (its escaped space, and the one it puts before each line) and what follows up to
# the next; "\n" stands between two samples. Its BPE never merges across the start of a word, so a line's ids are its
# words' ids in order, and each distinct word needs encoding once.
WORD = re.compile("\u2581+[^\u2581\n]*|\n")
CACHED_WORDS, CACHED_WORD_CHARS = 1 << 18, 64  # per worker, about 50 MB at most
encoder = {}  # in each worker process: the tokenizer, the dtype and the word cache


def start_encoder(spm_path: str, dtype, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not main()'s handler: a worker told to stop, stops
    if sys.platform == "linux":  # a prep killed outright (SIGKILL, the out-of-memory killer) takes its workers along,
        with contextlib.suppress(OSError, AttributeError):  # who would else wait on its queue forever, holding its
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # stdout open (PR_SET_PDEATHSIG)
        if os.getppid() != parent:  # it was killed before that
            os._exit(1)
    encoder.update(sp=load_tokenizer(spm_path), dtype=np.dtype(dtype), words={})


def encode_samples(text: str, state: dict | None = None) -> bytes:
    """Samples, one per line of text, to [bos] + ids + [eos] each, concatenated: exactly sp.encode's ids, from one
    encode per distinct word instead of one per use (2.7x faster). state: the worker's encoder, or one like it."""
    state = encoder if state is None else state
    sp, dtype, cache = state["sp"], state["dtype"], state["words"]
    if not text:
        return b""
    if len(cache) > CACHED_WORDS or not cache:  # full: start again (cheaper than keeping an LRU order per word)
        cache.clear()
        alone = sp.encode("a ", num_threads=1)[len(sp.encode("a", num_threads=1)):]  # "▁" at a line end
        cache.update({"\n": np.array([EOS_ID, BOS_ID], dtype).tobytes(), "\u2581": np.array(alone, dtype).tobytes()})
    words = WORD.findall("\u2581" + text.replace("\n", "\n\u2581").replace(" ", "\u2581"))
    new = list(set(words).difference(cache))
    for word, ids in zip(new, sp.encode([w[1:] for w in new], num_threads=1)):  # SentencePiece puts the ▁ back
        cache[word] = np.array(ids, dtype).tobytes()
    edge = np.array([BOS_ID, EOS_ID], dtype).tobytes()
    tokens = b"".join([edge[:dtype.itemsize], *map(cache.__getitem__, words), edge[dtype.itemsize:]])
    for word in new:
        if len(word) > CACHED_WORD_CHARS:  # rarely seen twice, and a 64 MB line can be one word
            del cache[word]
    return tokens


def split_offset(path: str, size: int, val_fraction: float) -> int:
    """Byte offset of the first line of the val split: the first line that starts at or after the cut."""
    cut = int(size * (1.0 - val_fraction))
    if cut <= 0 or cut >= size:
        return min(max(cut, 0), size)
    with open(path, "rb") as f:
        f.seek(cut - 1)
        f.readline()
        return f.tell()


def check_encoding(path: str) -> None:
    """Refuse, before any work, a corpus whose first megabyte is not UTF-8 text with \\n line ends: read as UTF-8,
    a compressed file, UTF-16 or Latin-1 would be trained on as garbage, and old-Mac \\r line ends would make the
    file one sample."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    bad = len(head.decode("utf-8", errors="replace")) - len(head.decode("utf-8", errors="ignore"))
    q = shlex.quote(path)  # in the commands of the hints (a name with a space)
    hint = f"HINT: convert it, e.g. `iconv -f LATIN1 -t UTF-8 {q} > corpus.utf8.txt`"
    packed = {b"\x1f\x8b": ("gzip", "gunzip -c"), b"\x28\xb5\x2f\xfd": ("zstd", "zstd -dc"),  # to stdout: any name
              b"\xfd7zXZ": ("xz", "xz -dc"), b"BZh": ("bzip2", "bzip2 -dc"), b"PK\x03\x04": ("zip", "unzip -p"),
              b"PAR1": ("Parquet", None)}
    kind, tool = next((v for magic, v in packed.items() if head.startswith(magic)), (None, None))
    if kind and (bad or b"\x00" in head):  # binary after the magic bytes: not a text that happens to start so
        fix = f"`{tool} {q} > corpus.unpacked.txt` and pass that" if tool else "write its text one document per line"
        raise UserError(f"corpus {path!r} is binary ({kind}), not text. HINT: {fix}")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"corpus {path!r} is UTF-16 or UTF-32 (it starts with a byte order mark), not UTF-8. "
                        f"{hint.replace('LATIN1', 'UTF-16')}")
    if (nul := head.count(b"\x00")) > len(head) // 100:  # a token file, a model, a database; or UTF-16 without a mark
        raise UserError(f"corpus {path!r} is not UTF-8 text: {nul / len(head):.0%} of its first {len(head):,} bytes "
                        f"are NUL (a binary file, or UTF-16 or UTF-32 text). HINT: pass a text file, one document per "
                        f"line; convert UTF-16 with `iconv -f UTF-16 -t UTF-8 {q} > corpus.utf8.txt`")
    if bad > max(10, len(head) // 1000):  # a few bad bytes are repaired and counted in the stats
        raise UserError(f"corpus {path!r} is not UTF-8: {bad:,} invalid sequences in its first {len(head):,} bytes "
                        f"(Latin-1 or Windows-1252?). {hint}")
    if b"\n" not in head and b"\r" in head:
        raise UserError(f"corpus {path!r} ends its lines with \\r alone (old Mac style), so it would be one sample. "
                        f"HINT: `tr '\\r' '\\n' < {q} > corpus.lf.txt`")


def is_long(line: str) -> bool:
    return len(line) * 4 > SP_MAX_LINE_BYTES and len(line.encode()) > SP_MAX_LINE_BYTES


def tokenizer_sample(text_path: str, size: int, sample_lines: int, seed: int, dedup: bool, normalize_ws: bool,
                     progress: bool) -> list[str]:
    """A seeded reservoir sample of the corpus's lines: bounded memory whatever the corpus size. A line over
    SentencePiece's limit contributes its first part (one document per line is common; skipping them would train
    the tokenizer on short documents only)."""
    rng, sample, n_seen = random.Random(seed), [], 0
    seen = set() if dedup else None
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="sampling",
               disable=not (progress and sys.stderr.isatty()), mininterval=1.0)
    for block in read_blocks(text_path, 0, size):
        for line in drop_duplicates(clean_lines(block, normalize_ws, Counter()), seen, Counter()):
            if is_long(line):  # its head, ended at a space if there is one near the cut (Chinese text has none)
                head = line.encode()[:SP_MAX_LINE_BYTES].decode(errors="ignore")
                line = head[:cut] if (cut := head.rfind(" ")) > len(head) // 2 else head
            n_seen += 1
            if len(sample) < sample_lines:
                sample.append(line)
            elif (j := rng.randrange(n_seen)) < sample_lines:
                sample[j] = line
        bar.update(len(block))
    bar.close()
    return sample


def encode_corpus(text_path: str, splits: dict, spm_path: str, dtype, num_workers: int, dedup: bool,
                  normalize_ws: bool, stats: Counter, progress: bool) -> dict:
    """Encode byte ranges {split: (token file, start, end)} of the corpus, in blocks on num_workers processes, at
    most 2 blocks per worker in flight (bounded memory), written in corpus order. Returns counts per split."""
    counts = {split: Counter() for split in splits}
    seen = set() if dedup else None  # exact dedup: about 90 bytes per distinct line, the one cost that grows
    # Processes, not threads: SentencePiece's own encoder releases the GIL, but encoding word by word from a cache is
    # 2.7x faster and holds it. Forked on Linux, so that a worker starts in milliseconds without importing torch again.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ProcessPoolExecutor(num_workers, context, initializer=start_encoder, initargs=(spm_path, dtype, os.getpid()))
    bar = tqdm(total=sum(e - s for _, s, e in splits.values()), unit="B", unit_scale=True, desc="encoding",
               disable=not (progress and sys.stderr.isatty()), mininterval=1.0)
    try:
        for split, (path, start, end) in splits.items():
            pending = deque()
            with open(path, "wb") as out:
                for block in chain(read_blocks(text_path, start, end), [None]):
                    if block is not None:
                        lines = drop_duplicates(clean_lines(block, normalize_ws, stats), seen, counts[split])
                        stats["long lines (> 4192 bytes, encoded, sampled in part)"] += sum(map(is_long, lines))
                        pending.append((pool.submit(encode_samples, "\n".join(lines)), len(lines), len(block)))
                    while pending and (block is None or len(pending) > 2 * num_workers):
                        result, n_lines, n_bytes = pending.popleft()
                        tokens = result.result()
                        out.write(tokens)
                        counts[split].update(tokens=len(tokens) // np.dtype(dtype).itemsize, samples=n_lines)
                        bar.update(n_bytes)
                out.flush()
                os.fsync(out.fileno())  # on disk before prep renames it into place
    except BrokenProcessPool:
        raise UserError(f"an encoding worker died (out of memory?) while encoding {text_path!r}. HINT: pass fewer "
                        f"--num_workers") from None
    finally:
        bar.close()
        pool.shutdown(cancel_futures=True)
    return counts


# ----------------------------------------------------------------------------------------------------------------------
# Prep: corpus -> tokenizer.model, train.bin, val.bin, meta.json


def reuse_tokenizer(path: str, vocab_size: int | None) -> tuple[bytes, int]:
    """An earlier prep's tokenizer.model (or a run's copy of it), to encode more text as that run's was encoded."""
    sp, ids = load_tokenizer(path), (UNK_ID, BOS_ID, EOS_ID, PAD_ID)
    if (theirs := (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id())) != ids:
        raise UserError(f"tokenizer {path!r} has the special ids unk/bos/eos/pad {'/'.join(map(str, theirs))}, where "
                        f"prep's token files use {'/'.join(map(str, ids))}. HINT: pass a tokenizer.model that prep "
                        f"wrote, or drop --spm to train one")
    if vocab_size not in (None, sp.vocab_size()):
        raise UserError(f"--vocab_size {vocab_size} differs from the {sp.vocab_size()} tokens of --spm {path!r}. "
                        f"HINT: drop --vocab_size")
    # Prep encodes word by word (encode_samples), which gives sp.encode's ids for tokenizers trained as prep trains
    # them: BPE (which scores its pieces by merge rank, 0, -1, -2, ...; unigram by log probability), a dummy prefix,
    # whitespace kept, and no piece that spans a word's end (other trainer options would give "▁of▁the", "the▁")
    if not all(sp.get_score(i).is_integer() for i in range(sp.vocab_size())):
        raise UserError(f"tokenizer {path!r} is not a BPE model (a unigram one?), and prep's encoding would not give "
                        f"its ids. HINT: pass a tokenizer.model that prep wrote, or drop --spm to train one")
    spans = next((p for p in map(sp.id_to_piece, range(sp.vocab_size())) if re.search("[^\u2581]\u2581", p)), None)
    texts = ["The sun is", "  two  spaces ", "tab\tthen", "digits 12 345", "中文 字符", " lead", "trail "]
    by_word = np.frombuffer(encode_samples("\n".join(texts), dict(sp=sp, dtype=np.dtype(np.uint32), words={})),
                            np.uint32).tolist()
    if spans or by_word != [i for text in texts for i in (BOS_ID, *sp.encode(text), EOS_ID)]:
        why = f"a piece spans words: {spans!r}" if spans else "it encodes spaces otherwise"
        raise UserError(f"tokenizer {path!r} was not trained as prep trains tokenizers ({why}), and prep's encoding "
                        f"would not give its ids. HINT: pass a tokenizer.model that prep wrote, or drop --spm to train "
                        f"one")
    with open(path, "rb") as f:
        return f.read(), sp.vocab_size()


def prep(text_path: str, out_dir: str, vocab_size: int | None = None, val_fraction: float = 0.005, seed: int = 1337,
         num_workers: int = 0, sample_lines: int = 300_000, dedup: bool = False, normalize_whitespace: bool = False,
         spm_path: str | None = None, progress: bool = True) -> dict:
    """vocab_size: of the tokenizer trained here (None: 32000); spm_path: encode with this one instead."""
    require_file(text_path, "corpus", "pass --text_path with one UTF-8 text file, one sample per line")
    # (read now: it may be the very tokenizer.model in out_dir that this prep replaces)
    given, vocab_size = (reuse_tokenizer(spm_path, vocab_size) if spm_path else
                         (None, 32000 if vocab_size is None else vocab_size))
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise UserError(f"--vocab_size {vocab_size} is out of range. HINT: use {MIN_VOCAB} to {MAX_VOCAB} (32000 is "
                        f"LLaMA's; small corpora need a few thousand)")
    if not 0.0 < val_fraction < 0.5:
        raise UserError(f"--val_fraction {val_fraction} must be in (0, 0.5)")
    if num_workers < 0:
        raise UserError(f"--num_workers {num_workers} must be 0 (all cores) or more")
    if sample_lines < 1:
        raise UserError(f"--sample_lines {sample_lines} must be at least 1")
    final = {name: os.path.join(out_dir, name) for name in PREP_FILES}
    if any(os.path.exists(path) and os.path.samefile(path, text_path) for path in final.values()):
        raise UserError(f"corpus {text_path!r} is one of the files prep writes into --out_dir {out_dir!r}. HINT: pass "
                        f"another --out_dir")
    run = next((name for name in MODEL_FILES if os.path.exists(os.path.join(out_dir, name))), None)
    if run:
        raise UserError(f"--out_dir {out_dir!r} holds a training run or a model ({run}), whose tokenizer.model prep "
                        f"would replace. HINT: pass a folder of its own for the data, e.g. --out_dir "
                        f"{another(out_dir, './data')}")
    make_dir(out_dir, "--out_dir")
    if not os.access(out_dir, os.W_OK | os.X_OK) or not os.access(text_path, os.R_OK):
        raise UserError(f"cannot read {text_path!r} or write into {out_dir!r}. HINT: check their permissions")
    remove_stale_tmp(out_dir, final)
    check_encoding(text_path)
    size = os.path.getsize(text_path)
    # every core this process may use (taskset, Slurm), not every core of the machine; more workers would encode no
    # faster (and a pool starts them all at once)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    num_workers = min(num_workers or cores, cores)
    sample = tokenizer_sample(text_path, size, sample_lines, seed, dedup, normalize_whitespace, progress)
    if not sample:
        raise UserError(f"corpus {text_path!r} has no text (it is empty or only blank lines). HINT: pass a UTF-8 "
                        f"file with one sample per line")
    cut = split_offset(text_path, size, val_fraction)
    if cut >= size:  # known now, not after the encoding
        raise UserError(f"the val split of {text_path!r} is empty: no line starts in its last {val_fraction:g}. "
                        f"HINT: use a corpus with more lines, or a larger --val_fraction")
    print0(f"encoding with {spm_path} ({vocab_size} tokens)" if given else
           f"training a {vocab_size}-token BPE tokenizer on {len(sample):,} sampled lines")
    # What the corpus looks like, said before the long work: from the sample, where long lines are cut to 4 kB
    if sum(line.startswith('{"') for line in sample) > 0.9 * len(sample):  # JSON Lines
        print0("  note: the lines are JSON objects, so the model will learn JSON syntax too. If the text is in a field "
               "of them, write that field one document per line (its newlines as spaces) and prep that file instead")
    if (average := sum(map(len, sample)) / len(sample)) < 100:  # hard-wrapped text, verse, a sentence per line
        print0(f"  note: lines average {average:.0f} characters. Each line is one sample, ended by eos, so the model "
               f"learns to stop after about that much text; if your documents are wrapped over several lines, write "
               f"each one (or each paragraph) on a line of its own first")
    model_proto = given or train_tokenizer(sample, vocab_size)
    del sample

    # Everything goes to temporary names first, each synced, and is renamed into place once all of it is written,
    # meta.json last: a failed run (a full disk at any file) leaves an earlier run's files as they were.
    tmp = {name: os.path.join(out_dir, f".{name}.tmp{os.getpid()}") for name in final}
    stats, t0 = Counter(), time.perf_counter()
    try:
        write_synced(tmp["tokenizer.model"], lambda f: f.write(model_proto))
        counts = encode_corpus(text_path, {"train": (tmp["train.bin"], 0, cut), "val": (tmp["val.bin"], cut, size)},
                               tmp["tokenizer.model"], token_dtype(vocab_size), num_workers, dedup,
                               normalize_whitespace, stats, progress)
        for split in ("train", "val"):
            repeats = counts[split].pop("duplicate lines skipped", 0)  # per split: all of a val tail can be repeats
            if dedup:
                stats["duplicate lines skipped"] += repeats
            if counts[split]["samples"] == 0 and repeats:
                raise UserError(f"the {split} split of {text_path!r} is empty: --dedup 1 dropped each of its lines as "
                                f"a repeat of an earlier one (is the corpus repeated end to end?). HINT: dedup it "
                                f"first (`awk '!seen[$0]++' {shlex.quote(text_path)} > corpus.dedup.txt`) and prep "
                                f"that without --dedup")
            if counts[split]["samples"] == 0:
                raise UserError(f"the {split} split of {text_path!r} is empty ({size} bytes, --val_fraction "
                                f"{val_fraction}). HINT: use a corpus with more lines, or change --val_fraction")
        elapsed = time.perf_counter() - t0
        meta = {
            "format_version": 1,
            "vocab_size": vocab_size,
            "dtype": np.dtype(token_dtype(vocab_size)).name,
            "special_ids": {"unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID, "pad": PAD_ID},
            "tokenizer_sha256": hashlib.sha256(model_proto).hexdigest(),
            "train": dict(counts["train"]),
            "val": dict(counts["val"]),
            "stats": dict(sorted(stats.items())),
            "options": {"text_path": os.path.abspath(text_path), "vocab_size": vocab_size,
                        "val_fraction": val_fraction, "seed": seed, "sample_lines": sample_lines, "dedup": dedup,
                        "normalize_whitespace": normalize_whitespace, "sp_trainer": SP_TRAINER_OPTIONS,
                        "spm": spm_path and os.path.abspath(spm_path)},
        }
        write_synced(tmp["meta.json"], lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
        with signals_held():  # all four, or (killed outright) a mix that train refuses
            for name in final:
                os.replace(tmp[name], final[name])
            sync_folder(out_dir)
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    n_tokens = counts["train"]["tokens"] + counts["val"]["tokens"]
    n_samples = counts["train"]["samples"] + counts["val"]["samples"]
    print0(f"wrote {out_dir}: {counts['train']['tokens']:,} train / {counts['val']['tokens']:,} val tokens "
           f"({meta['dtype']}), {n_samples:,} samples, {n_tokens / n_samples:.1f} tokens per sample, "
           f"{n_tokens / elapsed:,.0f} tokens/s ({size / 1e6 / elapsed:.1f} MB/s) on {num_workers} worker(s)")
    print0("  " + ", ".join(f"{k}: {v:,}" for k, v in sorted(stats.items())))
    return meta


# ----------------------------------------------------------------------------------------------------------------------
# Batches


class Batches:
    """Training windows as a pure function of (seed, step, position in the global batch).

    The corpus is cut into windows of seq_len + 1 tokens; each epoch visits all of them once in a seeded order, with a
    seeded shift of the window grid. Row g of step s is window number s * global_batch + g of that sequence, so 2
    ranks x 1 micro-step read exactly what 1 rank x 2 micro-steps reads, and a resume (on any number of processes)
    continues the stream where it stopped. A resume with another global batch goes on from the windows read so far
    (`offset`): the sequence then neither repeats nor skips windows. seed None: the windows in file order, unshifted
    (val.bin, whose windows do not depend on the run's seed).
    """

    def __init__(self, path: str, dtype, seq_len: int, seed: int | None, global_batch: int,
                 vocab_size: int = 1 << 32):
        self.data = np.memmap(path, dtype=dtype, mode="r")
        self.path, self.seq_len, self.seed, self.global_batch = path, seq_len, seed, global_batch
        self.vocab_size = vocab_size  # ids from it on are refused: a damaged file
        if len(self.data) <= seq_len:
            raise UserError(f"{path} holds {len(self.data):,} tokens, not one sequence of --seq_len {seq_len} + 1. "
                            f"HINT: use a shorter --seq_len, a bigger corpus, or for val.bin a larger --val_fraction "
                            f"in prep")
        # one fewer than fit, room for the shift; in file order (unshifted) every one
        self.n_windows = (len(self.data) - 1) // seq_len if seed is None else max(1, len(self.data) // seq_len - 1)
        self.max_shift = min(seq_len, len(self.data) - self.n_windows * seq_len)
        self._epoch, self._order, self._shift = -1, None, 0
        self.offset = 0  # window number of step 0: read so far minus step * global_batch, after such a resume

    def window(self, index: int) -> np.ndarray:
        epoch, i = divmod(index, self.n_windows)
        if self.seed is None:
            return self.data[i * self.seq_len:(i + 1) * self.seq_len + 1]
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, rng.permutation(self.n_windows)
            self._shift = int(rng.integers(self.max_shift))
        start = self._shift + int(self._order[i]) * self.seq_len
        return self.data[start:start + self.seq_len + 1]

    def get(self, step: int, rows, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        xy = np.stack([self.window(self.offset + step * self.global_batch + g) for g in rows])
        if xy.max() >= self.vocab_size:  # (on a GPU the embedding would stop the process with a device-side assert)
            raise UserError(f"{self.path} holds token id {xy.max()}, beyond the {self.vocab_size}-token vocabulary of "
                            f"its meta.json: the file is damaged. HINT: run prep again")
        xy = torch.from_numpy(xy.astype(np.int64))
        if device.type == "cuda":  # pinned + non_blocking: the host queues the copy behind the step, not waiting
            xy = xy.pin_memory().to(device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]  # (B, T) inputs, (B, T) targets

    def state_dict(self, step: int) -> dict:  # windows: those read before this step
        return {"seed": self.seed, "seq_len": self.seq_len, "n_windows": self.n_windows,
                "global_batch": self.global_batch, "windows": self.offset + step * self.global_batch}


# ----------------------------------------------------------------------------------------------------------------------
# Model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # in float32, as HF LLaMA does
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype) * self.weight


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    # numpy, each value rounded once to float32 from float64: torch's CPU pow and cos gave other last bits in their
    # first call of some processes (1 in 6 to 1 in 40), so two runs of one command trained apart. Rounded where HF
    # LLaMA's float32 arithmetic rounds (exponent, power, reciprocal, angle), so that its angles are ours: frequencies
    # rounded once were a last bit off in 10 of 32 at head_dim 64, and HF's logits drifted from ours with the position.
    exponent = (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)).astype(np.float64)
    inv_freq = np.float32(1) / (np.float64(np.float32(cfg.rope_theta)) ** exponent).astype(np.float32)
    freqs = np.outer(np.arange(cfg.seq_len, dtype=np.float32), inv_freq)  # (T, head_dim/2) float32
    emb = np.concatenate((freqs, freqs), axis=-1).astype(np.float64)  # (T, head_dim): pairs i, i + head_dim/2
    return torch.from_numpy(np.cos(emb).astype(np.float32)), torch.from_numpy(np.sin(emb).astype(np.float32))


def apply_rope(x, cos, sin):  # x: (B, T, heads, head_dim); cos, sin: (T, 1, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear without bias, whose weight generate() may pack for the rows it decodes (lay_out_for_decoding says
    when): MKL's packed GEMM, laid out once for that many rows. 16 rows by the (32000, 256) output layer on 2 Intel Xeon
    cores: 2.7 ms against 4.9 plain (97 and 55 GFLOP/s; large products reach 196). Other row counts: F.linear."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out, bias=False)
        self.packed, self.packed_rows = None, 0

    def reset_parameters(self):  # nn.Linear's own draw, which init_weights() replaced: 4.3 of 11.5 s at 700m on 2 cores
        pass

    def forward(self, x):
        if torch.compiler.is_compiling() or self.packed is None:  # (a compiled step plans its own products)
            return F.linear(x, self.weight)
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, None, self.packed_rows)


class KVCache(nn.Module):
    """Preallocated keys and values for decoding: prefill writes the prompt, each decode step writes one position."""

    def __init__(self, batch: int, length: int, cfg: ModelConfig, dtype, device):
        super().__init__()
        shape = (batch, cfg.n_kv_head, length, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k, v):  # pos: (T,) absolute positions of the new keys
        rows = k.size(0)  # all of them when decoding; the first when prefilling a prompt shared by every sample.
        # A view only then: a compiled decode step writing through one ran 50 % slower at batch 16 on CPU.
        cache_k, cache_v = (self.k, self.v) if rows == self.k.size(0) else (self.k[:rows], self.v[:rows])
        cache_k.index_copy_(2, pos, k)
        cache_v.index_copy_(2, pos, v)
        return cache_k, cache_v

    def copy_row0(self, length: int):  # a prompt prefilled once, into row 0, serves every sample
        self.k[1:, :, :length] = self.k[:1, :, :length]
        self.v[1:, :, :length] = self.v[:1, :, :length]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dropout: float):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim, self.dropout = cfg.n_head, cfg.n_kv_head, cfg.head_dim, dropout
        self.qkv_proj = Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim)  # q, k, v
        self.o_proj = Linear(cfg.n_head * cfg.head_dim, cfg.d_model)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, pos=None, mask=None, n_ctx=None):
        B, T, _ = x.shape
        qk, v = self.qkv_proj(x).view(B, T, -1, self.head_dim).split([self.n_head + self.n_kv_head, self.n_kv_head], 2)
        qk = apply_rope(qk, cos, sin).transpose(1, 2)  # q and k in one go: (B, n_head + n_kv_head, T, head_dim)
        q, k = qk.split([self.n_head, self.n_kv_head], dim=1)  # (B, n_head, T, head_dim), (B, n_kv_head, T, head_dim)
        v = v.transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        if pos is not None:  # decoding: attend over the cache's first n_ctx slots
            k, v = (t[:, :, :n_ctx] for t in self.cache.update(pos, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)  # (B, n_head, T, head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):  # SwiGLU
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.d_model, 2 * cfg.ffn_hidden)  # rows: gate, up
        self.down_proj = Linear(cfg.ffn_hidden, cfg.d_model)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, dropout: float):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, dropout)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = FeedForward(cfg)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x, cos, sin, pos=None, mask=None, n_ctx=None):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, pos, mask, n_ctx))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class LinearCrossEntropy(torch.autograd.Function):
    """lm_head and the mean cross-entropy as one float32 step, over a single (tokens, vocab) tensor: the logits become
    their softmax in place, and in backward the softmax minus the one-hot target is their gradient, where autograd's
    log_softmax and nll_loss allocate three more (fresh memory, faulted in page by page on a CPU, where that was a
    quarter of the step at vocab 32,000) and take a second exp of every logit."""

    @staticmethod
    def forward(ctx, x, weight, targets):  # x (N, d_model), weight (vocab, d_model), targets (N,), -1 ignored
        probs = x @ weight.t()  # (N, vocab) logits
        counted, column = targets >= 0, targets.clamp(min=0)[:, None]  # (N,), (N, 1)
        top, picked = probs.amax(dim=-1), probs.gather(1, column)[:, 0]  # (N,) each
        torch.softmax(probs, dim=-1, out=probs)
        # log p = logit - max - log(sum of exps), and the largest probability is 1 / that sum: exact where a target's
        # probability underflows float32 (log of the softmax would read 87 nats or inf for a loss of 120)
        logp = picked - top + probs.amax(dim=-1).log()  # (N,)
        share = counted / counted.sum()  # of the mean; no target counted: nan, as F.cross_entropy
        ctx.save_for_backward(x, weight, column, probs, share)
        return -(logp * share).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, column, grad, share = ctx.saved_tensors  # grad: the softmax, (N, vocab)
        grad.scatter_add_(1, column, -torch.ones_like(share)[:, None])
        scale = (share * grad_loss)[:, None]  # (N, 1), each row's share of the loss: on the small operands, not grad
        return (grad @ weight) * scale, grad.t() @ (x * scale), None


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, dropout: float = 0.0):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=torch.empty(cfg.vocab_size, cfg.d_model))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.layers = nn.ModuleList(Block(cfg, dropout) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)  # float32 always: bf16 angles lose positions
        self.register_buffer("rope_sin", sin, persistent=False)
        self.decode_weight = None  # see output_layer
        self.init_weights()

    def init_weights(self):
        # GPT-2 / LLaMA-style: N(0, 0.02) everywhere, the two projections that write into the residual stream scaled
        # down by sqrt(2 * n_layer) so the stream's variance does not grow with depth; norms start at one (RMSNorm).
        # Drawn here only: Linear and the embedding (given an empty weight) skip their modules' own draws.
        std = 0.02
        nn.init.normal_(self.embed_tokens.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.layers:
            nn.init.normal_(block.self_attn.qkv_proj.weight, std=std)
            nn.init.normal_(block.mlp.gate_up_proj.weight, std=std)
            for proj in (block.self_attn.o_proj, block.mlp.down_proj):
                nn.init.normal_(proj.weight, std=std / math.sqrt(2 * self.cfg.n_layer))

    def forward(self, idx, targets=None, pos=None):
        """idx (B, T) token ids -> (logits, None). Training: targets (B, T), -1 ignored -> (None, loss). Decoding: pos
        (T,) positions in the KV cache -> (logits of the last position (B, 1, vocab_size), None)."""
        T, mask, n_ctx = idx.size(1), None, None
        if pos is None:
            cos, sin = self.rope_cos[:T, None], self.rope_sin[:T, None]
        else:  # query at position p sees cache slots 0..p. A compiled step attends over the whole cache, one static
            # shape (CUDA graphs replay it), masked. Eager attends over the slots written so far, unmasked where that
            # is the same: a prompt from slot 0 is causal, and one query sees every slot so far.
            cos, sin = self.rope_cos[pos, None], self.rope_sin[pos, None]
            compiling = torch.compiler.is_compiling()
            n_ctx = self.cfg.seq_len if compiling else int(pos[-1]) + 1
            if compiling or (T > 1 and n_ctx != T):
                mask = pos[:, None] >= torch.arange(n_ctx, device=idx.device)  # (T, n_ctx)
        x = self.dropout(self.embed_tokens(idx))  # (B, T, d_model)
        for block in self.layers:
            x = block(x, cos, sin, pos, mask, n_ctx)
        x = self.norm(x if pos is None else x[:, -1:])  # a prompt's prefill samples from its last position only
        if targets is None:
            return self.output_layer(x), None  # (B, T, vocab_size); decoding (B, 1, vocab_size)
        if x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
            return None, LinearCrossEntropy.apply(x.view(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1))
        logits = self.lm_head(x)  # autocast: the in-place gradient above would be rounded to 16 bits
        return None, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def output_layer(self, x):
        """lm_head. On a CPU, MKL multiplies a few rows by the (vocab, d_model) matrix far below its speed on large
        products. generate() packs it for batches on Intel CPUs (see Linear); else it runs in blocks of the vocabulary,
        one batched matmul on every core (MKL ran one row on one core of an AMD EPYC: at vocab 32000 on 2 EPYC cores,
        4.2-4.7 ms plain, 0.4-1.1 ms from the copy laid out block by block that generate() holds for each call). All
        are the same dot products: equal to rounding, bit-identical in most cases."""
        n, compiling = x.size(0) * x.size(1), torch.compiler.is_compiling()  # (a compiled step plans its own)
        if x.device.type != "cpu" or torch.is_grad_enabled() or n > 256 or (
                not compiling and self.lm_head.packed is not None):
            return self.lm_head(x)
        w = self.vocab_blocks() if compiling or self.decode_weight is None else self.decode_weight
        if w is None:
            return self.lm_head(x)
        logits = x.view(1, n, -1) @ w  # (blocks, n, vocab_size / blocks)
        return logits.transpose(0, 1).reshape(*x.shape[:2], -1)

    def vocab_blocks(self) -> torch.Tensor | None:
        """lm_head's weight viewed as (blocks, d_model, vocab_size / blocks); None when the vocabulary has no 4."""
        # gcd(vocab_size, 32) as its lowest set bit: torch 2.15 cannot compile math.gcd on Python 3.15 (math.integer)
        blocks = min(self.cfg.vocab_size & -self.cfg.vocab_size, 32)
        return self.lm_head.weight.view(blocks, -1, self.cfg.d_model).transpose(1, 2) if blocks >= 4 else None

    def lay_out_for_decoding(self, rows: int) -> None:
        """generate() lays the weights out for the rows it decodes at the start of a call, and drops them (rows 0) at
        the end: a copy made per call cannot miss a change of the weights between calls (a write through .data leaves
        no trace on the tensor, nor does a fused AdamW step). On a CPU, for more rows than one on an Intel CPU, every
        product is packed where there is room for the copies and the weights take at most 1 GiB (138m in float32, not
        350m): decode steps at batch 4 and 16 took 22-23 % less on 2 Xeon cores (MKL's small products differ by
        vendor, and the packed ones were measured on Xeons only). Else lm_head is laid out in vocabulary blocks."""
        w, weight_bytes = self.lm_head.weight, sum(p.numel() * p.element_size() for p in self.parameters())
        cpu = rows > 0 and w.device.type == "cpu"
        pack = (cpu and rows > 1 and w.dtype == torch.float32 and intel_cpu() and torch.backends.mkl.is_available()
                and hasattr(torch.ops.mkl, "_mkl_linear")  # the copies, as allocated, are up to 2.4x the weights:
                and 7 * weight_bytes <= physical_memory()  # with the weights, at most half the machine's memory,
                and weight_bytes <= 1 << 30)  # and 2.4 GiB (a container's limit may be far below the machine's)
        for m in self.modules():
            if isinstance(m, Linear):
                m.packed = torch.ops.mkl._mkl_reorder_linear_weight(m.weight.detach(), rows) if pack else None
                m.packed_rows = rows
        blocks = self.vocab_blocks() if cpu and not pack else None
        self.decode_weight = None if blocks is None else blocks.detach().contiguous()

    def flops_per_token(self) -> float:
        # PaLM (appendix B): 6 FLOPs per matmul parameter per token (forward + backward), plus attention scores and
        # weighted values: 12 * n_layer * (n_head * head_dim) * seq_len. The embedding is a lookup, not a matmul (a
        # tied lm_head is one, counted once); norm gains are not matmuls either.
        c = self.cfg
        matmul = c.n_params - c.vocab_size * c.d_model * (not c.tie_embeddings) - (2 * c.n_layer + 1) * c.d_model
        return 6 * matmul + 12 * c.n_layer * c.n_head * c.head_dim * c.seq_len


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer and LR schedule


def make_optimizer(model: Transformer, lr: float, weight_decay: float, device: torch.device):
    # Decay the matrices (embeddings, projections), not the norm gains: shrinking a gain toward 0 is not regularisation.
    norms = {id(p) for m in model.modules() if isinstance(m, RMSNorm) for p in m.parameters()}
    params = list(model.parameters())  # a tied matrix appears once
    groups = [{"params": [p for p in params if id(p) not in norms], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) in norms], "weight_decay": 0.0}]
    # Fused: one kernel over all parameters instead of a dozen passes over memory; 5x faster on CPU as well as GPU.
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type in ("cuda", "cpu"))


def lr_at(step: int, lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    """Linear warmup from lr/warmup to lr, then cosine decay to min_lr at max_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint I/O

CKPT_FORMAT, CKPT_VERSION = "standalone_transformer_lm", 1


def cpu_state_dict(module: nn.Module) -> dict:
    copies = {}  # keyed by storage, so a tied matrix stays one tensor under two names
    return {k: copies.setdefault(v.data_ptr(), v.detach().cpu()) for k, v in module.state_dict().items()}


def model_with_weights(cfg: ModelConfig, state: dict, dropout: float = 0.0, device="cpu") -> Transformer:
    """A model holding saved weights, built without first drawing random ones to overwrite (at 700m, 14 s of a 15 s
    load on 2 CPU cores), in the device's memory from the start (on a GPU, no copy of the weights in host memory per
    process). A tied matrix stays one parameter; the RoPE tables are computed, as they are not saved."""
    with torch.device("meta"):
        model = Transformer(cfg, dropout)
    model.to_empty(device=device)  # new parameter objects, so a tie is made again
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope_cos, model.rope_sin = (t.to(device) for t in rope_tables(cfg))
    model.load_state_dict(state, strict=True)
    return model


def model_from_saved(cfg: dict, state: dict, path: str, hint: str, dropout: float = 0.0, device="cpu") -> Transformer:
    """model_with_weights() for a config and weights read from a file: a UserError if they do not fit together."""
    try:
        cfg = ModelConfig.from_dict(cfg)
        if cfg.tie_embeddings and not torch.equal(state["embed_tokens.weight"], state["lm_head.weight"]):
            raise RuntimeError("the config ties lm_head to the embedding, the weights hold two matrices")
        model = model_with_weights(cfg, state, dropout, device)
    except (RuntimeError, TypeError, KeyError) as e:  # a size of the wrong type, a shape or a name that is not there
        if out_of_memory(e):
            raise
        first = next((line.strip() for line in str(e).splitlines() if line.strip() and not line.endswith(":")), "")
        raise UserError(f"the weights in {path!r} and its model config do not fit together ({type(e).__name__}: "
                        f"{first}). HINT: {hint}") from None
    # Training never saves a nan or an inf (a diverged step stops it first): such a weight is damage since the save,
    # which would sample garbage, export it, or resume into a divergence blamed on --lr
    if bad := next((name for name, t in model.state_dict().items() if not torch.isfinite(t).all()), None):
        raise UserError(f"{path!r} holds non-finite weights (nan or inf in {bad}): the file was damaged after it was "
                        f"saved. HINT: use a backup of it, or the run's other checkpoint if that is another file (a "
                        f"best checkpoint of the last step is a hard link to the same one)")
    return model


def load_tensors(path: str, hint: str):
    """What torch.save wrote, if it holds only tensors and plain values (never arbitrary objects); else a UserError."""
    require_file(path, "checkpoint", hint)
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        if not zipfile.is_zipfile(path):  # torch.save's archive (mmap reads no other) ends with its directory
            raise ValueError("the file is empty" if not head else "the file is cut short or damaged"
                             if head == b"PK\x03\x04" else "not a torch.save archive")
        # never unpickle arbitrary objects; mmap: ranks of a node share the file's pages, not a copy each
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a malicious, foreign or damaged file: refuse, whatever torch raises
        lines = str(e).strip().splitlines() or [f"{type(e).__name__}: the file is damaged"]  # (EOFError() has none)
        reason = ("it holds objects other than tensors and plain values, and those are never unpickled"
                  if isinstance(e, pickle.UnpicklingError) else lines[0])
        raise UserError(f"{path!r} is not a loadable checkpoint ({reason}). HINT: {hint}") from None


def load_checkpoint(path: str, hint: str = "pass the ckpt_last.pt or ckpt_best.pt that `train` wrote") -> dict:
    ckpt = load_tensors(path, hint)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise UserError(f"{path!r} is not a checkpoint of this script (no {CKPT_FORMAT!r} format tag). HINT: use a "
                        f"ckpt_last.pt or ckpt_best.pt that `train` wrote (pytorch_model.bin holds the weights alone, "
                        f"for convert_to_llama.py)")
    if ckpt.get("version") != CKPT_VERSION:
        raise UserError(f"{path!r} has checkpoint version {ckpt.get('version')!r}, this script reads {CKPT_VERSION}")
    return ckpt


def check_resumable(ckpt: dict, path: str, fix: str) -> None:
    """What a resume reads, of the kinds `train` saves: an edited file fails here, not mid-way with a traceback."""
    kinds = {"model_config": dict, "model": dict, "optimizer": dict, "scaler": dict, "step": int,
             "best_val_loss": float, "train_config": dict, "data": dict, "rng": list}
    odd = [k for k, kind in kinds.items() if type(ckpt.get(k)) is not kind or k == "step" and ckpt[k] < 0]
    if "data" not in odd:  # windows: read so far in this pass of train.bin (none saved by older versions)
        least = {"seed": 0, "global_batch": 1, "n_windows": 1, "windows": 0}
        data = {"windows": 0, **ckpt["data"]}
        odd += [f"data[{k!r}]" for k, low in least.items() if type(data.get(k)) is not int or data[k] < low]
        odd += [f"data[{k!r}]" for k in ("val", "val_of_best") if data.get(k) is not None and not (  # (older: none)
            isinstance(data[k], dict) and data[k].keys() == {"windows", "tokens"}
            and all(type(v) is int and v >= 1 for v in data[k].values()))]
    if "model_config" not in odd:  # its sizes are numbers, or None for a default
        odd += [f"model_config[{k!r}]" for k, v in ckpt["model_config"].items() if not isinstance(v, (int, float))
                and v is not None]
    if odd:
        raise UserError(f"{path!r} holds other values than `train` saves ({', '.join(odd)}): was it edited? HINT: "
                        f"{fix}")


def exported_by_train(out_dir: str) -> bool:
    """Whether the folder's config.json is the one save_checkpoint() writes."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # none, not JSON, not an object
        with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("format") == CKPT_FORMAT
    return False


def save_checkpoint(out_dir: str, names: list[str], ckpt: dict, tokenizer: bytes) -> None:
    """Rank 0 only: the export (pytorch_model.bin, config.json, tokenizer.model), then the checkpoint files in the
    order named, each after the first a hard link to its bytes. ckpt_last.pt comes last: a kill anywhere before its
    rename leaves the previous save, and the resumed run redoes the steps and this whole save (a kill after it would
    leave a stale export, or a new best never written, that the resume takes as done). A new best is ckpt_best.pt,
    then ckpt_last.pt linked to it; a later save of ckpt_last.pt, a new file renamed over it, leaves those bytes be."""
    atomic_write(os.path.join(out_dir, "pytorch_model.bin"), lambda f: torch.save(ckpt["model"], f))
    atomic_write_json(os.path.join(out_dir, "config.json"),
                      {"format": CKPT_FORMAT, "step": ckpt["step"], **ckpt["model_config"]})
    atomic_write(os.path.join(out_dir, "tokenizer.model"), lambda f: f.write(tokenizer))
    first = os.path.join(out_dir, names[0])
    for name in names:
        path = os.path.join(out_dir, name)
        atomic_write(path, lambda f: torch.save(ckpt, f), link_from=None if path == first else first)


# ----------------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    out_dir: str
    data_dir: str
    batch_size: int = 16
    grad_accum_steps: int = 4
    max_steps: int = 200_000
    warmup_steps: int = 2000
    lr: float = 6e-4
    min_lr: float | None = None  # None: lr / 10
    weight_decay: float = 0.1
    dropout: float = 0.0
    grad_clip: float = 1.0
    compile: bool = False
    deterministic: bool = False
    eval_interval: int = 1000
    eval_iters: int = 20
    log_interval: int = 10
    save_interval: int = 1000
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    dist_timeout: int = 1800


BIG_FOR_A_CPU = 50_000_000  # parameters: train notes that a run this size on the CPU takes minutes a step
ARCH_FLAGS = ("n_layer", "n_head", "n_kv_head", "d_model", "head_dim", "ffn_mult", "seq_len", "rope_theta",
              "tie_embeddings")
# Dense, per GPU; the first name found in the device's name wins ("H100 PCIe" before "H100"). MFU only for these.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200 NVL": 835e12, "H200": 989e12,
                   "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12, "4090": 165e12,
                   "3090": 71e12}


def peak_bf16_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # MFU against a CPU's peak would be a guess
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), None)


NVIDIA_DEVICE = "/dev/nvidiactl"  # the NVIDIA driver's control device: a GPU is here (in a container: given to it)


def resolve_device(name: str) -> torch.device:
    """auto: the GPU if torch can use one. A GPU that torch cannot use (a CPU-only build of torch, a driver too old
    for its CUDA, a GPU too old for its kernels) is an error, not hours of training on the CPU or a crash at the first
    kernel: --device cpu says that the CPU is meant."""
    if name == "cpu":
        return torch.device("cpu")
    with warnings.catch_warnings(record=True) as caught:  # torch warns, once, of what it cannot use
        warnings.simplefilter("always")
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.init()  # checks the GPUs against the kernels this build has (it creates no CUDA context)
    said = [" ".join(str(w.message).split()) for w in caught]
    gpu_there = os.path.exists(NVIDIA_DEVICE) and os.environ.get("CUDA_VISIBLE_DEVICES") not in ("", "-1")
    if not cuda and name == "cuda" and not gpu_there and torch.version.cuda is None:
        raise UserError(f"torch {torch.__version__} cannot use a GPU here: this machine shows no NVIDIA GPU (and it "
                        f"is a CPU-only build). HINT: pass --device cpu (or auto), or run on a machine with a GPU")
    if not cuda and (name == "cuda" or gpu_there):
        why = next((m[:300] for m in said if "CUDA init" in m),
                   "it is a CPU-only build" if torch.version.cuda is None else "it sees no CUDA GPU")
        raise UserError(f"torch {torch.__version__} cannot use a GPU here ({why}). HINT: install the torch build "
                        f"for this machine's driver (https://pytorch.org/get-started/locally/), or pass --device cpu")
    # torch's wordings for a GPU too old for this build (not its warning for a newer one, which runs via PTX)
    signs = ("this version of PyTorch was built for", "does not include kernels", "builds for release",
             "no longer supports this GPU")
    old_gpu = next((m for m in said if any(sign in m for sign in signs)), None)
    if cuda and old_gpu:
        gpu = re.search(r"Found GPU\d+ (.+?) which is of (?:compute|cuda) capability (?:\(CC\) )?(\d+\.\d+)", old_gpu)
        fix = re.search(r"pip install torch\S* --index-url \S+", old_gpu)
        what = f" ({gpu[1]}, compute capability {gpu[2]})" if gpu else ""
        cudas = re.search(r"one of these CUDA versions: (.+)", old_gpu)  # torch 2.11's wording: no pip line
        build = f"a build for CUDA {cudas[1]}" if cudas else "a build for it"
        how = f"`{fix[0]}`" if fix else f"install {build} (https://pytorch.org/get-started/locally/)"
        raise UserError(f"torch {torch.__version__} has no kernels for this GPU{what}. HINT: {how}, or pass "
                        f"--device cpu")
    if cuda and "LOCAL_RANK" in os.environ:
        local, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= count:
            raise UserError(f"torchrun started process {local} on a node with {count} GPU(s). HINT: pass "
                            f"--nproc_per_node={count} (or fewer) to torchrun")
        return torch.device("cuda", local)
    return torch.device("cuda" if cuda else "cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        # bf16 from Ampere on; a T4 or V100 has no bf16 tensor cores (torch emulates bf16) but has fp16 ones
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def setup_distributed(device: torch.device, timeout_s: int) -> tuple[int, int]:
    """(rank, world_size); under torchrun, joins the process group: NCCL on GPUs, gloo on CPUs."""
    if "RANK" not in os.environ:
        return 0, 1
    missing = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:  # RANK (and more) left in the shell's environment: torchrun sets them all
        raise UserError(f"RANK is set but {', '.join(missing)} not, as if torchrun had started this process. HINT: "
                        f"start it with torchrun, or unset RANK")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    joined = threading.Event()
    if LAUNCHER is not None:
        threading.Thread(target=stop_without_launcher, args=(joined,), daemon=True).start()
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    finally:
        joined.set()
    return dist.get_rank(), dist.get_world_size()


def stop_without_launcher(joined: threading.Event) -> None:
    """While the processes meet, nothing written yet: a torchrun killed outright would leave them waiting for the others
    until --dist_timeout, or joining the next torchrun on its port as strangers. (Later, train() notices at a step.)"""
    while not joined.wait(0.5):
        if os.getppid() != LAUNCHER:
            print(f"error: torchrun is gone; process {os.environ['RANK']} stopped before training", file=sys.stderr,
                  flush=True)
            os._exit(1)


@contextlib.contextmanager
def out_dir_lock(out_dir: str):
    """One training run per --out_dir, held by its rank 0: a second one (the command run twice, `srun` starting copies
    without torchrun, a requeued job while the old one still saves) would write its checkpoints between the first's."""
    make_dir(out_dir, "--out_dir")
    with open(os.path.join(out_dir, ".train.lock"), "a+") as f:
        try:
            import fcntl  # POSIX only: Windows goes unguarded
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel drops it when the process ends, even by SIGKILL
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", 1))
            srun = (f" (srun started {tasks} copies of this command: start one torchrun per node instead, as the "
                    f"README's multi-node section shows)") if tasks > 1 and "RANK" not in os.environ else ""
            raise UserError(f"another training run ({holder}) is using --out_dir {out_dir}{srun}. HINT: wait for it "
                            f"to end or stop it (it saves first), or pass another --out_dir") from None
        except (ImportError, OSError):  # a filesystem without locks (Lustre mounted without flock): unguarded
            pass
        else:
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
            f.flush()
        yield


def read_meta(data_dir: str) -> tuple[dict, bytes]:
    """meta.json, and the tokenizer it describes: read once, as each save copies it (a prep run since the start may
    have put another in --data_dir)."""
    path = os.path.join(data_dir, "meta.json")
    hint = f"run `python {beside_me()} prep --text_path corpus.txt --out_dir {shlex.quote(data_dir)}` first"
    if os.path.basename(data_dir) in PREP_FILES and os.path.isfile(data_dir):  # nanoGPT's habit: data/train.bin
        hint = f"pass the folder that holds it, --data_dir {shlex.quote(os.path.dirname(data_dir) or '.')}"
    elif os.path.isfile(data_dir):  # the corpus itself, passed where its prepped folder goes
        hint = (f"pass the folder that prep wrote (`prep --text_path {shlex.quote(data_dir)} --out_dir data`, then "
                f"--data_dir data)")
    elif any(os.path.exists(os.path.join(data_dir, name)) for name in MODEL_FILES):  # which prep refuses
        hint = (f"that is a training run's or a model's folder: pass the folder that prep wrote"
                f"{', e.g. --data_dir ./data' if os.path.isfile(os.path.join('data', 'meta.json')) else ''}")
    if not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir!r} does not exist or is not a folder. HINT: {hint}")
    for name in PREP_FILES:
        require_file(os.path.join(data_dir, name), "data file", hint)
    with open(os.path.join(data_dir, "tokenizer.model"), "rb") as f:
        tokenizer = f.read()
    try:
        with open(path) as f:
            meta = json.load(f)
        if not {"vocab_size", "dtype", "tokenizer_sha256"} <= set(meta) or type(meta["vocab_size"]) is not int:
            raise ValueError("keys missing or of the wrong type")
        # prep renames its files one by one: a kill between two renames leaves a mix of two runs
        same = hashlib.sha256(tokenizer).hexdigest() == meta["tokenizer_sha256"]
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            tokens = meta.get(split, {}).get("tokens")
            same &= tokens is None or os.path.getsize(os.path.join(data_dir, f"{split}.bin")) == tokens * itemsize
    except (ValueError, TypeError, AttributeError) as e:  # torn, edited or foreign
        raise UserError(f"{path!r} is not a meta.json that prep wrote ({e}). HINT: {hint}") from None
    if not same:
        raise UserError(f"the files in {data_dir!r} are not the ones its meta.json describes (was prep interrupted?)."
                        f" HINT: {hint}")
    return meta, tokenizer


def resolve_model_config(args, vocab_size: int, saved: dict | None) -> ModelConfig:
    """Flags over preset over (on resume) the checkpoint's config; on resume any difference is refused."""
    d = dict(saved) if saved else {}
    if args.preset:
        d.update(PRESETS[args.preset])
    d.update({k: getattr(args, k) for k in ARCH_FLAGS if getattr(args, k) is not None})
    d["vocab_size"] = vocab_size
    if not saved:
        cfg, memory = ModelConfig(**d), physical_memory()
        if 4 * cfg.n_params > memory > 0:  # it is built in float32 on the CPU: fail here, not minutes into building it
            raise UserError(f"a model of {cfg.n_params:,} parameters takes {4 * cfg.n_params / 2**30:,.0f} GiB in "
                            f"float32, more than this machine's {memory / 2**30:,.0f} GiB of memory. HINT: check the "
                            f"model flags (the 700m preset takes 3 GiB)")
        return cfg
    # compared before the derived values: n_kv_head and head_dim would be checked against another shape than saved
    diff = {k: v for k, v in d.items() if saved.get(k) != v}
    if diff:
        given = [f"--{k}" for k in ARCH_FLAGS if k in diff and getattr(args, k) is not None]
        if args.preset and any(k in PRESETS[args.preset] and f"--{k}" not in given for k in diff):
            given.insert(0, f"--preset {args.preset}")  # (what it sets is not always a flag: tiny's ffn_multiple_of)
        raise UserError(f"resuming the run in {args.out_dir}, whose model differs: "
                        f"{', '.join(f'{k} {saved.get(k)} -> {v}' for k, v in diff.items())}. HINT: drop "
                        f"{' '.join(given) or 'those flags'} to continue that run, or use a new --out_dir for a new "
                        f"model")
    return ModelConfig.from_dict(saved)


class StopSignal:
    """SIGTERM/SIGINT ask for a save at the next step boundary. A repeat is the same request (a scheduler may signal
    every process while torchrun forwards the signal to them too); only Ctrl-C again, 3 s later, stops at once."""

    def __init__(self):
        self.requested, self.since = False, 0.0
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT and time.monotonic() - self.since > 3:
                raise KeyboardInterrupt
            return
        self.requested, self.since = True, time.monotonic()
        print0(f"\n{signal.Signals(signum).name}: saving at the end of this step (a Ctrl-C from 3 s on stops at once)",
               file=sys.stderr)

    def restore(self):
        if self.requested:  # stopping: a late repeat, even while Python exits, must not turn a clean exit into an error
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            return
        for s, handler in self._old.items():
            signal.signal(s, handler)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train(tc: TrainConfig, args, device: torch.device, rank: int, world: int, held: contextlib.ExitStack) -> dict:
    ddp = world > 1
    counts = ("batch_size", "grad_accum_steps", "max_steps", "log_interval", "eval_interval", "eval_iters",
              "save_interval", "dist_timeout")
    check_flags(tc, [(name, getattr(tc, name) >= 1, "at least 1") for name in counts] + [
        ("dropout", 0 <= tc.dropout < 1, "in [0, 1)"), ("lr", 0 < tc.lr < math.inf, "above 0 and finite"),
        ("min_lr", tc.min_lr is None or tc.min_lr <= tc.lr, f"at most --lr ({tc.lr:g})"),
        ("seed", tc.seed < 1 << 63, "below 2**63")] + [
        (name, getattr(tc, name) is None or 0 <= getattr(tc, name) < math.inf, "0 or more, and finite")
        for name in ("warmup_steps", "min_lr", "weight_decay", "grad_clip", "seed")])
    meta, tokenizer = read_meta(tc.data_dir)
    prepped = next((n for n in DATA_FILES if os.path.exists(os.path.join(tc.out_dir, n))), None)
    if prepped:  # --data_dir itself, or another prep's folder: each save would replace its tokenizer.model
        raise UserError(f"--out_dir {tc.out_dir!r} holds prepped data ({prepped}), whose tokenizer.model a run's saves "
                        f"would replace. HINT: pass a folder of its own for the run, e.g. --out_dir "
                        f"{another(tc.out_dir, './runs/lm')}")
    # ckpt_best.pt alone (a kill between the two files of a first save, which is a new best; a ckpt_last.pt removed)
    # is resumed too: a new run's first eval would replace it
    last_path, best_path = (os.path.join(tc.out_dir, name) for name in ("ckpt_last.pt", "ckpt_best.pt"))
    if not any(map(os.path.exists, (last_path, best_path))):  # a new run: bad shapes refused before --out_dir is made
        theirs = [n for n in ("config.json", "tokenizer.model") if os.path.exists(os.path.join(tc.out_dir, n))]
        if theirs and not exported_by_train(tc.out_dir):  # (a kill in a first save leaves ours: it starts again)
            raise UserError(f"--out_dir {tc.out_dir!r} holds {' and '.join(theirs)} that `train` did not write (a "
                            f"converted or downloaded model?), which a run's saves would replace. HINT: pass a folder "
                            f"of its own for the run, e.g. --out_dir {another(tc.out_dir, './runs/lm')}")
        seq_len = resolve_model_config(args, meta["vocab_size"], None).seq_len
        for split in ("train", "val"):  # (a split shorter than one sequence too)
            Batches(os.path.join(tc.data_dir, f"{split}.bin"), np.dtype(meta["dtype"]), seq_len, tc.seed, 1)
    # The folder is ours until train() returns, locked before its checkpoint is read: a run that still saves would
    # otherwise replace it between our read and our start.
    if rank == 0:
        held.enter_context(out_dir_lock(tc.out_dir))
        remove_stale_tmp(tc.out_dir, (*MODEL_FILES, "tokenizer.model", "metrics.jsonl"))  # what a run writes
    resume_path = next((path for path in (last_path, best_path) if os.path.exists(path)), None)
    # what to do when it does not load: a ckpt_best.pt apart from it (not a hard link to the same bytes) is resumed
    best_apart = resume_path == last_path and os.path.exists(best_path) and not os.path.samefile(last_path, best_path)
    fix = f"{'remove it to resume ckpt_best.pt' if best_apart else 'restore it from a backup'}, or pass a new --out_dir"
    if rank == 0 and resume_path == best_path:  # ckpt_last.pt as that save would have left it: the same bytes
        with open(best_path, "rb") as best:
            atomic_write(last_path, lambda f: shutil.copyfileobj(best, f), link_from=best_path)
    ckpt = load_checkpoint(resume_path, fix) if resume_path else None
    if ckpt:
        check_resumable(ckpt, resume_path, fix)
    if ckpt and ckpt.get("tokenizer_sha256") != meta["tokenizer_sha256"]:
        raise UserError(f"{resume_path} was trained with another tokenizer than {tc.data_dir}/tokenizer.model. HINT: "
                        f"resume with the --data_dir it was trained on, or start a new --out_dir")
    cfg = resolve_model_config(args, meta["vocab_size"], ckpt["model_config"] if ckpt else None)
    min_lr = tc.lr / 10 if tc.min_lr is None else tc.min_lr
    dtype = resolve_dtype(tc.dtype, device)
    # Decided once, before the loop: autocast context, unwrapped model, compiled + DDP-wrapped model.
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if tc.deterministic:  # bit-identical reruns and resumes, compiled too: no atomics in reductions, maybe slower
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts, at the first matmul
        # Not warn_only: with it, flash and memory-efficient attention keep their backward with atomics (and warn)
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(tc.seed)  # same initial weights on every rank and every device
    raw_model = model_from_saved(ckpt["model_config"], ckpt["model"], resume_path, fix, tc.dropout,
                                 device) if ckpt else Transformer(cfg, tc.dropout)
    raw_model.to(device)
    torch.manual_seed(tc.seed + rank)  # then each rank draws its own dropout masks, as it reads its own rows
    optimizer = make_optimizer(raw_model, tc.lr, tc.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    global_batch = tc.batch_size * tc.grad_accum_steps * world
    tok_dtype = np.dtype(meta["dtype"])
    train_data = Batches(os.path.join(tc.data_dir, "train.bin"), tok_dtype, cfg.seq_len, tc.seed, global_batch,
                         cfg.vocab_size)
    val_data = Batches(os.path.join(tc.data_dir, "val.bin"), tok_dtype, cfg.seq_len, None, 1, cfg.vocab_size)
    # The val loss is over --eval_iters x global batch windows spread evenly over val.bin (all of it, if fewer), a set
    # fixed at the run's start: a resume with another global batch (fewer GPUs) measures what its best was measured on
    val = {"windows": min(tc.eval_iters * global_batch, val_data.n_windows), "tokens": len(val_data.data)}
    step, best_val, best_set = 0, float("inf"), None  # best_set: the windows best_val was measured on
    if ckpt:
        try:  # (a moment of another shape than its parameter would crash the fused step, even the process)
            optimizer.load_state_dict(ckpt["optimizer"])
            moments = [(p, v) for p, st in optimizer.state.items() for v in st.values() if torch.is_tensor(v)]
            if any(v.shape != p.shape for p, v in moments if v.dim()):
                raise ValueError("a moment of another shape than its parameter")
            if not all(torch.isfinite(v).all() for _, v in moments):  # never saved so: damaged since, as a weight
                raise ValueError("nan or inf in a moment")  # would be (model_from_saved), and no --lr gets past it
            del moments  # on a CPU, views of the mapped file until the copies below: not held past here
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{resume_path!r} holds an optimizer state that cannot be resumed ({e}). HINT: "
                            f"{fix}") from None
        if device.type == "cpu":  # its state was left as views of the mapped file, which would then stay on disk, held,
            for state in optimizer.state.values():  # after the next save renamed a new ckpt_last.pt over it
                state.update({k: v.clone() for k, v in state.items() if torch.is_tensor(v)})
        optimizer.param_groups[0]["weight_decay"] = tc.weight_decay  # today's flags, not the checkpoint's
        if ckpt["scaler"] and scaler.is_enabled():  # empty when saved by a bf16/fp32 run, which had no scaler
            scaler.load_state_dict(ckpt["scaler"])
        step, best_val = ckpt["step"], ckpt["best_val_loss"]
        if rank < len(ckpt["rng"]):  # a rank the saved run did not have keeps its own seed: no copy of rank 0's masks
            set_rng_state(ckpt["rng"][rank], device)
        old = ckpt["train_config"]
        print0(f"resuming {resume_path} at step {step:,} (best val loss "
               f"{'none yet' if best_val == math.inf else f'{best_val:.4f}'})")
        # a flag newer than the checkpoint is not a change
        changed = [f"{k} {old[k]} -> {v}" for k, v in dataclasses.asdict(tc).items() if old.get(k, v) != v]
        changed += [f"processes {len(ckpt['rng'])} -> {world}"] if len(ckpt["rng"]) != world else []
        if changed:
            print0("  changed since the checkpoint: " + ", ".join(changed))
        was, now = optimizer.param_groups[0]["lr"], lr_at(step, tc.lr, min_lr, tc.warmup_steps, tc.max_steps)
        if step >= tc.warmup_steps and now > 1.01 * was:  # after warmup one schedule only lowers it: the flags changed
            print0(f"  note: the learning rate goes on at {now:.3g}, up from the {was:.3g} of the run's last step "
                   f"(more --max_steps stretch the cosine, a higher --lr lifts it), and the loss may jump; to go on at "
                   f"{was:.3g}, pass --lr {was:.3g} --min_lr {was:.3g}")
        windows = ckpt["data"].get("windows", step * ckpt["data"]["global_batch"])  # (older: how they read on)
        if ckpt["data"]["n_windows"] != train_data.n_windows:  # the same tokenizer, other text or prep options
            print0(f"  note: {tc.data_dir}/train.bin is not the one this run trained on ({train_data.n_windows:,} "
                   f"windows, was {ckpt['data']['n_windows']:,}: other text, or prepped again), so a first pass over "
                   f"it starts here")
            windows = 0  # (the windows read so far count in the old file's order: 20 % of the new one left unread)
        elif ckpt["data"].get("seed") != tc.seed:
            print0("  note: with another --seed, a new pass over train.bin starts here, in that seed's order")
            windows = 0
        elif ckpt["data"]["global_batch"] != global_batch:
            print0(f"  note: the global batch is now {global_batch} sequences (was {ckpt['data']['global_batch']}):"
                   f" the batches go on from the {windows:,} windows read so far, neither repeated nor skipped")
        train_data.offset = windows - step * global_batch
        saved, best_set = ckpt["data"].get("val"), ckpt["data"].get("val_of_best")  # None from older versions
        if saved and saved["tokens"] == val["tokens"] and old.get("eval_iters") == tc.eval_iters and (
                saved["windows"] <= val_data.n_windows):  # (more: edited by hand)
            val = saved
        if best_set != val and best_val < math.inf:  # a loss on other windows cannot be compared with it
            why = ("its checkpoint is of an older version" if best_set is None else "val.bin is another one" if
                   best_set["tokens"] != val["tokens"] else f"{val['windows']:,} windows, was {best_set['windows']:,}")
            print0(f"  note: the val loss is measured on other windows than the best's {best_val:.4f} was ({why}), so "
                   f"the next evaluation's checkpoint replaces ckpt_best.pt (copy it first to keep it)")
        del ckpt
    if ddp:  # every process trains one run: a node started with another command would train apart, or hang
        paths = ("out_dir", "data_dir", "device", "dist_timeout")  # may differ between nodes; the data may not
        mine = {"step": step, "windows read": train_data.offset + step * global_batch,
                **{f"--{k}": v for k, v in dataclasses.asdict(tc).items() if k not in paths},
                **dataclasses.asdict(cfg), "tokenizer": meta["tokenizer_sha256"][:12],
                "train.bin tokens": len(train_data.data), "val.bin tokens": len(val_data.data)}
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        steps, windows = ([theirs[k] for theirs in everyone] for k in ("step", "windows read"))
        if len(set(steps)) > 1 or len(set(windows)) > 1:  # a node that reads another --out_dir (not shared, or
            # relative to another folder), or another copy of the run
            raise UserError(f"the processes start at different steps {steps} (windows read {windows}): they do not "
                            f"all see the same {tc.out_dir}. HINT: put --out_dir on a filesystem every node shares, as "
                            f"an absolute path")
        diff = [(r, k) for r, theirs in enumerate(everyone) for k in mine if theirs[k] != everyone[0][k]]
        if diff:
            r, k = diff[0]
            raise UserError(f"the processes were started with different settings: {k} {everyone[0][k]} in process 0, "
                            f"{everyone[r][k]} in process {r}. HINT: run the same command, with the same data, on "
                            f"every node")
    model = torch.compile(raw_model) if tc.compile else raw_model
    # With inductor's CUDA graphs (TORCHINDUCTOR_CUDAGRAPHS=1) a gradient that autograd takes as a parameter's .grad
    # lies in the graphs' memory, which the next micro-step's replay overwrites: the gradients are then made here and
    # kept, and each micro-step adds into them in place. DDP makes them views into its all-reduce buckets.
    keep_grads = ddp or os.environ.get("TORCHINDUCTOR_CUDAGRAPHS") == "1"
    for p in raw_model.parameters() if keep_grads else ():
        p.grad = torch.zeros_like(p)
    if ddp:  # the gradients become views into DDP's all-reduce buckets, not a second copy of them (with
        # zero_grad(set_to_none=False) below, which keeps the views): one gradient's size less memory per process
        # The only buffers, the RoPE tables, are the same on every rank: not sent again at each forward. (torch 2.13
        # renamed the flag; the old name warns.)
        sync = next(k for k in ("forward_sync_buffers", "broadcast_buffers") if k in inspect.signature(DDP).parameters)
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
                    **{sync: False})

    tokens_per_step, n_train = global_batch * cfg.seq_len, len(train_data.data)
    epochs = (train_data.offset + max(step, tc.max_steps) * global_batch) * cfg.seq_len / n_train  # of this pass
    wait = " (the first step compiles: a minute or more before the first log line)" if tc.compile else ""
    print0(f"torch {torch.__version__}, device {device} x {world} process(es), dtype {str(dtype)[6:]}, "
           f"compile {tc.compile}{wait}")
    print0(f"model {json.dumps(dataclasses.asdict(cfg))}: {cfg.n_params:,} parameters "
           f"(ffn_hidden {cfg.ffn_hidden}, head_dim {cfg.head_dim})")
    if device.type == "cpu" and tc.device == "auto" and cfg.n_params >= BIG_FOR_A_CPU:  # no GPU here that torch can use
        print0(f"  note: no GPU, so this trains on the CPU, where {cfg.n_params / 1e6:.0f}M parameters take minutes a "
               f"step (a GPU: under a second). For a first try on a CPU, run `demo`, or train --preset tiny into a new "
               f"--out_dir")
    print0(f"train {json.dumps(dataclasses.asdict(tc))}")
    print0(f"tokens per step: {tokens_per_step:,} = batch_size {tc.batch_size} x seq_len {cfg.seq_len} x "
           f"grad_accum_steps {tc.grad_accum_steps} x world_size {world}; schedule: warmup {tc.warmup_steps}, "
           f"cosine from lr {tc.lr:g} to {min_lr:g} at step {tc.max_steps:,}, {epochs:,.2f} epochs of train.bin "
           f"({n_train:,} tokens); val loss over {val['windows']:,} windows of val.bin"
           f"{' (all of it)' if val['windows'] == val_data.n_windows else ''}")
    if tc.warmup_steps >= tc.max_steps:
        print0(f"  note: --warmup_steps {tc.warmup_steps} is not below --max_steps {tc.max_steps:,}, so the learning "
               f"rate only climbs, to {lr_at(tc.max_steps - 1, tc.lr, min_lr, tc.warmup_steps, tc.max_steps):.3g}")
    peak = peak_bf16_flops(device)
    flops_per_step = raw_model.flops_per_token() * tokens_per_step

    metrics_path, last_log = os.path.join(tc.out_dir, "metrics.jsonl"), {}
    if rank == 0 and os.path.exists(metrics_path):  # the log of the run we continue, up to its checkpoint
        kept = []
        with open(metrics_path, encoding="utf-8", errors="replace") as f:  # (a torn line may hold any bytes)
            for line in f:
                with contextlib.suppress(ValueError, TypeError, KeyError):  # a line torn by a crash mid-write
                    row = json.loads(line)
                    if row["step"] <= step:
                        kept.append(row)
        atomic_write(metrics_path, lambda f: f.write("".join(json.dumps(row) + "\n" for row in kept).encode()))
        last_log = kept[-1] if kept else {}

    def save(names: list[str]):
        states = [rng_state(device)] * world
        if ddp:
            dist.all_gather_object(states, states[0])  # every rank's, in rank order
        if rank == 0:
            ckpt = {"format": CKPT_FORMAT, "version": CKPT_VERSION, "model_config": dataclasses.asdict(cfg),
                    "model": cpu_state_dict(raw_model), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "step": step, "best_val_loss": best_val,
                    "train_config": dataclasses.asdict(tc), "rng": states, "tokenizer_sha256": meta["tokenizer_sha256"],
                    "data": {**train_data.state_dict(step), "val": val, "val_of_best": best_set}}
            save_checkpoint(tc.out_dir, names, ckpt, tokenizer)
        if ddp:  # the GPU named: else NCCL's barrier takes the current one, and warns at every run's first save
            dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)

    @torch.no_grad()
    def evaluate() -> float:
        # The run's val windows, shared out among the ranks: the val loss (and so which checkpoint is best) does not
        # depend on how the global batch is split into processes and micro-steps.
        raw_model.eval()
        total, n = torch.zeros((), device=device), val["windows"]
        mine = [i * val_data.n_windows // n for i in range(rank, n, world)]  # spread evenly over val.bin
        for i in range(0, len(mine), tc.batch_size):
            x, y = val_data.get(0, mine[i:i + tc.batch_size], device)
            with ctx:
                total += raw_model(x, y)[1].float() * len(x)  # every row has seq_len targets
        if ddp:
            dist.all_reduce(total)
        raw_model.train()
        return total.item() / n

    def rows(micro: int) -> range:  # this rank's rows of the global batch at micro-step `micro`
        first = (micro * world + rank) * tc.batch_size
        return range(first, first + tc.batch_size)

    if step >= tc.max_steps:
        print0(f"nothing to train: {resume_path} is at step {step:,}, --max_steps is {tc.max_steps:,}. HINT: raise "
               f"--max_steps to train on")
    stop = StopSignal()
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", unit="step", mininterval=1.0,
               disable=rank != 0 or not sys.stderr.isatty())  # no bar in log files
    x, y = train_data.get(step, rows(0), device)
    try:
        if ddp and step < tc.max_steps:  # A forward and backward that change nothing (a zero loss, the RNG put back):
            # DDP lays its buckets out anew after its first backward, and from 3 processes on an all-reduce's sums
            # depend on where a gradient lies in them. Every step, a resumed run's first too, then sums in one layout.
            rng = rng_state(device)
            with ctx:
                _, loss = model(x, y)
            (loss * 0).backward()
            optimizer.zero_grad(set_to_none=False)
            set_rng_state(rng, device)
        t_log, steps_since_log, first_step = time.perf_counter(), 0, step
        while step < tc.max_steps:
            lr = lr_at(step, tc.lr, min_lr, tc.warmup_steps, tc.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(tc.grad_accum_steps):
                last = micro == tc.grad_accum_steps - 1
                with model.no_sync() if ddp and not last else contextlib.nullcontext():
                    with ctx:
                        _, loss = model(x, y)
                    # The step's loss is the mean over the global batch: DDP averages over ranks and each micro-step
                    # contributes 1/grad_accum_steps, so the gradient does not depend on how the batch is split.
                    loss = loss / tc.grad_accum_steps
                    x, y = train_data.get(step + last, rows(0 if last else micro + 1), device)  # overlaps the GPU
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tc.grad_clip or float("inf"))
            if LAUNCHER and os.getppid() != LAUNCHER and not stop.requested:  # torchrun was killed: save, stop
                stop.requested = True
                print(f"rank {rank}: torchrun is gone; saving at the end of this step", file=sys.stderr, flush=True)
            # One small all-reduce and one host sync per step: every rank then agrees on stopping (signal or a
            # non-finite loss) before the optimizer step. The grad norm is the same on every rank after DDP. (No
            # tensor made from host values here: a blocking copy to a GPU waits for its queue, a sync of its own.)
            flags = torch.stack([loss_sum.float(), grad_norm.float(), torch.full((), float(stop.requested),
                                                                             device=device)])
            if ddp:
                dist.all_reduce(flags)
            loss_sum_all, norm_sum, stop_votes = flags.tolist()
            loss_val, norm_val = loss_sum_all / world, norm_sum / world
            if not math.isfinite(loss_val) or (not scaler.is_enabled() and not math.isfinite(norm_val)):
                saved = last_path if os.path.exists(last_path) else resume_path  # what a resume would read
                kept = f"{saved} is as it was. HINT: resume" if saved else "nothing was saved yet. HINT: start again"
                raise UserError(f"training diverged at step {step + 1}: loss {loss_val}, grad norm {norm_val} "
                                f"(lr {lr:.3g}); {kept} with a lower --lr or more --warmup_steps")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=not keep_grads)  # alone: free them until the next backward
            step += 1
            steps_since_log += 1
            bar.update(1)

            is_eval = step % tc.eval_interval == 0 or step == tc.max_steps
            if step % tc.log_interval == 0 or is_eval or stop_votes:
                dt = (time.perf_counter() - t_log) / steps_since_log
                last_log = {"step": step, "loss": round(loss_val, 5), "lr": float(f"{lr:.6g}"),  # JSON has no inf:
                            "grad_norm": round(norm_val, 4) if math.isfinite(norm_val) else None,  # fp16's skipped step
                            "ms_per_step": round(dt * 1000, 1), "tokens_per_s": round(tokens_per_step / dt)}
                if peak:
                    last_log["mfu"] = round(flops_per_step / dt / (peak * world), 4)
                if is_eval:
                    last_log["val_loss"] = round(evaluate(), 5)
                if rank == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(last_log) + "\n")
                    try:
                        bar.write(" | ".join(f"{k} {v}" for k, v in last_log.items()))
                    except BrokenPipeError:  # stdout closed (`train | head`): save and stop, as for SIGTERM
                        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                        stop.requested = True
                t_log, steps_since_log = time.perf_counter(), 0
            new_best = is_eval and (last_log["val_loss"] < best_val or best_set != val)
            if new_best:
                best_val, best_set = last_log["val_loss"], val
            if new_best or step % tc.save_interval == 0 or step == tc.max_steps or stop_votes:
                t_save = time.perf_counter()
                save(["ckpt_best.pt", "ckpt_last.pt"] if new_best else ["ckpt_last.pt"])
                t_log += time.perf_counter() - t_save  # the log times training steps, not saves (nor evals)
            if step == first_step + 1:  # nor this process's first step, which compiles and warms up (unless logged)
                t_log, steps_since_log = time.perf_counter(), 0
            if stop_votes:
                print0(f"stopped by signal at step {step:,}; {tc.out_dir}/ckpt_last.pt saved. Run the same command "
                       f"to resume.")
                break
    except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.Unsupported):
        if stop.requested:  # Ctrl-C to the process group stops a compile's C++ compiler too: not a failed compile
            raise KeyboardInterrupt from None
        raise
    finally:
        bar.close()
        stop.restore()
    return {"step": step, "best_val_loss": best_val, "stopped": step < tc.max_steps, **last_log}  # by a signal


# ----------------------------------------------------------------------------------------------------------------------
# Sampling


def for_sampling(model: Transformer, device: torch.device, dtype: torch.dtype) -> Transformer:
    model = model.to(device=device, dtype=dtype).eval()
    model.rope_cos, model.rope_sin = (t.to(device) for t in rope_tables(model.cfg))  # angles stay float32
    return model


def model_from_checkpoint(path: str, device: torch.device, dtype: torch.dtype) -> tuple[Transformer, str | None]:
    """The model, and the sha256 of the tokenizer it was trained with (None when unknown)."""
    ckpt = load_checkpoint(path)
    model = model_from_saved(ckpt.get("model_config"), ckpt.get("model"), path, "pass a ckpt_last.pt or ckpt_best.pt "
                             "that `train` wrote (this one is damaged or was edited)", device=device)
    return for_sampling(model, device, dtype), ckpt.get("tokenizer_sha256")


def sample_next(logits: torch.Tensor, seen: torch.Tensor, temperature: float, top_k: int, top_p: float,
                repetition_penalty: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, vocab) float32 -> next ids (B, 1). seen (B, vocab) bool marks tokens already in the sequence."""
    if repetition_penalty != 1.0:  # CTRL's penalty: make every seen token less likely, whatever its sign
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature <= 0:
        return logits.max(dim=-1, keepdim=True).indices
    probs, ids = candidates(logits / temperature, top_k, top_p)
    choice = torch.multinomial(probs, 1, generator=generator)
    return choice if ids is None else ids.gather(-1, choice)


def candidates(logits: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The distribution to sample from: probabilities (B, n), unnormalised, over token ids (B, n), most likely first;
    ids None means the whole vocabulary in order. top_k keeps the k most likely tokens, then top_p the fewest of those
    whose probability reaches p (the nucleus). Drawing from k candidates rather than the whole vocabulary is what
    keeps sampling cheap: on a CPU, torch.multinomial over 32,000 probabilities takes about 0.8 ms per row."""
    vocab, ids = logits.size(-1), None
    if 0 < top_k < vocab or top_p < 1.0:
        logits, ids = torch.topk(logits, top_k if 0 < top_k < vocab else vocab, dim=-1)  # sorted, largest first
    probs = logits.softmax(dim=-1)
    if top_p < 1.0:  # drop a token when the mass before it already reaches p
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    return probs, ids


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None, eos_id: int | None = EOS_ID,
             decode_step=None, on_token=None, num_samples: int = 1) -> list[list[int]]:
    """Prefill the prompt into a preallocated KV cache, then decode one token at a time. The num_samples
    continuations decode together as one batch: each step reads the weights once for all of them. Returns each
    sample's new tokens; on_token, if given, sees the first sample's after every step."""
    cfg, device = model.cfg, model.embed_tokens.weight.device
    max_new_tokens = min(max_new_tokens, cfg.seq_len - len(prompt))
    dtype = model.embed_tokens.weight.dtype
    # A compiled step attends over the whole context (one shape); eager decoding, over the slots written so far: its
    # cache holds this call's tokens only (at 16 samples of 138m, 1.2 GB in float32 for the whole context)
    length = cfg.seq_len if decode_step not in (None, model) else len(prompt) + max_new_tokens
    for block in model.layers:  # kept between calls: a compiled decode step (CUDA graph) reuses the same buffers
        cache = block.self_attn.cache
        if cache is None or cache.k.dtype != dtype or cache.k.size(0) != num_samples or cache.k.size(2) < length:
            block.self_attn.cache = cache = None  # its memory back before the new one is allocated
            block.self_attn.cache = KVCache(num_samples, length, cfg, dtype, device)
    decode_step = model if decode_step is None else decode_step
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    seen = torch.zeros(num_samples, cfg.vocab_size, dtype=torch.bool, device=device)
    seen[:, prompt] = True
    step_pos = torch.zeros(1, dtype=torch.long, device=device)  # filled on the device: a tensor made from a host value
    # each step would be a blocking copy to a GPU, a sync of its own beside the one that reads the new tokens
    model.lay_out_for_decoding(num_samples)
    try:
        logits = model(torch.tensor([prompt], device=device), pos=torch.arange(len(prompt), device=device))[0]
        logits = logits.expand(num_samples, -1, -1)
        for block in model.layers:
            block.self_attn.cache.copy_row0(len(prompt))
        out, done = [[] for _ in range(num_samples)], [False] * num_samples
        for t in range(len(prompt), len(prompt) + max_new_tokens):
            next_id = sample_next(logits[:, -1].float(), seen, temperature, top_k, top_p, repetition_penalty,
                                  generator)  # (num_samples, 1)
            for i, token in enumerate(next_id[:, 0].tolist()):  # a finished sample's later tokens are dropped
                done[i] = done[i] or token == eos_id
                if not done[i]:
                    out[i].append(token)
            if all(done):
                break
            if repetition_penalty != 1.0:  # the only reader of `seen`
                seen.scatter_(1, next_id, True)
            if on_token:
                on_token(out[0])
            if t + 1 < len(prompt) + max_new_tokens:  # not for the last token: nothing samples from its logits
                logits = decode_step(next_id, pos=step_pos.fill_(t))[0]
    finally:
        model.lay_out_for_decoding(0)  # its memory back
    return out


class TextStream:
    """Prints the continuation as tokens arrive. Decoding prompt + new tokens together keeps SentencePiece's spaces
    right (a lone "▁word" decodes without its space); printing only the new suffix keeps it cheap on the terminal."""

    def __init__(self, sp, prompt: list[int]):
        self.sp, self.prompt = sp, prompt
        self.printed = len(sp.decode(prompt))

    def __call__(self, ids: list[int], final: bool = False) -> str:
        text = self.sp.decode(self.prompt + ids)
        if final or not text.endswith("\ufffd"):  # hold back half of a multi-byte character
            print(text[self.printed:], end="\n" if final else "", flush=True)
            self.printed = len(text)
        return text


# ----------------------------------------------------------------------------------------------------------------------
# Subcommands


def cmd_prep(args) -> dict:
    made = make_dir(args.out_dir, "--out_dir")
    try:
        return prep(args.text_path, args.out_dir, args.vocab_size, args.val_fraction, args.seed, args.num_workers,
                    args.sample_lines, bool(args.dedup), bool(args.normalize_whitespace),
                    args.spm and file_in(args.spm, "tokenizer.model"))
    except BaseException:  # e.g. a vocabulary the corpus cannot support: the folders made for it go again if empty
        folder = os.path.abspath(args.out_dir)
        with contextlib.suppress(OSError):  # (rmdir refuses a folder that is not empty)
            while made and folder != os.path.dirname(made):
                os.rmdir(folder)
                folder = os.path.dirname(folder)
        raise


def cmd_train(args) -> dict:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    tc.compile, tc.deterministic = bool(tc.compile), bool(tc.deterministic)
    device = resolve_device(tc.device)
    settle_cpu(device)
    rank, world = setup_distributed(device, tc.dist_timeout)
    try:
        with contextlib.ExitStack() as held:  # rank 0's --out_dir lock, taken once train() has checked its input
            return train(tc, args, device, rank, world, held)
    except Exception as e:  # a size too big for the GPU, an op without a deterministic kernel; compile wraps them
        if op := re.search(r"(\S+) does not have a deterministic implementation", str(e)):
            raise UserError(f"--deterministic 1: {op[1]} has no deterministic kernel on {device.type} here. HINT: "
                            f"train with --deterministic 0 (reruns then differ in the last bits)") from None
        if not (oom := out_of_memory(e)):
            raise
        raise UserError(f"{oom[0]} at --batch_size {tc.batch_size}{oom[1]}; the checkpoints saved so far are intact. "
                        f"HINT: halve --batch_size and double --grad_accum_steps (the same tokens per step), or train "
                        f"a smaller model") from None
    finally:
        if dist.is_initialized():  # torchrun with one process joins a group too
            dist.destroy_process_group()


SAMPLES_PER_BATCH = 16  # --num_samples decode together in batches of at most this many: it bounds the KV cache


def cmd_generate(args) -> list[str]:
    check_flags(args, [("num_samples", args.num_samples >= 1, "at least 1"),
                       ("max_new_tokens", args.max_new_tokens >= 0, "0 or more"),
                       ("temperature", args.temperature == 0 or 1e-6 <= args.temperature < math.inf,
                        "0 (greedy), or finite and at least 1e-6"),  # logits / 1e-40 overflow to inf: no sample
                       ("top_k", args.top_k >= 0, "0 (off) or more"), ("top_p", 0 < args.top_p <= 1, "in (0, 1]"),
                       ("repetition_penalty", 1e-6 <= args.repetition_penalty <= 1e6, "from 1e-6 to 1e6 (1 = off)"),
                       ("seed", args.seed is None or abs(args.seed) < 1 << 63, "below 2**63 in size")])
    device = resolve_device(args.device)
    settle_cpu(device)
    args.ckpt = file_in(args.ckpt, "ckpt_last.pt")
    model, trained_sha = model_from_checkpoint(args.ckpt, device, resolve_dtype("auto", device))
    spm_path = (file_in(args.spm, "tokenizer.model") if args.spm else
                os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "tokenizer.model"))
    sp = load_tokenizer(spm_path)
    if sp.vocab_size() != model.cfg.vocab_size:
        raise UserError(f"tokenizer {spm_path!r} has {sp.vocab_size()} tokens but the model has "
                        f"{model.cfg.vocab_size}. HINT: pass the tokenizer.model the model was trained with (--spm)")
    if trained_sha and file_sha256(spm_path) != trained_sha:  # same size, other pieces: the text would be nonsense
        raise UserError(f"tokenizer {spm_path!r} is not the one {args.ckpt!r} was trained with (sha256 differs). "
                        f"HINT: pass the tokenizer.model of the data folder it was trained on (--spm)")
    try:
        args.prompt.encode()
    except UnicodeEncodeError:  # Python keeps bytes that are not UTF-8 as lone surrogates, which SentencePiece refuses
        raise UserError("--prompt is not UTF-8 (from a Latin-1 terminal or file?). HINT: set the terminal to UTF-8, "
                        "or convert the text with iconv") from None
    prompt = [BOS_ID] + sp.encode(args.prompt)
    if len(prompt) >= model.cfg.seq_len:
        raise UserError(f"the prompt is {len(prompt)} tokens (bos included), the model's context is "
                        f"{model.cfg.seq_len}. HINT: shorten the prompt")
    decode_step = None
    if args.compile:  # one graph for every decode step (CUDA graphs on GPU); the prefill runs eagerly
        print("compiling the decode step: the first new token waits for it", file=sys.stderr, flush=True)
        decode_step = torch.compile(model, fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else None)
    sample = functools.partial(generate, model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                               args.repetition_penalty, decode_step=decode_step)
    # Equal batches, the last one padded: a single KV cache shape, so --compile 1 compiles (and records) one graph.
    rows = math.ceil(args.num_samples / math.ceil(args.num_samples / SAMPLES_PER_BATCH))  # 20: two batches of 10
    texts = []
    try:
        if args.num_samples == 1:  # printed as it decodes
            print(sp.decode(prompt), end="", flush=True)
            stream = TextStream(sp, prompt)
            return [stream(sample(seed=args.seed, on_token=stream)[0], final=True)]
        for first in range(0, args.num_samples, rows):
            seed = args.seed  # the first batch's own; a later one draws its seed from (seed, batch): with seed + first
            if seed is not None and first:  # `--seed 10` would repeat samples of `--seed 0` in a sweep over seeds
                seed = random.Random(f"{args.seed} {first}").getrandbits(63)
            for ids in sample(seed=seed, num_samples=rows)[:args.num_samples - first]:
                texts.append(sp.decode(prompt + ids))
                print(f"--- sample {len(texts)}\n{texts[-1]}", flush=True)
    except Exception as e:
        if not (oom := out_of_memory(e)):
            raise
        fix = f"fewer --num_samples (up to {SAMPLES_PER_BATCH} decode at once), or without --compile fewer new tokens"
        raise UserError(f"{oom[0]} decoding {rows} sample(s) at once{oom[1]}. HINT: pass {fix}") from None
    return texts


def cmd_demo(args) -> None:
    import pydoc_data.topics
    check_flags(args, [("max_steps", args.max_steps >= 1, "at least 1"),  # before anything is written
                       ("vocab_size", MIN_VOCAB <= args.vocab_size <= MAX_VOCAB, f"{MIN_VOCAB} to {MAX_VOCAB}")])
    resolve_device(args.device)  # (--device cuda without a GPU, refused before the prep)
    out, corpus = args.out_dir, os.path.join(args.out_dir, "corpus.txt")
    # One topic per line: a line is one sample, and the docs' lines of 70 characters would teach the model to stop there
    text = "\n".join(" ".join(topic.split()) for _, topic in sorted(pydoc_data.topics.topics.items())).encode()
    earlier = os.path.isfile(corpus) and os.path.getsize(corpus) == len(text)  # (a user's big corpus is not read)
    earlier = earlier and file_sha256(corpus) == hashlib.sha256(text).hexdigest()
    if os.path.isdir(out) and os.listdir(out) and not earlier:
        raise UserError(f"--out_dir {out!r} is not empty and holds no earlier demo (of this Python), whose corpus.txt, "
                        f"data/ and run/ it would replace. HINT: pass a new or empty folder, e.g. --out_dir "
                        f"{another(out, 'runs/demo')}")
    make_dir(out, "--out_dir")
    data_dir, run_dir = os.path.join(out, "data"), os.path.join(out, "run")
    ckpt = os.path.join(run_dir, "ckpt_last.pt")
    if os.path.exists(ckpt):  # run again: it resumes, on the same tokenizer
        vocab = load_checkpoint(ckpt)["model_config"]["vocab_size"]
        if vocab != args.vocab_size:
            raise UserError(f"{out} holds a demo run with a {vocab}-token vocabulary. HINT: pass --vocab_size "
                            f"{vocab} to run it again, or a new --out_dir")
    atomic_write(corpus, lambda f: f.write(text))
    print(f"== 1/3 prep: {corpus} ({len(text) / 1e6:.1f} MB, Python's own documentation) ==")
    prep(corpus, data_dir, vocab_size=args.vocab_size, val_fraction=0.05)
    print(f"== 2/3 train: {run_dir} ==")
    parser = build_parser()
    result = cmd_train(parser.parse_args(
        ["train", "--out_dir", run_dir, "--data_dir", data_dir, "--n_layer", "4", "--n_head", "4", "--d_model", "128",
         "--seq_len", "128", "--batch_size", "16", "--grad_accum_steps", "1", "--max_steps", str(args.max_steps),
         "--warmup_steps", "30", "--lr", "2e-3", "--eval_interval", str(max(1, args.max_steps // 4)),
         "--log_interval", "25", "--save_interval", str(args.max_steps), "--device", args.device]))
    if result["stopped"]:  # Ctrl-C or SIGTERM: the checkpoint is saved, and `demo` again resumes it
        return
    print("== 3/3 generate ==")
    for prompt in ("The try statement", "Dictionaries are"):
        cmd_generate(parser.parse_args(["generate", "--ckpt", ckpt, "--prompt", prompt, "--max_new_tokens", "40",
                                        "--temperature", "0.8", "--top_k", "50", "--seed", "0",
                                        "--device", args.device]))
    me, nan, q = beside_me(), float("nan"), shlex.quote
    print(f"\ndone: loss {result.get('loss', nan):.3f}, val loss {result.get('val_loss', nan):.3f} after "
          f"{result['step']} steps.\n  corpus     {corpus}\n  tokenizer  {data_dir}/tokenizer.model (+ train.bin, "
          f"val.bin, meta.json)\n  checkpoint {ckpt} (+ ckpt_best.pt, pytorch_model.bin, config.json, metrics.jsonl)"
          f"\nnext:\n  python {me} generate --ckpt {q(ckpt)} --prompt \"Lists are\"\n"
          f"  python {beside_me('convert_to_llama.py')} --ckpt {q(ckpt)} --spm {q(data_dir + '/tokenizer.model')} "
          f"--out {q(out + '/hf')}")


# ----------------------------------------------------------------------------------------------------------------------
# CLI


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line and status 2, as for every other mistake; no usage block
        print(f"error: {message}. HINT: `{self.prog} --help` lists the flags", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" or "(default: )": the help says what leaving it out does
        return action.help if action.default in (None, "") else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    fmt = HelpFormatter
    p = Parser(description=__doc__.split("\n")[0], formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)
    p.commands = sub.choices  # subcommand -> its parser
    flag = dict(type=int, choices=[0, 1])
    device = dict(default="auto", choices=["auto", "cpu", "cuda"], help="auto: the GPU if torch can use one")

    s = sub.add_parser("prep", help="train the tokenizer and pack the corpus into token files", formatter_class=fmt)
    s.add_argument("--text_path", required=True, help="UTF-8 text, one sample per line")
    s.add_argument("--out_dir", default="./data", help="folder for tokenizer.model, train.bin, val.bin, meta.json")
    s.add_argument("--vocab_size", type=int, help="BPE vocabulary, special and byte tokens included (default: 32000)")
    s.add_argument("--spm", help="encode with this tokenizer.model, from an earlier prep or a run's folder, instead of "
                                 "training one: more text for that run (default: train one)")
    s.add_argument("--val_fraction", type=float, default=0.005, help="share of the corpus (its tail) for val.bin")
    s.add_argument("--num_workers", type=int, default=0,
                   help="encoding processes, at most the cores this process may use; 0 = all of them")
    s.add_argument("--seed", type=int, default=1337, help="seeds the tokenizer's sample of lines")
    s.add_argument("--sample_lines", type=int, default=300_000, help="lines sampled to train the tokenizer")
    s.add_argument("--dedup", default=0, help="drop exact duplicate lines", **flag)
    s.add_argument("--normalize_whitespace", default=0, help="collapse runs of whitespace to one space", **flag)
    s.set_defaults(func=cmd_prep)

    s = sub.add_parser("train", help="train (or resume) a model; works under torchrun", formatter_class=fmt)
    s.add_argument("--out_dir", required=True, help="checkpoints go here; an existing ckpt_last.pt is resumed")
    s.add_argument("--data_dir", default="./data", help="the folder `prep` wrote")
    s.add_argument("--preset", choices=sorted(PRESETS), help="model size; flags below override it (default 138m)")
    s.add_argument("--n_layer", type=int)
    s.add_argument("--n_head", type=int)
    s.add_argument("--n_kv_head", type=int, help="key/value heads for grouped-query attention (default n_head)")
    s.add_argument("--d_model", type=int)
    s.add_argument("--head_dim", type=int, help="default d_model / n_head")
    s.add_argument("--ffn_mult", type=float,
                   help="SwiGLU width = int(ffn_mult * d_model * 2/3) rounded up to a multiple of 256 (tiny: 32)")
    s.add_argument("--seq_len", type=int)
    s.add_argument("--rope_theta", type=float)
    s.add_argument("--tie_embeddings", **flag)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ("out_dir", "data_dir", "device", "dtype"):
            kind = flag if f.type is bool else {"type": float if f.name == "min_lr" else f.type}
            shown = "(default: lr / 10)" if f.name == "min_lr" else "(default: %(default)s)"  # README: what each does
            s.add_argument(f"--{f.name}", default=int(f.default) if f.type is bool else f.default, help=shown, **kind)
    s.add_argument("--device", **device)
    s.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="autocast dtype; auto: bfloat16 on GPUs that have it, else float16; float32 on CPU")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("generate", help="sample from a checkpoint", formatter_class=fmt)
    s.add_argument("--ckpt", required=True, help="ckpt_last.pt or ckpt_best.pt that train wrote; a run's folder: its "
                                                 "ckpt_last.pt")
    s.add_argument("--spm", help="tokenizer.model, or a folder holding it (default: the one beside --ckpt)")
    s.add_argument("--prompt", default="", help="text to continue (default: none, a document's start)")
    s.add_argument("--max_new_tokens", type=int, default=100,
                   help="stops earlier at eos or at the model's context (seq_len); longer prompts are refused")
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top_k", type=int, default=200, help="0 = off")
    s.add_argument("--top_p", type=float, default=1.0, help="nucleus: the fewest tokens whose probability reaches p")
    s.add_argument("--repetition_penalty", type=float, default=1.0, help="penalises seen tokens (CTRL); 1 = off")
    s.add_argument("--seed", type=int, default=None, help="same seed and flags, same text (default: new each run)")
    s.add_argument("--num_samples", type=int, default=1, help="samples of the prompt, decoded as a batch (up to "
                                                               f"{SAMPLES_PER_BATCH} at a time)")
    s.add_argument("--device", **device)
    s.add_argument("--compile", default=0, help="compile the decode step, for GPUs (CUDA graphs); mostly slower on "
                                                    "a CPU", **flag)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("demo", help="the whole workflow on Python's own docs, in a few minutes on a CPU",
                       formatter_class=fmt)
    s.add_argument("--out_dir", default="runs/demo", help="the corpus, data/ and run/ go here")
    s.add_argument("--vocab_size", type=int, default=2000, help="of the demo's tokenizer")
    s.add_argument("--max_steps", type=int, default=600, help="training steps (run again, it resumes)")
    s.add_argument("--device", **device)
    s.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the subcommand's parser, whose --help lists its flags
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # like Ctrl-C: temporary files go (train: it saves)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # Ctrl-C: KeyboardInterrupt again, as loading is done
        signal.signal(signal.SIGINT, signal.default_int_handler)
    with contextlib.suppress(AttributeError):  # what stdout's encoding lacks (cp1252 on Windows) prints as "?"
        sys.stdout.reconfigure(errors="replace")  # (stderr escapes it already)
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, ImportError) as e:  # Ctrl-C while a C extension (sentencepiece) is first imported
        if isinstance(e, ImportError) and not isinstance(e.__cause__, KeyboardInterrupt):  # arrives as its ImportError
            raise
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # stdout closed early (`generate ... | head`): not a fault of the path or the disk
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flushes into nothing
        with contextlib.suppress(OSError):  # stderr may have gone with it (`2>&1 | head`)
            print("error: the output pipe was closed (by `head`?); stopped", file=sys.stderr)
        sys.exit(141)  # as for SIGPIPE
    except OSError as e:  # the machine's, not ours: permissions, a full disk, a vanished mount
        print(f"error: {e}. HINT: check the path, its permissions and the free space", file=sys.stderr)
        sys.exit(2)
    except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.Unsupported) as e:  # no C++ compiler (CPU),
        # a GPU that Triton does not support, code that this torch cannot compile whole (generate's decode step)
        reason = next((line for line in str(e).splitlines() if line.strip() and not line.endswith("raised:")), "")
        print(f"error: torch.compile failed: {reason}. HINT: run with --compile 0 (the same model, slower)",
              file=sys.stderr)
        sys.exit(2)


def main_as_worker() -> None:
    """main() for a process that torchrun started, left by os._exit without the interpreter's teardown. Gloo's threads
    outlive destroy_process_group, and one that lets go of its last collective's tensors while the interpreter shuts
    down aborts the process ("terminate called without an active exception"): torchrun then fails a finished run.
    Every file that matters is written, synced and closed before main() returns."""
    code = 1
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        sys.excepthook(*sys.exc_info())
    finally:
        with contextlib.suppress(OSError, ValueError):  # a closed pipe
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main_as_worker() if "TORCHELASTIC_RUN_ID" in os.environ else main()
