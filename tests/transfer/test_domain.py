"""Unsupervised domain adaptation: the gradient-reversal layer, MMD, the
source/target batches, short real runs of mmd and dann, and both beating
source-only training on a synthetic shift."""

import json

import numpy as np
import pytest
from PIL import Image, ImageOps
from synthetic_shapes import shift_folders, shift_overrides

from paddle_tl.config import load_config
from paddle_tl.data.datasets import UNLABELED, build_dataset, build_target_dataset
from paddle_tl.engine import train as train_module
from paddle_tl.engine.losses import CrossEntropy
from paddle_tl.engine.train import train
from paddle_tl.errors import ConfigError, DataError
from paddle_tl.runtime import import_paddle
from paddle_tl.transfer.domain import (DomainAdaptationLoss, LabeledAccuracy, SourceTargetPairs, mmd, pair_collate,
                                       ramp, reverse_gradient)
from paddle_tl.transfer.plan import plan_transfer

paddle = import_paddle()


def test_gradient_reversal_negates_and_scales_gradients_exactly():
    x = paddle.to_tensor(np.random.RandomState(0).randn(4, 6).astype("float32"), stop_gradient=False)
    upstream = np.random.RandomState(1).randn(4, 6).astype("float32")
    y = reverse_gradient(x, 0.37)
    (y * paddle.to_tensor(upstream)).sum().backward()
    assert np.array_equal(y.numpy(), x.numpy())
    assert np.array_equal(x.grad.numpy(), upstream * np.float32(-0.37))


