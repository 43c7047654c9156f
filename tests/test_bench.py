"""The benchmark scripts refuse what they cannot measure on this machine,
with one line and before any work (the GPU path is tested without a GPU)."""

import subprocess
import sys
from pathlib import Path

import pytest

from paddle_tl.runtime import import_paddle

paddle = import_paddle()
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each test runs a bench script
HAS_GPU = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


@pytest.mark.parametrize("args, message", [
    pytest.param(["--device", "gpu"], "Global.device: gpu requested, but this paddle build or machine has no GPU",
                 marks=pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")),
    (["--amp"], "--amp: mixed precision needs --device gpu"),
    (["--amp", "O2", "--to_static"], "--amp: mixed precision needs --device gpu"),
    pytest.param(["--device", "gpu", "--amp", "O2", "--to_static"],
                 "Global.device: gpu requested, but this paddle build or machine has no GPU",
                 marks=pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")),
])
def test_train_throughput_refuses_cleanly(args, message, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "train_throughput.py"), *args],
                            capture_output=True, text=True, timeout=120,
                            env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"train_throughput: {message}")
    assert "Traceback" not in result.stderr
