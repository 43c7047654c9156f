"""`paddle-tl check-data`: the report on a folder with known faults."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from paddle_tl.config import load_config
from paddle_tl.data.check import check_data, format_table

REPO = Path(__file__).resolve().parents[2]


def test_report_finds_duplicates_imbalance_unreadable_and_missing_classes(tiny_image_folder, tmp_path):
    train = tiny_image_folder("train", classes=("cat", "dog", "fox"), per_class=8)
    for extra in list((train / "cat").iterdir())[:4]:  # cat: 8 -> 4, so dog/cat = 2x; then fox: 8 -> 1
        extra.unlink()
    for extra in sorted((train / "fox").iterdir())[1:]:
        extra.unlink()
    (train / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    evaluation = tmp_path / "eval"
    for name in ("cat", "dog"):  # no fox in eval
        (evaluation / name).mkdir(parents=True)
        Image.new("RGB", (30, 20), (10, 200, 30)).save(evaluation / name / "own.png")
    shutil.copy(next((train / "dog").glob("*.png")), evaluation / "dog" / "copied.png")

    cfg = load_config(None, [f"DataLoader.Train.dataset.root={train}", f"DataLoader.Eval.dataset.root={evaluation}"])
    report = check_data(cfg, tmp_path / "out")

    assert report["splits"]["train"]["per_class"] == {"cat": 4, "dog": 8, "fox": 1}
    assert report["splits"]["eval"]["per_class"] == {"cat": 1, "dog": 2, "fox": 0}
    assert [u["file"] for u in report["splits"]["train"]["unreadable"]] == [str(train / "dog" / "broken.jpg")]
    assert len(report["duplicates_across_splits"]) == 1
    assert report["duplicates_across_splits"][0]["eval"] == str(evaluation / "dog" / "copied.png")
    assert report["imbalance_ratio"] == 8.0
    assert report["splits"]["train"]["width"] == {"min": 48, "median": 48, "max": 48}
    assert report["splits"]["eval"]["modes"] == {"RGB": 3}
    problems = " | ".join(report["problems"])
    for expected in ("1 unreadable", "byte-identical", "no evaluation images: fox", "imbalance"):
        assert expected in problems
    assert json.loads((tmp_path / "out" / "data_check.json").read_text()) == report
    assert (tmp_path / "out" / "class_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fox 1 0" in [" ".join(line.split()) for line in format_table(report).splitlines()]


def test_report_lists_files_under_two_classes(tiny_image_folder, tmp_path):
    """ants/tobees -> ../bees was "no problems found"; training refuses it,
    and the report is still made, the conflict among its problems."""
    train = tiny_image_folder("train", per_class=4)
    evaluation = tiny_image_folder("eval", per_class=2, size=(50, 40))
    os.symlink("../dog", train / "cat" / "todog")
    cfg = load_config(None, [f"DataLoader.Train.dataset.root={train}", f"DataLoader.Eval.dataset.root={evaluation}"])
    report = check_data(cfg, tmp_path / "out")
    conflicts = report["splits"]["train"]["label_conflicts"]
    assert len(conflicts) == 4 and report["splits"]["eval"]["label_conflicts"] == []
    assert conflicts[0] == {"file": str(train / "dog" / "dog_0.png"),
                            "classes": {"cat": [str(train / "cat" / "todog" / "dog_0.png")],
                                        "dog": [str(train / "dog" / "dog_0.png")]}}
    assert report["problems"] == [
        "training data: 4 images are filed under more than one class (by their real path): 4 under 'cat' and "
        f"'dog', e.g. {train}/cat/todog/dog_0.png is {train}/dog/dog_0.png (training refuses this)"]
    assert "no problems found" not in format_table(report)


@pytest.mark.slow
def test_clean_data_from_the_command_line(tiny_image_folder, tmp_path):
    # another size, so that no eval file repeats a training file byte for byte
    train, evaluation = tiny_image_folder("train"), tiny_image_folder("eval", per_class=2, size=(50, 40))
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "check_data.py"), "-c", str(REPO / "configs" / "mobilenet_v2_imagefolder.yaml"),
         "-o", f"DataLoader.Train.dataset.root={train}", "-o", f"DataLoader.Eval.dataset.root={evaluation}",
         "--output", str(tmp_path / "report")],
        capture_output=True, text=True, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["class", "train", "eval"] and lines[1].split() == ["cat", "6", "2"]
    assert "no problems found" in result.stdout
    assert (tmp_path / "report" / "data_check.json").is_file()
