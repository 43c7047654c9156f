"""Read PyTorch checkpoints (.pth/.pt) into numpy arrays without importing torch.

A torch checkpoint is a pickle, and unpickling runs whatever callables the file
names. `torch.load` on an untrusted file is therefore code execution, and torch
is a 700 MB dependency we do not want either. This module reimplements the
small part of `torch.load` that a state dict needs, with an unpickler that can
only build the handful of objects a state dict is made of.

Both `torch.save` formats are read:

* zip (default since torch 1.6): `<dir>/data.pkl` holds the object pickle,
  `<dir>/data/<key>` the raw bytes of each storage, `<dir>/byteorder` the
  endianness (absent in older files, which were little-endian).
* legacy (`_use_new_zipfile_serialization=False`): pickles of the magic number,
  the protocol version and a sys_info dict, then the object pickle, then the
  list of storage keys, then each storage as an int64 element count and its
  raw bytes.

In both, tensors reference storages through pickle persistent ids of the form
`('storage', storage_type, key, location, numel[, view_metadata])`.
"""

import collections
import io
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from paddle_tl.errors import TorchCheckpointError
from paddle_tl.runtime import import_paddle

paddle = import_paddle()


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# torch storage class -> element dtype. bfloat16 has no numpy dtype: its raw
# 16 bits are read as uint16 and widened to float32 afterwards.
_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "UntypedStorage": "uint8",
}
_RAW_DTYPES = {name: name for name in _STORAGE_DTYPES.values()} | {"bfloat16": "uint16"}

# Nested checkpoints keep the weights under one of these keys, next to epoch,
# optimizer state and the like.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model_state", "model")
_DATA_PARALLEL_PREFIX = "module."


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str
    offset: int = 0  # elements; only legacy storage views have one


@dataclass(frozen=True)
class _TensorRef:
    """A tensor as the pickle describes it; its bytes are read afterwards."""

    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    # _rebuild_tensor_v2 also passes requires_grad, backward hooks and metadata,
    # none of which matter for weights.
    if not isinstance(storage, _StorageRef):
        raise TypeError(f"tensor refers to {type(storage).__name__}, not to a storage")
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_ignored):
    return data


def _allowed_globals():
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(dtype)
    for module in ("torch.storage", "torch._C"):
        allowed[(module, "UntypedStorage")] = _StorageType("uint8")
    # torch.dtype objects pickle as globals such as torch.float16; metadata
    # next to the weights sometimes holds one. Their name is all we need.
    for name in ("float32", "float", "float16", "half", "bfloat16", "float64", "double",
                 "int64", "long", "int32", "int", "int16", "int8", "uint8", "bool"):
        allowed[("torch", name)] = name
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds state dicts and refuses every other global."""

    def __init__(self, file, source, storages=None):
        super().__init__(file)
        self._source = source
        # key -> dtype of every storage the pickle referenced, in first-seen order
        self.storages = {} if storages is None else storages

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise TorchCheckpointError(
                f"{self._source}: refusing to unpickle {module}.{name}: a checkpoint may only "
                "contain tensors in dicts/lists (loading anything else could run arbitrary code); "
                "re-save it with torch.save(model.state_dict(), path)"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6)):
            raise TorchCheckpointError(f"{self._source}: unsupported persistent id {pid!r:.80}")
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if typename != "storage":
            # ("module", cls, source_file, source) comes from torch.save(model).
            raise TorchCheckpointError(
                f"{self._source}: holds a pickled {typename!r}, not a state dict; "
                "re-save it with torch.save(model.state_dict(), path)"
            )
        storage_type, key, _location, _numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, _StorageType):
            raise TorchCheckpointError(f"{self._source}: storage of unknown type {storage_type!r:.80}")
        key = str(key)
        self.storages.setdefault(key, storage_type.dtype)
        if view is None:
            return _StorageRef(key, storage_type.dtype)
        # Legacy files from torch < 1.0 can hold views into a storage: the
        # view's offset counts in elements of the root storage.
        _view_key, view_offset, _view_size = view
        return _StorageRef(key, storage_type.dtype, int(view_offset))


def read_torch_checkpoint(path) -> dict[str, np.ndarray]:
    """Return the state dict stored in a torch checkpoint, as numpy arrays.

    Nested checkpoints ({"state_dict": ...}, {"model": ...}, ...) are unwrapped
    and the "module." prefix that DataParallel adds is removed. float16 and
    float64 keep their dtype; bfloat16 becomes float32 (numpy has no bfloat16).
    Raises TorchCheckpointError (a ValueError) naming the file when it is not a
    torch checkpoint or holds anything but tensors and plain containers.
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            obj, raw, byteorder = _load_zip(path)
        else:
            obj, raw, byteorder = _load_legacy(path)
        state = _find_state_dict(obj, path)
        return {name: _materialize(ref, raw, byteorder, f"{path}: {name}") for name, ref in state.items()}
    except TorchCheckpointError:
        raise
    except Exception as exc:
        # Garbage fed to an unpickler fails in open-ended ways (EOFError,
        # UnpicklingError, KeyError, TypeError, struct.error, ...).
        raise TorchCheckpointError(f"{path} is not a readable PyTorch checkpoint: {exc!r:.200}") from exc


