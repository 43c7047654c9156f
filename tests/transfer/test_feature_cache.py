"""Cached activations: the frozen bottom stages run once per image view and
the top stages train on their output, as they would on the images."""

import contextlib

import numpy as np
import pytest

from paddle_tl.engine import fit
from paddle_tl.engine.train import train
from paddle_tl.models.static import dynamic_runner
from paddle_tl.models.zoo import get_spec, stage_index
from paddle_tl.runtime import import_paddle
from paddle_tl.transfer import feature_cache
from tests.engine.test_train import _weights, make_cfg

paddle = import_paddle()
NO_AUGMENTATION = ("DataLoader.Train.augment.crop_scale=[1.0, 1.0]", "DataLoader.Train.augment.hflip=false",
                   "Transfer.cache_views=1")
PARTIAL = ("Transfer.strategy=partial", "Transfer.freeze_stages=3", "Global.epochs=2",
           "Optimizer.lr.learning_rate=0.002")  # small steps: runtime float differences stay small


@pytest.mark.slow
def test_top_stages_train_the_same_on_cached_activations_as_on_images(workspace, tmp_path, monkeypatch):
    """With augmentation off, the top stages trained on cached activations
    end where training through the whole network on images ends.

    The activations are computed by the dynamic graph and kept in float32
    here, so both runs do the same arithmetic: this tiny network's nearly
    constant channels (solid-colour images) meet BatchNorm over a batch of 8
    and amplify any difference, such as Paddle Inference's last bits or
    float16 rounding, which the default path has (see the next test)."""
    dtype, tolerance = "float32", 1e-5
    monkeypatch.setattr(fit, "ACTIVATION_DTYPE", dtype)
    monkeypatch.setattr(feature_cache, "fastest_runner", _dynamic_runner)
    cached = train(make_cfg(workspace, tmp_path / "cached", *PARTIAL, *NO_AUGMENTATION))
    plain = train(make_cfg(workspace, tmp_path / "plain", *PARTIAL, *NO_AUGMENTATION, "Transfer.cache_features=false"))
    assert cached["strategy"]["cached_activations"] == {"boundary": 3, "shape": [64, 8, 8], "dtype": dtype,
                                                      "probe_on_features": False}
    assert plain["strategy"]["cached_activations"] is None
    assert plain["history"][-1]["train_loss"] < plain["history"][0]["train_loss"]  # the top did learn
    a, b = _weights(tmp_path / "cached" / "latest.pdparams"), _weights(tmp_path / "plain" / "latest.pdparams")
    pretrained = _weights(workspace["pretrained"])
    spec = get_spec("mobilenet_v1")
    moved = 0
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=tolerance, atol=tolerance, err_msg=key)
        stage = stage_index(spec, key)
        if stage is not None and stage < 3:  # frozen: weights and BatchNorm statistics bit-identical
            assert np.array_equal(a[key], pretrained[key]), key
        elif stage is not None:
            moved += not np.array_equal(a[key], pretrained[key])
    assert moved  # the top stages trained
    assert [r["eval_top1"] for r in cached["history"]] == [r["eval_top1"] for r in plain["history"]]


@contextlib.contextmanager
def _dynamic_runner(network, input_size, batch_size, device):
    yield dynamic_runner(network)


@pytest.mark.slow
def test_activations_that_do_not_fit_in_memory_fall_back_to_images(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fit, "available_memory", lambda: 1000)
    metrics = train(make_cfg(workspace, tmp_path / "run", *PARTIAL, "Global.epochs=1"))
    assert metrics["strategy"]["cached_activations"] is None
    out = capsys.readouterr().out
    assert "activations not cached: 27 training images x 2 views + 15 others at 64x8x8 need 0.5 MiB, more than " \
           "half the 0.0 MiB available" in out


