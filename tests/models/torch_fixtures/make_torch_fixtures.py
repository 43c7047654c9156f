"""Generate the torch checkpoint fixtures that tests/test_torch_checkpoint.py reads.

The outputs are committed, so the tests never need torch. Regenerate only when
the fixtures must change, from a separate venv that has torch (never the
project's):

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
    /tmp/torchvenv/bin/python tests/models/torch_fixtures/make_torch_fixtures.py

Writes, next to this script:
  torch_plain_zip.pth      OrderedDict state dict, zip format (torch >= 1.6 default)
  torch_plain_legacy.pth   the same, _use_new_zipfile_serialization=False
  torch_nested_zip.pth     {"epoch": 3, "state_dict": {"module.<name>": ...}} (DataParallel-style)
  torch_nested_legacy.pth  the same, legacy format
  torch_expected.npz       the arrays the reader must return (bfloat16 as float32)
"""

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def state_dict():
    gen = torch.Generator().manual_seed(0)
    shared = torch.arange(20, dtype=torch.float32)
    state = OrderedDict()
    state["conv.weight"] = torch.randn(4, 3, 3, 3, generator=gen)
    state["bn.running_mean"] = torch.randn(4, generator=gen)
    state["bn.num_batches_tracked"] = torch.tensor(7, dtype=torch.int64)
    state["half"] = torch.randn(3, 4, generator=gen).half()
    state["bfloat"] = torch.randn(5, generator=gen).bfloat16()
    state["double"] = torch.randn(2, 2, generator=gen).double()
    state["int32"] = torch.arange(-3, 3, dtype=torch.int32)
    state["uint8"] = torch.arange(250, 256, dtype=torch.uint8)
    state["bool"] = torch.tensor([True, False, True])
    # Non-contiguous: the stride is (1, 5), not the row-major (3, 1).
    state["fc.weight"] = torch.randn(3, 5, generator=gen).t()
    # Two tensors on one storage: the second starts at element 5 of it.
    state["shared.base"] = shared
    state["shared.view"] = shared[5:11].view(2, 3)
    return state


def main():
    state = state_dict()
    assert not state["fc.weight"].is_contiguous()
    assert state["shared.view"].storage_offset() == 5
    nested = {"epoch": 3, "state_dict": OrderedDict(("module." + k, v) for k, v in state.items())}
    for name, obj in (("plain", state), ("nested", nested)):
        torch.save(obj, HERE / f"torch_{name}_zip.pth")
        torch.save(obj, HERE / f"torch_{name}_legacy.pth", _use_new_zipfile_serialization=False)
    expected = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}
    np.savez(HERE / "torch_expected.npz", **expected)
    print(f"torch {torch.__version__}: wrote fixtures to {HERE}")


if __name__ == "__main__":
    main()
