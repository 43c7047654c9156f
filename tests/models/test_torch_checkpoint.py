"""Reading torch checkpoints without torch, and renaming them for paddle.vision.

The fixtures in tests/models/torch_fixtures were written by real torch (make_torch_fixtures.py).
"""

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from paddle_tl.errors import TorchCheckpointError
from paddle_tl.models.torch_checkpoint import read_torch_checkpoint, torchvision_to_paddle
from paddle_tl.runtime import import_paddle

paddle = import_paddle()

DATA = Path(__file__).resolve().parent / "torch_fixtures"
FIXTURES = ["torch_plain_zip.pth", "torch_plain_legacy.pth", "torch_nested_zip.pth", "torch_nested_legacy.pth"]
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@pytest.mark.parametrize("name", FIXTURES)
def test_reads_torch_fixture_exactly(name):
    expected = np.load(DATA / "torch_expected.npz")
    state = read_torch_checkpoint(DATA / name)
    # Nested {"state_dict": {"module.x": ...}} comes out as plain {"x": ...}.
    assert list(state) == list(expected.files)
    for key in expected.files:
        assert state[key].dtype == expected[key].dtype, key
        assert state[key].shape == expected[key].shape, key
        np.testing.assert_array_equal(state[key], expected[key], err_msg=key)


def test_dtypes_strides_and_shared_storage():
    state = read_torch_checkpoint(DATA / "torch_plain_zip.pth")
    assert state["bfloat"].dtype == np.float32  # numpy has no bfloat16
    assert state["half"].dtype == np.float16
    assert state["bn.num_batches_tracked"].dtype == np.int64
    assert state["bool"].dtype == np.bool_
    # A transposed tensor comes back as its own contiguous array.
    assert state["fc.weight"].shape == (5, 3) and state["fc.weight"].flags.c_contiguous
    # A view at offset 5 of a shared storage.
    np.testing.assert_array_equal(state["shared.view"], np.arange(5, 11, dtype=np.float32).reshape(2, 3))


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_files(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"w": _RunsShell(marker)}, protocol=2)
    legacy = tmp_path / "evil_legacy.pth"
    header = [LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}]
    legacy.write_bytes(b"".join(pickle.dumps(obj, protocol=2) for obj in header) + evil)
    in_zip = tmp_path / "evil_zip.pth"
    with zipfile.ZipFile(in_zip, "w") as archive:
        archive.writestr("archive/data.pkl", evil)
    raw = tmp_path / "evil_raw.pth"
    raw.write_bytes(evil)
    return marker, [legacy, in_zip, raw]


def test_refuses_pickle_that_calls_os_system(tmp_path):
    marker, files = _evil_files(tmp_path)
    for path in files:
        with pytest.raises(TorchCheckpointError, match=r"refusing to unpickle \w+\.system"):
            read_torch_checkpoint(path)
    assert not marker.exists()


def test_garbage_file_names_the_file(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(64) + b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        read_torch_checkpoint(garbage)


def test_zip_without_data_pkl_is_refused(tmp_path):
    path = tmp_path / "notes.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes/readme.txt", "hello")
    with pytest.raises(TorchCheckpointError, match="notes.pth .*not a torch.save checkpoint"):
        read_torch_checkpoint(path)


def test_tensor_outside_its_storage_is_refused(tmp_path):
    # Cut the first storage short: its tensor would now read past the end.
    path = tmp_path / "short.pth"
    with zipfile.ZipFile(DATA / "torch_plain_zip.pth") as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:16] if info.filename.endswith("/data/0") else data)
    with pytest.raises(TorchCheckpointError, match=r"short.pth: conv.weight: tensor .* outside its storage"):
        read_torch_checkpoint(path)


def test_checkpoint_without_tensors_is_refused(tmp_path):
    path = tmp_path / "empty.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"epoch": 3}, protocol=2))
    with pytest.raises(TorchCheckpointError, match="no state dict"):
        read_torch_checkpoint(path)


def _small_model():
    return paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4), paddle.nn.Flatten(), paddle.nn.Linear(16, 2)
    )


def test_torchvision_to_paddle_renames_and_transposes():
    rng = np.random.default_rng(0)
    linear = rng.standard_normal((2, 16), dtype=np.float32)  # torch: [out, in]
    state = {
        "0.weight": rng.standard_normal((4, 3, 3, 3), dtype=np.float32),
        "0.bias": np.zeros(4, np.float32),
        "1.weight": np.ones(4, np.float32),
        "1.bias": np.zeros(4, np.float32),
        "1.running_mean": np.full(4, 0.5, np.float32),
        "1.running_var": np.full(4, 2.0, np.float32),
        "1.num_batches_tracked": np.array(3, np.int64),
        "3.weight": linear,
        "3.bias": np.zeros(2, np.float32),
    }
    out = torchvision_to_paddle(state, _small_model())
    assert set(out) == set(_small_model().state_dict())
    np.testing.assert_array_equal(out["1._mean"], state["1.running_mean"])
    np.testing.assert_array_equal(out["1._variance"], state["1.running_var"])
    np.testing.assert_array_equal(out["3.weight"], linear.T)
    # The conv weight is 4-D and not a Linear's: untouched.
    assert out["0.weight"] is state["0.weight"]


def test_same_layers_other_names_map_by_position():
    model = paddle.vision.models.mobilenet_v3_small(num_classes=10)
    target = model.state_dict()
    # Same tensors in the same order under torchvision-like names, with torch's
    # [out, in] Linear weights.
    renamed = {
        f"features.{i}.weight": t.numpy().T if t.ndim == 2 else t.numpy() for i, t in enumerate(target.values())
    }
    out = torchvision_to_paddle(renamed, model)
    assert list(out) == list(target)
    for name, tensor in target.items():
        np.testing.assert_array_equal(out[name], tensor.numpy(), err_msg=name)


def test_position_mapping_leaves_other_counts_alone():
    model = paddle.vision.models.mobilenet_v3_small(num_classes=10)
    state = {"features.0.weight": np.zeros((16, 3, 3, 3), np.float32)}
    assert list(torchvision_to_paddle(state, model)) == ["features.0.weight"]


def test_big_endian_checkpoint(tmp_path):
    # A checkpoint written on a big-endian machine: byteorder record "big" and
    # every storage byte-swapped. The storages' dtypes come from the pickle.
    from paddle_tl.models.torch_checkpoint import _RAW_DTYPES, _RestrictedUnpickler

    src_path = DATA / "torch_plain_zip.pth"
    path = tmp_path / "big_endian.pth"
    with zipfile.ZipFile(src_path) as src, zipfile.ZipFile(path, "w") as dst:
        unpickler = _RestrictedUnpickler(io.BytesIO(src.read("torch_plain_zip/data.pkl")), src_path)
        unpickler.load()
        for info in src.infolist():
            data = src.read(info)
            directory, _, key = info.filename.rpartition("/")
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif directory.endswith("/data"):
                data = np.frombuffer(data, _RAW_DTYPES[unpickler.storages[key]]).byteswap().tobytes()
            dst.writestr(info, data)
    expected = np.load(DATA / "torch_expected.npz")
    state = read_torch_checkpoint(path)
    for key in expected.files:
        np.testing.assert_array_equal(state[key], expected[key], err_msg=key)
