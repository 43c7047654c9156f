"""File helpers shared by checkpoints, the run folder, weights, the data
report and exported inference folders: content hashes, and writes that
neither a kill nor a full disk can tear."""

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from paddle_tl.errors import DiskFullError, NotWritableError


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


# Linux renameat2(2): swap two names in one step, so that a path always names
# one whole folder, the old or the new, whatever moment a kill strikes.
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# What a filesystem or kernel without RENAME_EXCHANGE answers, and ENOENT: no target to swap with.
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOENT}
# Errors the user fixes (a read-only folder or mount, a folder of another user): one line, not a traceback.
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


def publish_folder(target, fill, what="folder"):
    """Write a folder all or nothing: `fill(staging)` writes, and checks, its
    files in a new folder beside `target` (the same parent, so the same
    filesystem); only when fill returns does that folder take target's place,
    in one exchange of names where the system has one (Linux renameat2), and
    the old folder is removed after. A kill at any moment leaves at `target`
    the old whole folder or the new whole one; the staging folder it leaves
    behind (named after `target` and the dead process) is removed by the next
    publish of the same target. Returns what fill returns. `what` names the
    target in errors (a config key)."""
    target = Path(target)
    if target.is_symlink():  # replace the folder the link names, not the link
        target = Path(os.path.realpath(target))
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        # Checked up front because root passes any permission check later and
        # would replace a folder its owner made read-only.
        for folder in (parent, target) if target.exists() else (parent,):
            if not os.access(folder, os.W_OK):
                raise PermissionError(errno.EACCES, "read-only", str(folder))
        _remove_leftovers(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise _user_error(exc, target, what, str(parent)) from exc
    try:
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
        result = fill(staging)
        for path in staging.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())  # on disk before it replaces anything
        old = _swap_in(staging, target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in _NOT_WRITABLE | {errno.ENOSPC, errno.EDQUOT}:
            raise _user_error(exc, target, what, exc.filename) from exc
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return result


def _user_error(exc, target, what, culprit):
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"{what} {target}: no space left on the device; nothing was replaced, "
                             f"so {target} is as it was")
    if exc.errno not in _NOT_WRITABLE:
        return exc
    culprit = culprit or target
    return NotWritableError(f"{what} {target}: cannot write in {culprit} ({exc.strerror or exc}); "
                            f"nothing was written, {target} is as it was")


def _swap_in(staging, target):
    """Put staging at target; returns the path now holding the old folder
    (to remove), or None when there was none."""
    if _exchange(staging, target):
        return staging
    if not os.path.lexists(target):
        os.rename(staging, target)
        return None
    # No exchange on this system: two renames, with a moment in between
    # where target is missing (the old folder waits under the aside name).
    aside = staging.with_name(staging.name.replace(".new-", ".old-", 1))
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    return aside


def _exchange(a, b):
    """Swap the names a and b in one step; False where the system cannot, or b does not exist."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not Linux, or a libc before glibc 2.28
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(b))


def _remove_leftovers(target):
    """Remove the staging folders of earlier publishes of target whose process is gone (killed)."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:new|old)-(\d+)-")
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
