"""Import PaddlePaddle once, with a clear message when it is missing; pick
the device, seed everything, and show progress.

paddle is deliberately not in install_requires (CPU and GPU builds are separate
distributions), so every module that needs it goes through `import_paddle()`.
"""

import contextlib
import os
import random
import sys
import time

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


def import_paddle():
    _set_thread_default()
    try:
        import paddle
    except ImportError as exc:
        raise PaddleMissingError(f"{INSTALL_HINT} (import failed: {exc})") from exc
    return paddle


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