def test_mmd_is_zero_for_identical_batches_and_grows_with_a_mean_shift():
    features = paddle.to_tensor(np.random.RandomState(0).randn(16, 8).astype("float32"))
    assert abs(float(mmd(features, features))) < 1e-6
    values = [float(mmd(features, features + shift)) for shift in (0.1, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[0] > 0


def test_ramp_starts_at_zero_and_approaches_one():
    assert ramp(0.0) == 0.0 and 0.99 < ramp(1.0) < 1.0
    assert ramp(0.1) < ramp(0.3) < ramp(0.6)


def _colour_folder_and_inverse(root, colour_folder, per_class=6):
    source = colour_folder(root / "source", per_class, 0)
    target = root / "target"
    target.mkdir()
    for path in sorted(source.rglob("*.png")):
        ImageOps.invert(Image.open(path).convert("RGB")).save(target / f"{path.parent.name}_{path.name}")
    return source, target


def test_pairs_put_target_images_after_source_images_labeled_unlabeled(tmp_path, colour_folder):
    source_root, target_root = _colour_folder_and_inverse(tmp_path, colour_folder, per_class=2)
    cfg = load_config(None, [f"DataLoader.Train.dataset.root={source_root}",
                             f"DataLoader.Target.dataset.root={target_root}"]).DataLoader

    def to_array(image):
        return np.asarray(image, dtype="float32")

    source = build_dataset(cfg.Train.dataset, "train", to_array)
    target = build_target_dataset(cfg.Target.dataset, to_array)
    assert [label for _, label in target.samples] == [UNLABELED] * 6
    pairs = SourceTargetPairs(source, target, seed=3)
    images, labels = pair_collate([pairs[i] for i in range(4)])
    assert images.shape[0] == 8 and labels.reshape(-1).tolist()[4:] == [UNLABELED] * 4
    assert labels.reshape(-1).tolist()[:4] == [label for _, label in source.samples[:4]]
    np.testing.assert_array_equal(images[0], source[0][0])
    first_epoch = [pairs[i][2].sum() for i in range(6)]
    pairs.epoch = 1
    second_epoch = [pairs[i][2].sum() for i in range(6)]
    assert sorted(first_epoch) == sorted(second_epoch) and first_epoch != second_epoch  # reshuffled, all used


def test_images_dataset_only_serves_as_target(tmp_path, colour_folder):
    _, target_root = _colour_folder_and_inverse(tmp_path, colour_folder, per_class=1)
    cfg = load_config(None, ["DataLoader.Train.dataset.name=Images", f"DataLoader.Train.dataset.root={target_root}"])
    with pytest.raises(DataError, match="DataLoader.Train.dataset.name: Images has no labels"):
        build_dataset(cfg.DataLoader.Train.dataset, "train", None)
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = load_config(None, [f"DataLoader.Target.dataset.root={empty}"])
    with pytest.raises(DataError, match="no readable images below"):
        build_target_dataset(cfg.DataLoader.Target.dataset, None)


def test_loss_and_accuracy_count_labeled_rows_only():
    rng = np.random.RandomState(0)
    logits = paddle.to_tensor(rng.randn(6, 3).astype("float32"))
    features = paddle.to_tensor(rng.randn(6, 4).astype("float32"))
    labels = paddle.to_tensor(np.array([[0], [2], [1], [UNLABELED], [UNLABELED], [UNLABELED]], dtype="int64"))
    loss = DomainAdaptationLoss(CrossEntropy(), "mmd", weight=2.0)
    loss.ramp = 0.5
    classification, domain = loss(logits, features, labels)
    expected = CrossEntropy()(logits[:3], labels[:3])
    np.testing.assert_allclose(float(classification), float(expected), rtol=1e-6)
    np.testing.assert_allclose(float(domain), 2.0 * 0.5 * float(mmd(features[:3], features[3:])), rtol=1e-5)
    # An evaluation batch (no target rows): the plain loss, a zero domain term.
    classification, domain = loss(logits[:3], features[:3], labels[:3])
    assert float(domain) == 0.0 and float(classification) == pytest.approx(float(expected), rel=1e-6)
    accuracy = LabeledAccuracy()
    correct = accuracy.compute(logits, features, labels)
    assert correct.shape[0] == 3


def test_domain_adaptation_needs_a_body_that_trains():
    transfer = load_config(None, ["Transfer.domain_adaptation=mmd"]).Transfer
    plan = plan_transfer(transfer, 5, [40, 40], pretrained=True, similarity={"separability": 0.9})
    assert plan.strategy == "partial" and plan.frozen_stages == 2 and "domain adaptation" in plan.reason
    with pytest.raises(ConfigError, match="Transfer.domain_adaptation=dann cannot be combined with "
                                          "Transfer.strategy=linear_probe: domain adaptation moves the body's "
                                          "features, which linear_probe keeps frozen"):
        load_config(None, ["Transfer.domain_adaptation=dann", "Transfer.strategy=linear_probe"])
    with pytest.raises(ConfigError, match="Transfer.domain_adaptation: 'coral' is not one of"):
        load_config(None, ["Transfer.domain_adaptation=coral"])


@pytest.fixture(scope="module")
def domains(tmp_path_factory, colour_folder):
    base = tmp_path_factory.mktemp("domains")
    source, target = _colour_folder_and_inverse(base, colour_folder, per_class=8)
    return {"source": source, "target": target, "val": colour_folder(base / "val", 3, 1)}


def _cfg(domains, run, method, *overrides):
    return load_config(None, [
        f"Global.output_dir={run}", "Global.epochs=2", "Global.seed=5", "Global.log_interval=1",
        "Arch.name=mobilenet_v1", "Arch.kwargs={scale: 0.25}", "Arch.input_size=32", "Arch.pretrained=false",
        f"DataLoader.Train.dataset.root={domains['source']}", f"DataLoader.Eval.dataset.root={domains['val']}",
        f"DataLoader.Target.dataset.root={domains['target']}",
        "DataLoader.Train.batch_size=6", "DataLoader.Train.num_workers=0", "DataLoader.Eval.num_workers=0",
        f"Transfer.domain_adaptation={method}", *overrides])


@pytest.mark.parametrize("method", ["mmd", "dann"])
@pytest.mark.slow
def test_adaptation_runs_logs_its_domain_loss_and_checkpoints(domains, tmp_path, method):
    run = tmp_path / "run"
    metrics = train(_cfg(domains, run, method))
    assert metrics["domain_adaptation"]["method"] == method
    assert metrics["domain_adaptation"]["target_images"] == 24
    rows = metrics["history"]
    assert all(row["train_domain_loss"] > 0 for row in rows)
    assert 0 < rows[0]["train_domain_ramp"] < rows[1]["train_domain_ramp"] < 1
    assert (run / "latest.domain_classifier.pdparams").is_file() == (method == "dann")
    assert not (run / "best_model.domain_classifier.pdparams").exists()  # the classifier alone is what deploys
    from visualdl import LogReader
    tags = LogReader(file_path=str(next((run / "vdl").glob("vdlrecords.*.log")))).get_tags()["scalar"]
    assert "train/domain_loss" in tags and "train/domain_ramp" in tags
    assert json.loads((run / "metrics.json").read_text())["domain_adaptation"]["method"] == method


@pytest.mark.slow
def test_dann_resume_restores_the_domain_classifier(domains, tmp_path, train_killed_after):
    """Stopped after epoch 1 and resumed, DANN reaches the weights of an
    uninterrupted run: the domain classifier and its optimizer state came back."""
    common = ("Global.epochs=2", "Transfer.strategy=full")
    train(_cfg(domains, tmp_path / "straight", "dann", *common))
    train_killed_after(_cfg(domains, tmp_path / "killed", "dann", *common), epoch=1)
    train(_cfg(domains, tmp_path / "killed", "dann", *common, f"Global.resume={tmp_path / 'killed'}"))
    for name in ("latest.pdparams", "latest.domain_classifier.pdparams"):
        a = paddle.load(str(tmp_path / "straight" / name))
        b = paddle.load(str(tmp_path / "killed" / name))
        for key in a:
            np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")


@pytest.fixture(scope="module")
def adaptation_scores(tmp_path_factory, shared_dir):
    """Target top-1 of the last epoch's model (choosing an epoch by target
    labels is not possible without them) for source-only training, mmd and
    dann, all with the same seed, data and budget."""
    base = tmp_path_factory.mktemp("adaptation")
    folders = shift_folders(base)
    weights = shared_dir / "weights" / "mobilenet_v2_imagenet.pdparams"
    with pytest.MonkeyPatch.context() as patch:
        # A module fixture runs before the per-test private HOME is set: paddle and VisualDL get their own here.
        patch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        patch.setattr(train_module, "write_report", lambda run_dir: run_dir)  # the report is not under test
        return {method: train(load_config(None, shift_overrides(folders, base / method, method, weights, seed=0)))
                ["final_top1"] for method in ("none", "mmd", "dann")}


@pytest.mark.parametrize("method", ["mmd", "dann"])
@pytest.mark.slow
def test_adaptation_beats_source_only_on_a_synthetic_shift(adaptation_scores, method):
    """Shapes learned on black backgrounds, scored on shapes blended into
    colour textures, where source-only training stays near chance (1/3).
    `python bench/synthetic_shift.py` runs this for several seeds (docs/domain_adaptation.md)."""
    assert adaptation_scores[method] >= adaptation_scores["none"] + 0.1, adaptation_scores
