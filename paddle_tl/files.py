"""File helpers shared by checkpoints, the run folder, weights and the data
report: content hashes and writes that a kill cannot tear."""

import hashlib
import json
import os
from pathlib import Path


def file_digest(path, algorithm="sha256"):
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path, write):
    """`write(tmp_path)` then rename over `path`: a kill leaves the old file
    or the new one, never a torn one."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path, data):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))
