"""files.publish_folder: a folder replaced all or nothing, leftovers of
killed publishes removed, and a folder that cannot be written refused in
one line."""

import errno
import os
import subprocess
import sys

import pytest

from paddle_tl import files
from paddle_tl.errors import NotWritableError
from paddle_tl.files import publish_folder


class Killed(BaseException):
    """Stands for the process dying in the middle of a publish."""


def _old_folder(tmp_path):
    target = tmp_path / "inference"
    target.mkdir()
    (target / "inference.yml").write_text("old")
    (target / "old_only.txt").write_text("old")
    return target


def _write_new(folder):
    (folder / "inference.yml").write_text("new")
    return "done"


def _contents(folder):
    return {path.name: path.read_text() for path in folder.iterdir()}


def _dead_pid():
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_publish_folder_replaces_the_folder_whole(tmp_path):
    target = _old_folder(tmp_path)
    assert publish_folder(target, _write_new) == "done"
    assert _contents(target) == {"inference.yml": "new"}
    assert [path.name for path in tmp_path.iterdir()] == ["inference"]  # nothing left beside it
    assert oct(target.stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode
    publish_folder(tmp_path / "new" / "inference", _write_new)  # a target that does not exist yet
    assert _contents(tmp_path / "new" / "inference") == {"inference.yml": "new"}


def test_publish_folder_swaps_names_without_a_moment_with_no_folder(tmp_path, monkeypatch):
    """Where the system exchanges names in one step, the target is never
    renamed away (a kill between two renames would leave no folder)."""
    probe_a, probe_b = tmp_path / "a", tmp_path / "b"
    probe_a.mkdir(), probe_b.mkdir()
    if not files._exchange(probe_a, probe_b):
        pytest.skip("this system has no renameat2 RENAME_EXCHANGE")
    target = _old_folder(tmp_path)
    renamed = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: renamed.append((a, b)) or real_rename(a, b))
    publish_folder(target, _write_new)
    assert renamed == [] and _contents(target) == {"inference.yml": "new"}


def test_publish_folder_without_exchange_falls_back_to_two_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    target = _old_folder(tmp_path)
    publish_folder(target, _write_new)
    assert _contents(target) == {"inference.yml": "new"}
    assert [path.name for path in tmp_path.iterdir()] == ["inference"]


@pytest.mark.parametrize("where", ["fill", "swap"])
def test_an_interrupted_publish_leaves_the_old_folder_whole(tmp_path, monkeypatch, where):
    target = _old_folder(tmp_path)

    def fill(folder):
        _write_new(folder)
        if where == "fill":
            raise Killed

    if where == "swap":
        monkeypatch.setattr(files, "_swap_in", lambda staging, target: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        publish_folder(target, fill)
    assert _contents(target) == {"inference.yml": "old", "old_only.txt": "old"}
    assert [path.name for path in tmp_path.iterdir()] == ["inference"]


def test_leftovers_of_killed_publishes_are_removed_next_time(tmp_path):
    target = _old_folder(tmp_path)
    dead = _dead_pid()
    for name in (f".inference.new-{dead}-x1", f".inference.old-{dead}-x2", f".inference.new-{os.getppid()}-x3",
                 f".other.new-{dead}-x4"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "inference.pdiparams").write_bytes(b"half")
    publish_folder(target, _write_new)
    # The dead process's are gone; a live process's (an export still running) and another target's stay.
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        f".inference.new-{os.getppid()}-x3", f".other.new-{dead}-x4", "inference"]


def test_a_read_only_folder_is_one_line_naming_it(tmp_path, monkeypatch):
    """A read-only mount (EROFS) cannot be made in a test: the staging
    folder's creation fails as it would there."""
    target = _old_folder(tmp_path)

    def read_only(**kwargs):
        raise OSError(errno.EROFS, "Read-only file system", os.path.join(kwargs["dir"], "x"))

    monkeypatch.setattr(files.tempfile, "mkdtemp", read_only)
    with pytest.raises(NotWritableError) as refused:
        publish_folder(target, _write_new, what="Global.save_inference_dir")
    assert str(refused.value) == (f"Global.save_inference_dir {target}: cannot write in {tmp_path} (Read-only file "
                                  f"system); nothing was written, {target} is as it was")
    assert _contents(target) == {"inference.yml": "old", "old_only.txt": "old"}


def test_a_permission_error_while_writing_is_one_line(tmp_path):
    target = _old_folder(tmp_path)

    def fill(folder):
        raise PermissionError(errno.EACCES, "Permission denied", str(folder / "inference.pdiparams"))

    with pytest.raises(NotWritableError, match=r"cannot write in .*inference\.pdiparams \(Permission denied\)"):
        publish_folder(target, fill)
    assert _contents(target) == {"inference.yml": "old", "old_only.txt": "old"}
    assert [path.name for path in tmp_path.iterdir()] == ["inference"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes in read-only folders")
def test_a_chmod_read_only_folder_is_refused(tmp_path):
    target = _old_folder(tmp_path)
    target.chmod(0o555)
    try:
        with pytest.raises(NotWritableError, match=f"cannot write in {target} "):
            publish_folder(target, _write_new)
    finally:
        target.chmod(0o755)
    assert _contents(target) == {"inference.yml": "old", "old_only.txt": "old"}
