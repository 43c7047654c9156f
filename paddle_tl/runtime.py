"""Import PaddlePaddle once, with a clear message when it is missing.

paddle is deliberately not in install_requires (CPU and GPU builds are separate
distributions), so every module that needs it goes through `import_paddle()`.
"""

import os
import random

import numpy as np

from paddle_tl.errors import ConfigError, PaddleMissingError

INSTALL_HINT = (
    "PaddlePaddle is not installed. Install the CPU build with "
    "`pip install -e \".[cpu]\"` (paddlepaddle 3.x) or a GPU build from "
    "Paddle's own package index (see README, 'GPU')."
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


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    import_paddle().seed(seed)