def _load_zip(path):
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise TorchCheckpointError(f"{path} is a zip file but not a torch.save checkpoint (no <dir>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), path)
        obj = unpickler.load()
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode("ascii").strip()
        raw = {key: archive.read(f"{prefix}data/{key}") for key in unpickler.storages}
    return obj, raw, byteorder


def _load_legacy(path):
    with open(path, "rb") as f:
        magic = _RestrictedUnpickler(f, path).load()
        if magic != _LEGACY_MAGIC:
            raise TorchCheckpointError(
                f"{path} is not a PyTorch checkpoint (neither a zip nor a legacy torch.save file)"
            )
        _RestrictedUnpickler(f, path).load()  # protocol version
        sys_info = _RestrictedUnpickler(f, path).load()
        byteorder = "little" if sys_info.get("little_endian", True) else "big"
        unpickler = _RestrictedUnpickler(f, path)
        obj = unpickler.load()
        keys = _RestrictedUnpickler(f, path).load()
        fmt = "<q" if byteorder == "little" else ">q"
        raw = {}
        for key in map(str, keys):
            (numel,) = struct.unpack(fmt, f.read(8))
            nbytes = numel * np.dtype(_RAW_DTYPES[unpickler.storages[key]]).itemsize
            raw[key] = f.read(nbytes)
            if len(raw[key]) != nbytes:
                raise TorchCheckpointError(f"{path} is truncated (storage {key} needs {nbytes} bytes)")
    return obj, raw, byteorder


def _find_state_dict(obj, path) -> dict:
    # Descend through wrappers like {"epoch": 3, "state_dict": {...}}.
    while isinstance(obj, dict) and not _tensors(obj):
        nested = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if nested is None:
            break
        obj = nested
    # Non-tensor entries (e.g. a stored step count) are not weights.
    tensors = _tensors(obj) if isinstance(obj, dict) else {}
    if not tensors:
        raise TorchCheckpointError(f"{path} holds no state dict (found {type(obj).__name__} without tensors)")
    if all(k.startswith(_DATA_PARALLEL_PREFIX) for k in tensors):
        tensors = {k[len(_DATA_PARALLEL_PREFIX):]: v for k, v in tensors.items()}
    return tensors


def _tensors(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if isinstance(v, _TensorRef)}


def _materialize(ref: _TensorRef, raw: dict, byteorder: str, where: str) -> np.ndarray:
    dtype = ref.storage.dtype
    raw_dtype = np.dtype(_RAW_DTYPES[dtype]).newbyteorder("<" if byteorder == "little" else ">")
    flat = np.frombuffer(raw[ref.storage.key], dtype=raw_dtype)
    offset = ref.storage.offset + ref.offset
    if 0 in ref.size:
        array = np.empty(ref.size, dtype=raw_dtype)
    else:
        # as_strided reads wherever the strides point: check that every element
        # lies inside the storage, or a crafted file could read stray memory.
        fits = len(ref.size) == len(ref.stride) and offset >= 0 and min(ref.stride, default=0) >= 0
        if fits:
            last = offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
            fits = last < flat.size
        if not fits:
            raise TorchCheckpointError(
                f"{where}: tensor of size {list(ref.size)}, stride {list(ref.stride)} and offset {offset} "
                f"lies outside its storage of {flat.size} elements"
            )
        array = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=ref.size, strides=[s * raw_dtype.itemsize for s in ref.stride]
        )
    # A row-major copy in native byte order, whatever the strides were.
    array = array.astype(raw_dtype.newbyteorder("="), order="C")
    if dtype == "bfloat16":
        # bfloat16 is the upper half of a float32.
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


