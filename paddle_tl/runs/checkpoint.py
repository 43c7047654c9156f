"""Checkpoints of a run folder, written atomically, and resuming from them.

A checkpoint is three files sharing a prefix: `<prefix>.pdparams` (a plain
state dict: what eval and export load), `<prefix>.pdopt` (optimizer and
scheduler state) and `<prefix>.state.json` (epoch, best score, history, and
under `model` the network and its preprocessing: run_folder.describe_model). Each
file is written to a temporary name and renamed, so a kill leaves either the
old or the new file, never a torn one; the files are renamed only once all
are written (a full disk leaves the old checkpoint whole), `state.json`
last, and it records the sha256 of the others, so a resume can tell that
they belong together. Layers trained beside the network (a domain
classifier), and states kept beside it (the weight average, engine/ema.py),
add `<prefix>.<name>.pdparams` files.
"""

import json
from pathlib import Path

from paddle_tl.errors import CheckpointError
from paddle_tl.files import file_digest, replace_together
from paddle_tl.runs import LATEST
from paddle_tl.runtime import import_paddle

paddle = import_paddle()

STATE_SUFFIX = ".state.json"


def save_checkpoint(prefix, network, optimizer=None, state=None, extra_layers=None, extra_states=None):
    """extra_layers: {name: layer} trained beside the network (a domain
    classifier), and extra_states: {name: state dict} kept beside it (the
    weight average), each saved as `<prefix>.<name>.pdparams` so that the
    network's own file stays what eval and export load."""
    prefix = str(prefix)
    files = {}  # extension -> sha256, filled as the files are written

    def saving(obj, ext):
        def write(tmp):
            paddle.save(obj, str(tmp))
            files[ext] = file_digest(tmp)
        return write

    writes = [(prefix + ".pdparams", saving(float32_state(network), "pdparams"))]
    for name, layer in (extra_layers or {}).items():
        writes.append((f"{prefix}.{name}.pdparams", saving(float32_state(layer), f"{name}.pdparams")))
    for name, tensors in (extra_states or {}).items():
        writes.append((f"{prefix}.{name}.pdparams", saving(tensors, f"{name}.pdparams")))
    if optimizer is not None:
        opt_state = optimizer_state_by_structured_name(network, optimizer, extra_layers)
        writes.append((prefix + ".pdopt", saving(opt_state, "pdopt")))
    writes.append((prefix + STATE_SUFFIX,
                   lambda tmp: Path(tmp).write_text(json.dumps(dict(state or {}, files=files), indent=1))))
    # All are written before any replaces its old version: a disk that fills
    # up midway leaves the previous checkpoint whole and resumable.
    replace_together(writes, previous=f"the previous checkpoint {prefix}")


def float32_state(layer):
    """The layer's state dict with float16 tensors as float32.

    Under Global.amp=O2 hapi casts the weights to float16 (BatchNorm's stay
    float32), and paddle refuses to load a float16 tensor into a float32
    parameter: eval, export and a resumed run (which loads before AMP casts
    again) all build float32 networks. The values are the float16 ones the run
    trained and evaluated with; the optimizer's float32 master copies of the
    trained weights go to .pdopt, from which a resumed run continues."""
    state = layer.state_dict()
    half = (paddle.float16, paddle.bfloat16)
    return {key: value.astype("float32") if value.dtype in half else value for key, value in state.items()}


def load_state(prefix):
    """The state record of a checkpoint, after checking its files belong to it."""
    path = Path(str(prefix) + STATE_SUFFIX)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {prefix} ({path.name} missing)")
    record = read_record(path)
    for ext in record.get("files", {}):
        _check_digest(prefix, ext, record)
    return record


def read_record(path):
    """A checkpoint's state.json (without checking the files it names)."""
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is damaged ({exc}); it is not a paddle_tl checkpoint record") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path} is damaged: it holds no paddle_tl checkpoint record")
    return record