def test_activations_are_stored_in_half_precision_within_its_rounding(workspace, shared_dir):
    """The default cache (Paddle Inference, float16) holds what the dynamic
    graph computes, to float16's rounding (the benchmark, bench/cached_activations.py,
    measures that accuracy holds)."""
    from paddle_tl.config import load_config
    from paddle_tl.data.datasets import build_dataset
    from paddle_tl.data.transforms import Preprocess, eval_transform
    from paddle_tl.models.heads import build_network
    from paddle_tl.models.split import split
    from paddle_tl.models.weights import load_pretrained

    spec = get_spec("mobilenet_v1")
    network = build_network(spec, 3, {"scale": 0.25}, {"type": "linear"})
    load_pretrained(network, str(shared_dir / "weights" / "mobilenet_v1_x0.25_imagenet.pdparams"), spec.head)
    bottom = split(network, spec, 3)[0]  # what the cache runs
    eval_tf = eval_transform(Preprocess.from_spec(spec, 64))
    images = build_dataset(load_config(None, [f"DataLoader.Train.dataset.root={workspace['train']}"]
                                       ).DataLoader.Train.dataset, "train", eval_tf)
    loader_cfg = load_config(None, ["DataLoader.Eval.num_workers=0"]).DataLoader.Eval
    train_views, _ = feature_cache.cached_activations(network, spec, 3, 64, images, {}, eval_tf, eval_tf, 1,
                                                      loader_cfg, 0, "cpu")
    half = train_views.views[0]
    assert half.dtype == np.float16 and half.shape == (len(images), 64, 8, 8)
    exact = np.concatenate([dynamic_runner(bottom)(paddle.to_tensor(np.stack([images[i][0] for i in range(j, j + 6)])))
                            for j in range(0, len(images), 6)])
    np.testing.assert_allclose(half.astype("float32"), exact, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_shared_caches_compute_higher_cuts_from_a_lower_one_without_the_images(workspace, shared_dir, monkeypatch):
    """Within shared caches, once the activations below stage 3 exist, the
    activations below stage 4 and the features come from them (no second
    pass over the images), equal to what the images give."""
    from paddle_tl.config import load_config
    from paddle_tl.data.datasets import build_dataset
    from paddle_tl.data.transforms import Preprocess, eval_transform
    from paddle_tl.models.heads import build_network
    from paddle_tl.models.weights import load_pretrained

    spec = get_spec("mobilenet_v1")
    network = build_network(spec, 3, {"scale": 0.25}, {"type": "linear"})
    load_pretrained(network, str(shared_dir / "weights" / "mobilenet_v1_x0.25_imagenet.pdparams"), spec.head)
    eval_tf = eval_transform(Preprocess.from_spec(spec, 64))
    images = build_dataset(load_config(None, [f"DataLoader.Train.dataset.root={workspace['train']}"]
                                       ).DataLoader.Train.dataset, "train", eval_tf)
    loader_cfg = load_config(None, ["DataLoader.Eval.num_workers=0"]).DataLoader.Eval

    def features():
        return feature_cache.cached_datasets(network, spec, 64, images, {}, eval_tf, eval_tf, 1, loader_cfg, 0,
                                             "cpu")[0].views[0]

    def activations(boundary):
        return feature_cache.cached_activations(network, spec, boundary, 64, images, {}, eval_tf, eval_tf, 1,
                                                loader_cfg, 0, "cpu", dtype="float32")[0].views[0]

    from_images = features(), activations(4)
    with feature_cache.shared_caches():
        activations(3)

        def no_images(*args, **kwargs):
            raise AssertionError("a second pass over the images")

        monkeypatch.setattr(feature_cache, "_extractor", no_images)
        derived = features(), activations(4)
    for direct, computed in zip(from_images, derived):
        np.testing.assert_allclose(computed, direct, rtol=1e-4, atol=1e-4)


def test_a_subsample_is_served_by_its_parents_rows(workspace, shared_dir, monkeypatch):
    from paddle_tl.config import load_config
    from paddle_tl.data.datasets import build_dataset, subsample
    from paddle_tl.data.transforms import Preprocess, eval_transform
    from paddle_tl.models.heads import build_network

    spec = get_spec("mobilenet_v1")
    network = build_network(spec, 3, {"scale": 0.25}, {"type": "linear"})
    eval_tf = eval_transform(Preprocess.from_spec(spec, 64))
    images = build_dataset(load_config(None, [f"DataLoader.Train.dataset.root={workspace['train']}"]
                                       ).DataLoader.Train.dataset, "train", eval_tf)
    part = subsample(images, 4, seed=0)
    loader_cfg = load_config(None, ["DataLoader.Eval.num_workers=0"]).DataLoader.Eval

    def activations(dataset, boundary):
        return feature_cache.cached_activations(network, spec, boundary, 64, dataset, {}, eval_tf, eval_tf, 1,
                                                loader_cfg, 0, "cpu", dtype="float32")[0].views[0]

    with feature_cache.shared_caches():
        whole = activations(images, 3)
        monkeypatch.setattr(feature_cache, "_extractor", lambda *args: pytest.fail("a pass over the images"))
        np.testing.assert_array_equal(activations(part, 3), whole[part.indices])
        np.testing.assert_allclose(activations(part, 4), activations(images, 4)[part.indices], rtol=1e-5, atol=1e-5)
