"""The run folder (Global.output_dir): creating it safely, and reading a
finished run back for evaluation and export."""

import json
import math
import shutil
import time
from pathlib import Path

from paddle_tl.data.transforms import Preprocess
from paddle_tl.engine.checkpoint import STATE_SUFFIX, load_weights
from paddle_tl.errors import ConfigError, DiskFullError
from paddle_tl.models.zoo import build_model, get_spec


def prepare_output_dir(path, resuming):
    """Create the run folder, refusing early what cannot work. A finished or
    half-finished run already there is moved aside, never overwritten."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"Global.output_dir: {path} exists and is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not resuming:
        aside = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
        print(f"{path} already held a run; moved it to {aside}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A real write, not os.access: root passes permission checks even on a
        # read-only file system, and a full disk only shows when writing.
        probe = path / ".write_probe"
        probe.write_bytes(b"\0" * 65536)
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"Global.output_dir: cannot write to {path}: {exc.strerror}") from exc
    return path


# The checkpoints' room, in copies of the network's state (parameters and
# buffers): best_model and latest.pdparams (2), latest.pdopt (up to 2: Adam
# keeps two moments per parameter), and a new latest written beside the old
# one before it replaces it (3 more). Plus room for logs, metrics and the report.
CHECKPOINT_COPIES = 7
# Global.amp=O2: latest.pdopt also holds the optimizer's float32 master
# weights, in the old and the new latest.
MASTER_WEIGHT_COPIES = 2
LOGS_BYTES = 16 << 20


def require_free_space(run_dir, network, master_weights=False):
    """Refuse to start a run whose checkpoints would not fit on the output
    folder's file system (better now than after the first epoch)."""
    state_bytes = sum(math.prod(t.shape) * t.element_size() for t in network.state_dict().values())
    copies = CHECKPOINT_COPIES + (MASTER_WEIGHT_COPIES if master_weights else 0)
    # A resumed run's checkpoints already hold part of that room.
    written = sum(path.stat().st_size for path in Path(run_dir).glob("*.pd*"))  # .pdparams, .pdopt
    needed = copies * state_bytes + LOGS_BYTES - written
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise DiskFullError(
            f"Global.output_dir: {run_dir} has {_size(free)} free ({free:,} bytes); this run's checkpoints need "
            f"about {_size(needed)} ({needed:,} bytes: {copies} copies of the {_size(state_bytes)} "
            f"model state, plus logs); free some space or choose another Global.output_dir")
    return needed


def _size(num_bytes):
    return f"{num_bytes / 1e6:.1f} MB"


def trained_model(cfg):
    """The fine-tuned network named by Global.pretrained_model, with its
    preprocessing and class names (recorded in the checkpoint's state)."""
    if not cfg.Global.pretrained_model:
        raise ConfigError("Global.pretrained_model: required; point it at a run's best_model "
                          "(e.g. -o Global.pretrained_model=output/run/best_model)")
    prefix = str(cfg.Global.pretrained_model)
    if prefix.endswith(".pdparams"):
        prefix = prefix[: -len(".pdparams")]
    state_file = Path(prefix + STATE_SUFFIX)
    if not state_file.is_file():
        raise ConfigError(f"Global.pretrained_model: {state_file} not found; expected a checkpoint "
                          "written by paddle_tl training (e.g. RUN/best_model)")
    class_names = json.loads(state_file.read_text())["class_names"]
    spec = get_spec(cfg.Arch.name)
    network = build_model(spec.name, cfg.Arch.num_classes or len(class_names), **cfg.Arch.kwargs)
    load_weights(network, prefix)
    network.eval()
    return network, spec, Preprocess.from_spec(spec, cfg.Arch.input_size), class_names