def _check_digest(prefix, ext, record):
    """The file `<prefix>.<ext>` must be the one the record's sha256 names:
    a file changed since it was written (damaged, truncated, swapped for
    another run's) would otherwise load and score, silently wrong."""
    file = Path(f"{prefix}.{ext}")
    if not file.is_file() or file_digest(file) != record["files"][ext]:
        problem = "is missing" if not file.is_file() else "does not match the sha256 that"
        raise CheckpointError(f"checkpoint {prefix} is incomplete or damaged: {file.name} {problem} "
                              f"{Path(str(prefix) + STATE_SUFFIX).name} records (changed since it was "
                              "written, or the run was killed while saving)")


def resolve_resume(resume):
    """Global.resume names a run folder (its latest checkpoint) or a prefix."""
    path = Path(resume)
    if path.is_dir():
        path = path / LATEST
    for suffix in (".pdparams", STATE_SUFFIX):
        if str(path).endswith(suffix):
            path = Path(str(path)[: -len(suffix)])
    if not Path(str(path) + STATE_SUFFIX).is_file():
        raise CheckpointError(f"Global.resume: no checkpoint found at {resume} "
                              f"(expected {path}{STATE_SUFFIX})")
    return path


def load_weights(network, path):
    """Load a `.pdparams` (or prefix) into the network, refusing partial fits."""
    path = Path(str(path))
    if path.suffix != ".pdparams":
        path = Path(str(path) + ".pdparams")
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    # A checkpoint's weights are checked against the sha256 its state.json
    # records, wherever they are read (eval, export, distillation, resume).
    prefix = str(path)[: -len(".pdparams")]
    state_file = Path(prefix + STATE_SUFFIX)
    if state_file.is_file():
        record = read_record(state_file)
        if "pdparams" in record.get("files", {}):
            _check_digest(prefix, "pdparams", record)
    try:
        state = paddle.load(str(path))
    except Exception as exc:  # noqa: BLE001 -- paddle.load raises whatever its unpickler met (EOFError, ...)
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {exc}); it is damaged or not a "
                              "paddle state dict") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict ({type(state).__name__})")
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and list(state[k].shape) != list(own[k].shape)]
    if missing or wrong:
        example = (missing or wrong)[0]
        raise CheckpointError(f"{path} does not fit this model: {len(missing)} tensors missing, "
                              f"{len(wrong)} of another shape (e.g. {example}); "
                              "was it trained with another Arch.name or number of classes?")
    network.set_state_dict(state)
    return path


def optimizer_state_by_structured_name(network, optimizer, extra_layers=None):
    """Paddle keys optimizer state by generated parameter names
    (`conv2d_3.w_0_velocity_0`), which change with construction order; store
    them under structured names (`features.0.0.weight`) so that a fresh
    process can map them back."""
    to_structured = {p.name: n for n, p in _named_parameters(network, extra_layers)}
    return _rename_state(optimizer.state_dict(), to_structured)


def restore_optimizer(network, optimizer, path, with_schedule=True, extra_layers=None):
    """Optimizer state from `path`; the learning-rate schedule's position too
    unless `with_schedule` is false (a schedule built afresh)."""
    to_generated = {n: p.name for n, p in _named_parameters(network, extra_layers)}
    state = _rename_state(paddle.load(str(path)), to_generated)
    if not with_schedule:  # keep the new schedule at its start
        state["LR_Scheduler"] = optimizer._learning_rate.state_dict()
    optimizer.set_state_dict(state)


def _named_parameters(network, extra_layers):
    yield from network.named_parameters()
    for layer_name, layer in (extra_layers or {}).items():
        for name, param in layer.named_parameters():
            yield f"{layer_name}.{name}", param


def _rename_state(state, mapping):
    # Accumulator keys are "<param name>_<accumulator>_<n>"; match the longest
    # parameter name that prefixes the key.
    names = sorted(mapping, key=len, reverse=True)

    def rename(key):
        for name in names:
            if key == name or key.startswith(name + "_"):
                return mapping[name] + key[len(name):]
        return key

    renamed = {}
    for key, value in state.items():
        if isinstance(value, dict) and key != "LR_Scheduler":
            value = {rename(k): v for k, v in value.items()}  # e.g. AMP master_weights
        renamed[rename(key)] = value
    return renamed
