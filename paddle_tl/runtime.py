"""Import PaddlePaddle once, with a clear message when it is missing; pick
the device, seed everything, and show progress.

paddle is deliberately not in install_requires (CPU and GPU builds are separate
distributions), so every module that needs it goes through `import_paddle()`.
"""

import contextlib
import io
import os
import random
import sys
import tempfile
import time
import warnings

import numpy as np

from paddle_tl.errors import ConfigError, PaddleMissingError

INSTALL_HINT = (
    "PaddlePaddle is not installed. Install the CPU build with "
    "`pip install -e \".[cpu]\"` (paddlepaddle 3.x) or a GPU build from "
    "Paddle's own package index (see docs/gpu.md)."
)


def _set_thread_default():
    # `import paddle` sets OMP_NUM_THREADS=1 when it is unset, which leaves all
    # but one core idle on CPU training; default it to the core count instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))


# What `import paddle` prints (with print(), from paddle/base/__init__.py)
# whenever OMP_NUM_THREADS is above 1: that data-parallel training will be
# slower (several processes each with that many threads) and that an
# OpenBLAS build would fail (paddle's CPU wheels use MKL).
OMP_WARNING = ("WARNING: OMP_NUM_THREADS set to ", "PLEASE USE OMP_NUM_THREADS WISELY.")
# What paddle's C++ (glog, eager_utils.cc) writes the first time a process
# traces a program in which paddle's own Python calls an op with `out=`
# (paddle.add does, in MobileNetV2 and ResNet blocks): every paddle.jit.save.
PIR_OUT_WARNING = ("Paddle static graph(PIR) not support input out tensor",)


def import_paddle():
    """paddle, imported with its messages that tell a paddle_tl user nothing
    silenced, each narrowly, by its own text:
    - "No ccache found" (a warning from paddle.utils.cpp_extension, imported
      by `import paddle`): ccache speeds up compiling C++ extensions, which
      paddle_tl never does;
    - BatchNorm's "When training, we now always track global mean and
      variance" (every training forward; a note on an API change in Paddle 2);
    - "To copy construct from a tensor, it is recommended to use
      sourceTensor.clone().detach()": advice to whoever called
      paddle.to_tensor on a tensor, which in paddle_tl's runs is paddle's own
      code (hapi's train_batch on the loader's labels, L-BFGS's step);
    - OMP_WARNING, which paddle_tl's own default (a thread per core) would
      print in every run, and every process started from one (a child
      inherits the variable), unless this is one of several data-parallel
      processes (PADDLE_TRAINERS_NUM above 1): that is the case the warning
      is about, so there it stays.
    Elsewhere, around the one call that prints it: the pretrained weights'
    "Skip loading for <head tensor>" (models/weights.py; paddle_tl reports
    the head left new itself) and PIR_OUT_WARNING (models/static.py, around
    paddle.jit.save)."""
    paddle = sys.modules.get("paddle")
    return paddle if paddle is not None else _first_import()


def _first_import():
    _set_thread_default()
    warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning,
                            module=r"paddle\.utils\.cpp_extension\.")
    warnings.filterwarnings("ignore", message="When training, we now always track global mean and variance",
                            category=UserWarning, module=r"paddle\.nn\.layer\.norm\Z")
    warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning,
                            module=r"paddle\.tensor\.creation\Z")
    data_parallel = int(os.environ.get("PADDLE_TRAINERS_NUM", "1") or 1) > 1
    dropped = () if data_parallel else OMP_WARNING
    try:
        with stderr_lines_dropped(*dropped):
            import paddle
    except ImportError as exc:
        raise PaddleMissingError(f"{INSTALL_HINT} (import failed: {exc})") from exc
    return paddle


@contextlib.contextmanager
def stderr_lines_dropped(*fragments):
    """Within the context, hold back what is written to stderr, through
    sys.stderr and by native code to file descriptor 2 (paddle's C++
    logging); after it, write it all out but the lines that contain one of
    `fragments`. For messages paddle prints unconditionally, which no
    warnings filter reaches. Python's lines come out before native ones."""
    if not fragments:
        yield
        return
    python_stderr = sys.stderr
    python_stderr.flush()
    saved_fd = os.dup(2)
    held = io.StringIO()
    with tempfile.TemporaryFile() as native:
        os.dup2(native.fileno(), 2)
        sys.stderr = held
        try:
            yield
        finally:
            sys.stderr = python_stderr
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            kept = [line for line in held.getvalue().splitlines(keepends=True)
                    if not any(fragment in line for fragment in fragments)]
            python_stderr.write("".join(kept))
            python_stderr.flush()
            native.seek(0)
            encoded = [fragment.encode() for fragment in fragments]
            kept = b"".join(line for line in native if not any(fragment in line for fragment in encoded))
            while kept:  # os.write may write part of it (a pipe)
                kept = kept[os.write(2, kept):]


def select_device(requested):
    """Global.device: `auto` takes a GPU when this paddle build and machine have one."""
    paddle = import_paddle()
    has_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if requested == "gpu" and not has_gpu:
        raise ConfigError("Global.device: gpu requested, but this paddle build or machine has no GPU "
                          "(use cpu, or install paddlepaddle-gpu)")
    device = "gpu" if requested == "gpu" or (requested == "auto" and has_gpu) else "cpu"
    paddle.set_device(device)
    return device


def available_memory():
    """Bytes of memory available to a new allocation now (Linux's
    MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    import_paddle().seed(seed)


@contextlib.contextmanager
def rng_kept():
    """Within the context, seed and draw freely; after it, every generator
    (python, numpy, paddle's for the current device) is where it was, so
    that work done beside training (caching views, building a teacher)
    leaves training's draws as they would have been without it."""
    paddle = import_paddle()
    python, numpy, generator = random.getstate(), np.random.get_state(), paddle.get_rng_state()
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        paddle.set_rng_state(generator)


def progress(iterable, desc, total=None, unit="it", min_total=0, leave=True, stream=None):
    """Iterate over `iterable`, showing progress on stderr (or `stream`).

    A tqdm bar when the stream is a terminal; otherwise (a log file, a pipe,
    CI) a few plain lines instead of a bar redrawn with carriage returns: one
    at the start, one every quarter of `total`, one when done with the time
    taken. Nothing is shown when `total` (or len(iterable)) is at most
    `min_total`. `leave=False` clears a terminal bar when it is done."""
    stream = sys.stderr if stream is None else stream
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if total is not None and total <= min_total:
        return iterable
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, total=total, unit=unit, file=stream, leave=leave)
    return _progress_lines(iterable, desc, total, unit, stream)


def _progress_lines(iterable, desc, total, unit, stream):
    def say(text):
        print(f"{desc}: {text}", file=stream, flush=True)

    start = time.perf_counter()
    say(f"{total} {unit}" if total is not None else "started")
    quarters = sorted({round(total * q / 4) for q in (1, 2, 3)} - {0, total}) if total else []
    done = 0
    for item in iterable:
        yield item
        done += 1
        if quarters and done >= quarters[0]:
            quarters = [q for q in quarters if q > done]
            say(f"{round(100 * done / total)}% ({done}/{total} {unit}, {time.perf_counter() - start:.1f} s)")
    say(f"done, {done} {unit} in {time.perf_counter() - start:.1f} s")
