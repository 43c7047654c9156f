"""File helpers shared by checkpoints, the run folder, weights and the data
report: content hashes, and writes that neither a kill nor a full disk can
tear."""

import errno
import hashlib
import json
import os
from pathlib import Path

from paddle_tl.errors import DiskFullError


def file_digest(path, algorithm="sha256"):
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path, write):
    """`write(tmp_path)` then rename over `path`: a kill leaves the old file
    or the new one, never a torn one."""
    replace_together([(path, write)])


def replace_together(writes, previous="the previous version"):
    """Write files that belong together (a checkpoint's): each `write(tmp)`
    of the (path, write) pairs, in order, to a temporary name beside its
    path; only when every one is written are they renamed over their paths.
    A failure while writing, a full disk above all, removes the temporary
    files and replaces nothing, so the old files stay whole and consistent.
    `previous` names them in the error message."""
    staged = []
    try:
        for path, write in writes:
            tmp = Path(f"{path}.tmp{os.getpid()}")
            staged.append((tmp, path))
            write(tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())  # on disk before it replaces anything
    except BaseException as exc:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise DiskFullError(f"no space left on the device while writing {path}; nothing was replaced, "
                                f"so {previous} is intact") from exc
        raise
    for tmp, path in staged:
        os.replace(tmp, path)


def write_json(path, data):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))
