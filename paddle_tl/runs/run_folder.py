"""The run folder (Global.output_dir): creating it safely, and reading a
finished run back for evaluation and export."""

import contextlib
import dataclasses
import math
import shutil
import time
from pathlib import Path

from paddle_tl.config import load_config
from paddle_tl.data.transforms import Preprocess
from paddle_tl.errors import ConfigError, DataError, DiskFullError, UserError
from paddle_tl.files import write_json
from paddle_tl.models.heads import LINEAR, build_network
from paddle_tl.models.zoo import get_spec
from paddle_tl.runs import BEST_MODEL, CONFIG_FILE
from paddle_tl.runs.checkpoint import STATE_SUFFIX, load_weights, read_record


def check_output_dir(path):
    """Refuse at once an output folder that cannot be one; the folder is
    not touched until the run opens it (opened_run_folder)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"Global.output_dir: {path} exists and is a file, not a folder")
    return path


def prepare_output_dir(path, resuming):
    """Create the run folder, refusing early what cannot work. A finished or
    half-finished run already there is moved aside, never overwritten;
    returns (the folder, where the run it held went, or None)."""
    path = check_output_dir(path)
    created, aside = not path.exists(), None
    if path.is_dir() and any(path.iterdir()) and not resuming:
        aside = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            path.rename(aside)
        except OSError as exc:
            raise ConfigError(f"Global.output_dir: {path} holds a run that cannot be moved aside to {aside.name} "
                              f"({exc.strerror}); choose another Global.output_dir") from None
        print(f"{path} already held a run; moved it to {aside}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A real write, not os.access: root passes permission checks even on a
        # read-only file system, and a full disk only shows when writing.
        probe = path / ".write_probe"
        probe.write_bytes(b"\0" * 65536)
        probe.unlink()
    except OSError as exc:
        _put_back(path, aside, created)
        raise ConfigError(f"Global.output_dir: cannot write to {path}: {exc.strerror}") from None
    return path, aside


@contextlib.contextmanager
def opened_run_folder(path, resuming, rewritten=(CONFIG_FILE,)):
    """The run folder, opened (prepare_output_dir) for a run whose data has
    been read. A refusal (a UserError) inside leaves the output folder as it
    was: a refused run touches nothing already written. What it wrote goes,
    a run it moved aside comes back, and a resumed run's files it rewrote
    (`rewritten`) get their old contents again."""
    path = Path(path)
    created = not path.exists()
    empty = created or (path.is_dir() and not any(path.iterdir()))
    before = {name: (path / name).read_bytes() if (path / name).is_file() else None
              for name in rewritten} if resuming else {}
    path, aside = prepare_output_dir(path, resuming)
    try:
        yield path
    except UserError:
        if aside is not None or empty:  # all in it is this run's
            shutil.rmtree(path, ignore_errors=True)
            _put_back(path, aside, created)
        for name, data in before.items():
            if data is None:
                (path / name).unlink(missing_ok=True)
            else:
                (path / name).write_bytes(data)
        raise


def _put_back(path, aside, created):
    """Undo prepare_output_dir: the run it moved aside comes back, a folder
    it created goes, one that was there (empty) stays."""
    if path.is_dir() and not any(path.iterdir()) and (created or aside is not None):
        path.rmdir()
    if aside is not None:
        aside.rename(path)
        print(f"moved {aside} back to {path}")
    elif not created:
        path.mkdir(exist_ok=True)


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


def describe_model(spec, num_classes, kwargs, head, pre, class_names):
    """What a checkpoint records of its network (RunState.model), so that it
    describes itself: whoever loads the weights gets the architecture and the
    preprocessing that go with them (as torchvision's Weights carry their
    transforms, or timm's pretrained_cfg), whatever config is at hand then."""
    return {
        "arch": spec.name,
        "kwargs": dict(kwargs),  # Arch.kwargs, the constructor's extra arguments
        "num_classes": num_classes,
        "head": list(spec.head),  # the layers built for this task (not loaded from ImageNet)
        "head_config": dict(head),  # Arch.head: what those layers are
        "preprocess": pre.to_dict(),  # resize_short, input_size, mean, std, channel_order
        "class_names": list(class_names),
    }


def rebuild_model(record, prefix):
    """(network, spec, preprocess, class_names) from describe_model's record,
    with the checkpoint's weights loaded and the network in eval mode."""
    spec = get_spec(record["arch"])
    network = build_network(spec, record["num_classes"], record["kwargs"], record.get("head_config", LINEAR))
    load_weights(network, prefix)
    network.eval()
    return network, spec, Preprocess.from_dict(record["preprocess"]), list(record["class_names"])


def trained_model(cfg):
    """The fine-tuned network named by Global.pretrained_model, with its
    preprocessing and class names: as the checkpoint records them (see
    describe_model), refusing a config that says otherwise; a checkpoint
    written before that record is built from the config, as it always was."""
    if not cfg.Global.pretrained_model:
        raise ConfigError("Global.pretrained_model: required; point it at a run's best_model "
                          "(e.g. -o Global.pretrained_model=output/run/best_model)")
    prefix = checkpoint_prefix(cfg.Global.pretrained_model)
    state_file = Path(prefix + STATE_SUFFIX)
    if not state_file.is_file():
        raise ConfigError(f"Global.pretrained_model: {state_file} not found; expected a checkpoint "
                          "written by paddle_tl training (e.g. RUN/best_model)")
    state = read_record(state_file)
    record = state.get("model")
    if record and record.get("task", "classification") != "classification":
        raise ConfigError(f"Global.pretrained_model: {prefix} is a {record['task']} run's checkpoint; evaluate or "
                          f"export it with its own config (Global.task={record['task']}), e.g. paddle-tl eval RUN")
    if not record:  # written before checkpoints recorded their network: built from the config
        class_names = state["class_names"]
        spec = get_spec(cfg.Arch.name)
        network = build_network(spec, cfg.Arch.num_classes or len(class_names), cfg.Arch.kwargs,
                                dataclasses.asdict(cfg.Arch.head))
        load_weights(network, prefix)
        network.eval()
        return network, spec, Preprocess.from_spec(spec, cfg.Arch.input_size), class_names
    trained_arch = {"name": record["arch"], "kwargs": record["kwargs"], "num_classes": record["num_classes"],
                    "input_size": record["preprocess"]["input_size"]}
    # A key the user wrote (Config.given) that says otherwise is refused, not
    # obeyed: a network built or fed otherwise than it trained still loads,
    # evaluates and exports, only wrongly (a 224-px run exported at 160 px
    # passes its own parity check). A key left out, or null, says nothing.
    for name, value in trained_arch.items():
        asked = getattr(cfg.Arch, name)
        if f"Arch.{name}" in cfg.given and asked is not None and asked != value:
            raise ConfigError(f"Arch.{name}: {asked} contradicts the run, which trained with "
                              f"Arch.{name}={value} ({prefix}); leave it out")
    trained_head = record.get("head_config", LINEAR)
    asked_head = dataclasses.asdict(cfg.Arch.head)
    if any(key.startswith("Arch.head") for key in cfg.given) and \
            {key: asked_head[key] for key in trained_head} != trained_head:
        raise ConfigError(f"Arch.head: {asked_head} contradicts the run, which trained with Arch.head="
                          f"{trained_head} ({prefix}); leave it out")
    trained = rebuild_model(record, prefix)
    # cfg.Arch now says what trained, for what reads it later (inference.yml's num_classes).
    for name, value in trained_arch.items():
        setattr(cfg.Arch, name, value)
    return trained


def checkpoint_prefix(pretrained_model):
    prefix = str(pretrained_model)
    return prefix[: -len(".pdparams")] if prefix.endswith(".pdparams") else prefix


def record_temperature(prefix, temperature):
    """Write the calibration temperature (calibration.py) into the model
    record of a written checkpoint's state.json; the sha256 of its other
    files, which state.json holds, stay valid."""
    path = Path(str(prefix) + STATE_SUFFIX)
    state = read_record(path)
    state.setdefault("model", {})["temperature"] = float(temperature)
    write_json(path, state)


def trained_temperature(cfg):
    """The temperature that turns Global.pretrained_model's logits into
    calibrated probabilities, softmax(logits / T): its model record's, 1.0
    where there is none (a checkpoint written before calibration, or during a
    run: `latest`)."""
    state_file = Path(checkpoint_prefix(cfg.Global.pretrained_model) + STATE_SUFFIX)
    record = read_record(state_file).get("model") if state_file.is_file() else None
    return float((record or {}).get("temperature", 1.0))


def run_config(run_dir, overrides=()):
    """The config of a finished run folder, for `paddle-tl eval|export|report
    RUN_DIR`: RUN_DIR/config.yaml (so the dataset roots need not be stated
    again) with RUN_DIR/best_model as Global.pretrained_model, then
    `overrides`. Without config.yaml (a checkpoint copied alone), the
    defaults, which the checkpoint's record completes."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} {'is not a folder' if run_dir.exists() else 'does not exist'}")
    best = run_dir / BEST_MODEL
    if not Path(str(best) + STATE_SUFFIX).is_file():
        raise ConfigError(f"{run_dir} is not a run folder: it has no best_model{STATE_SUFFIX} "
                          "(write one with paddle-tl train)")
    config_file = run_dir / CONFIG_FILE
    return load_config(config_file if config_file.is_file() else None,
                       [f"Global.pretrained_model={best}", *overrides])


def eval_data_overrides(folder):
    """`--data FOLDER`: the overrides that make an ImageFolder the Eval
    dataset, in place of whatever the config had (a list file, elpv)."""
    folder = Path(folder)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(f"--data: {folder} {problem}; give a folder of class sub-folders")
    return ["DataLoader.Eval.dataset.name=ImageFolder", f"DataLoader.Eval.dataset.root={folder}",
            "DataLoader.Eval.dataset.list_file=null", "DataLoader.Eval.dataset.label_names_file=null"]