# paddle.vision architectures built from the same layers as torchvision's, in
# the same registration order, but under other names (e.g. torchvision's
# `features.denseblock1.denselayer1.norm1` is DenseNet's
# `dense_block_func_list.0.bn_ac_func1._batch_norm`): their tensors map one to
# one by position.
_SAME_LAYERS_OTHER_NAMES = {"DenseNet", "MobileNetV3Large", "MobileNetV3Small", "ShuffleNetV2"}


def torchvision_to_paddle(state: dict[str, np.ndarray], model) -> dict[str, np.ndarray]:
    """Rename a torchvision state dict to the layout of a paddle.vision model.

    Batch-norm buffers get paddle's names (running_mean -> _mean, running_var ->
    _variance), num_batches_tracked is dropped, and every Linear weight is
    transposed: torch stores it [out, in], paddle [in, out].

    torchvision arch          paddle.vision result
    ------------------------  ---------------------------------------------
    resnet*, resnext*,        exact: same names
    wide_resnet*, vgg*
    (with and without BN),
    mobilenet_v2
    densenet*,                exact: same layers under other names, mapped
    mobilenet_v3_*,           by position
    shufflenet_v2_*
    alexnet, squeezenet*,     refused (names left as torchvision's, so the
    inception_v3, googlenet   loader reports the missing tensors): paddle's
                              versions compute something else. AlexNet,
                              SqueezeNet and InceptionV3 use
                              Dropout(mode="downscale_in_infer"), which scales
                              activations at inference; SqueezeNet's pooling
                              and InceptionV3's batch-norm epsilon differ too;
                              GoogLeNet has no batch norm.

    paddle_tl's efficientnet_lite* carry the layer names of
    efficientnet-lite-pytorch's EfficientNet, so its checkpoints map by name
    too (tests/models/test_efficientnet_lite.py checks the converted network
    against a numpy forward of the checkpoint's own tensors).

    "Exact" was checked against torchvision 0.29 on randomised weights
    (resnet18, resnet50, vgg11, vgg16_bn, densenet121, mobilenet_v2,
    mobilenet_v3_small/large, shufflenet_v2_x0_5/x1_0): paddle's logits equal
    torchvision's up to float32 rounding (relative error < 2e-6).

    The result may still not fit `model` (another architecture or width);
    `paddle_tl.weights.load_pretrained` checks that and says so.
    """
    renamed = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = re.sub(r"running_mean$", "_mean", key)
        key = re.sub(r"running_var$", "_variance", key)
        renamed[key] = value
    target = model.state_dict()
    if type(model).__name__ in _SAME_LAYERS_OTHER_NAMES and renamed.keys() != target.keys():
        renamed = _map_by_position(renamed, target)
    linear_weights = {
        f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, paddle.nn.Linear)
    }
    return {
        key: np.ascontiguousarray(value.T) if key in linear_weights and value.ndim == 2 else value
        for key, value in renamed.items()
    }


def _map_by_position(state: dict, target: dict) -> dict:
    # Only when the tensor count and every tensor's rank agree; shapes may still
    # differ (a new head, another width), which the loader reports. Anything
    # else is left as it was, so that loading refuses it by name.
    if len(state) != len(target):
        return state
    pairs = list(zip(target.items(), state.values(), strict=True))
    if any(len(param.shape) != value.ndim for (_name, param), value in pairs):
        return state
    return {name: value for (name, _param), value in pairs}
