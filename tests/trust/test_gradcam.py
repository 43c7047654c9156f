"""Grad-CAM (trust/gradcam.py): the map's range and size, a network left
exactly as it was (parameters, gradients, BatchNorm statistics, modes),
frozen stages, the stage it is taken at, the overlay; and, on the synthetic
shapes, that a trained network's heat map lies on the shape."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from synthetic_shapes import cam_folders, cam_overrides, heat_on_shapes

from paddle_tl import cli
from paddle_tl.config import load_config
from paddle_tl.data.transforms import Preprocess, center_crop, eval_crop_box, resize_short
from paddle_tl.engine import train as train_module
from paddle_tl.engine.train import train
from paddle_tl.models.zoo import build_model, get_spec
from paddle_tl.runtime import import_paddle
from paddle_tl.transfer.freezing import set_frozen_stages
from paddle_tl.trust.gradcam import OverlayWriter, grad_cam, overlay

paddle = import_paddle()

# Measured 3.4 at 224 px (docs/training.md); a heat map blind to the shape scores about 1.
MASS_RATIO_FLOOR = 2.0


def _network(name="mobilenet_v1", **kwargs):
    paddle.seed(0)
    network = build_model(name, 3, **kwargs)
    # BatchNorm statistics of a random batch, so that they are not paddle's 0/1 and any change shows.
    network.train()
    with paddle.no_grad():
        network(paddle.to_tensor(np.random.RandomState(0).uniform(-2, 2, (4, 3, 64, 64)).astype("float32")))
    return network


def _images(count=3, size=64):
    return np.random.RandomState(1).uniform(-2, 2, (count, 3, size, size)).astype("float32")


def _state(network):
    return {name: value.numpy().copy() for name, value in network.state_dict().items()}


def test_map_is_in_zero_one_at_the_input_size_for_each_image():
    network = _network("mobilenet_v1", scale=0.25)
    maps, classes, stage = grad_cam(network, get_spec("mobilenet_v1"), _images(3, 72))
    assert maps.shape == (3, 72, 72) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert all(m.max() == pytest.approx(1.0) for m in maps)  # each image normalised on its own
    assert stage == len(get_spec("mobilenet_v1").stages) - 1 and classes.shape == (3,)
    with paddle.no_grad():
        assert classes.tolist() == network(paddle.to_tensor(_images(3, 72))).numpy().argmax(axis=1).tolist()


def test_batched_maps_equal_one_image_at_a_time():
    network, spec = _network("mobilenet_v1", scale=0.25), get_spec("mobilenet_v1")
    images = _images(3)
    together, _, _ = grad_cam(network, spec, images, [0, 1, 2])
    for i in range(3):
        alone, _, _ = grad_cam(network, spec, images[i:i + 1], i)
        np.testing.assert_allclose(together[i], alone[0], atol=1e-5)


def test_network_is_left_bit_identical_in_training_mode_with_frozen_stages():
    """A network mid-training: train mode, bottom stages frozen (stop_gradient,
    BatchNorm on its stored statistics, so in eval inside a training
    network), a gradient already accumulated on the head."""
    network, spec = _network("mobilenet_v1", scale=0.25), get_spec("mobilenet_v1")
    set_frozen_stages(network, spec, 4, "freeze")
    network.train()
    network(paddle.to_tensor(_images(2))).sum().backward()
    network.sublayers()[3].eval()  # an odd one out: every layer's own flag must come back
    before, head_grad = _state(network), network.fc.weight.grad.numpy().copy()
    flags = [layer.training for layer in network.sublayers()]
    stop = [p.stop_gradient for p in network.parameters()]
    tracer = paddle.base.framework._dygraph_tracer()
    tracer._train_mode = True  # the global mode Layer.train/eval also set (the odd one out's eval cleared it)
    maps, _, _ = grad_cam(network, spec, _images(2))
    assert maps.shape == (2, 64, 64) and 0 <= maps.min() and maps.max() <= 1
    after = _state(network)
    assert all(np.array_equal(before[name], after[name]) for name in before)
    np.testing.assert_array_equal(network.fc.weight.grad.numpy(), head_grad)
    assert [layer.training for layer in network.sublayers()] == flags and network.training
    assert [p.stop_gradient for p in network.parameters()] == stop
    assert tracer._train_mode


def test_a_fully_frozen_network_still_gets_a_map_and_keeps_no_gradient():
    """Every parameter stop_gradient (the head too): paddle records no graph
    below the tapped stage, yet the map is the same as unfrozen."""
    network, spec = _network("mobilenet_v1", scale=0.25), get_spec("mobilenet_v1")
    network.eval()
    images = _images(2)
    free, _, _ = grad_cam(network, spec, images, [0, 2])
    for param in network.parameters():
        param.stop_gradient = True
    frozen, _, _ = grad_cam(network, spec, images, [0, 2])
    np.testing.assert_allclose(frozen, free, atol=1e-6)
    assert all(p.grad is None for p in network.parameters()) and not network.training


@pytest.mark.parametrize("name, kwargs, stage", [
    ("mobilenet_v3_small", {"scale": 0.5}, -2),  # the last stage is the pre-logits Linear after the pool
    ("vgg11", {}, -2),
    ("resnet18", {}, -1),
])
def test_the_map_is_taken_at_the_last_stage_with_a_spatial_output(name, kwargs, stage):
    spec = get_spec(name)
    paddle.seed(0)
    network = build_model(name, 3, **kwargs)
    network.eval()
    size = 64
    maps, _, index = grad_cam(network, spec, _images(1, size), 0)
    assert index == len(spec.stages) + stage and maps.shape == (1, size, size)


def test_out_of_range_class_is_refused():
    with pytest.raises(ValueError, match="out of range for 3 outputs"):
        grad_cam(_network("mobilenet_v1", scale=0.25), get_spec("mobilenet_v1"), _images(1), 3)


def test_crop_box_is_where_the_eval_transform_crops():
    pre = Preprocess(64, 73, (0.5,) * 3, (0.5,) * 3)
    picture = Image.fromarray(np.random.RandomState(0).randint(0, 255, (90, 150, 3), dtype=np.uint8))
    left, top, right, bottom = eval_crop_box(150, 90, pre)
    assert (right - left) == pytest.approx(bottom - top, rel=0.02) and 0 <= left and right <= 150 and bottom <= 90
    by_box = picture.resize((64, 64), Image.BILINEAR, box=(left, top, right, bottom))
    by_transform = center_crop(resize_short(picture, 73), 64)
    # The same region (two resamplings differ a little, a shifted window a lot).
    assert np.abs(np.asarray(by_box, float) - np.asarray(by_transform, float)).mean() < 20


def test_overlay_colours_the_crop_and_dims_the_rest():
    pre = Preprocess(64, 73, (0.5,) * 3, (0.5,) * 3)
    picture = Image.new("RGB", (200, 100), (200, 200, 200))
    heat = np.zeros((64, 64), np.float32)
    heat[:, 32:] = 1.0
    out = np.asarray(overlay(picture, heat, pre)).astype(int)
    assert out.shape == (100, 200, 3)
    assert (out[:, :40] == 80).all()  # outside the crop (x < 50): dimmed
    red = out[50, 140]
    blue = out[50, 60]
    assert red[0] > red[2] and blue[2] > blue[0]  # jet: 1 is red, 0 blue
    whole = np.asarray(overlay(picture, heat)).astype(int)  # no pre: the map covers the picture
    assert whole[50, 5, 2] > whole[50, 5, 0] and whole[50, 195, 0] > whole[50, 195, 2]


def test_overlay_writer_names_files_by_stem(tmp_path, tiny_image_folder):
    network, spec = _network("mobilenet_v1", scale=0.25), get_spec("mobilenet_v1")
    pre = Preprocess(64, 73, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    paths = sorted(tiny_image_folder(per_class=2, size=(80, 60)).rglob("*.*"))
    with OverlayWriter(network, spec, pre, tmp_path / "cams", batch_size=4) as writer:
        for path in paths:
            writer.add(path, 1)
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == sorted(f"{p.stem}_cam.png" for p in paths)
    with Image.open(tmp_path / "cams" / f"{paths[0].stem}_cam.png") as image:
        assert image.size == (80, 60) and image.mode == "RGB"


# ---------------------------------------------------------------- a trained network on the synthetic shapes

@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory, shared_dir):
    base = tmp_path_factory.mktemp("gradcam_shapes")
    weights = shared_dir / "weights" / "mobilenet_v2_imagenet.pdparams"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        patch.setattr(train_module, "write_report", lambda run_dir: run_dir)  # the report is not under test
        metrics = train(load_config(None, cam_overrides(cam_folders(base), base / "run", weights)))
    return base / "run", metrics


@pytest.mark.slow
def test_heat_map_mass_lies_on_the_shape(shapes_run):
    """More than twice the shape's share of the image, on average over the
    30 Eval images; `python bench/gradcam_shapes.py` prints the figures for
    several seeds (docs/training.md)."""
    run, metrics = shapes_run
    assert metrics["final_top1"] >= 0.8, metrics["final_top1"]
    inside, area = heat_on_shapes(run)
    assert inside > MASS_RATIO_FLOOR * area, (inside, area)


# ---------------------------------------------------------------- infer --cam

@pytest.fixture(scope="module")
def exported_run(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("gradcam_export") / "inference"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        assert cli.main(["export", str(trained_run.dir), "--output", str(out)]) == 0
    return out


def _rows(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_infer_cam_writes_one_overlay_per_readable_input_and_the_same_rows(trained_run, exported_run, tmp_path,
                                                                            capsys):
    inputs = tmp_path / "inputs"
    shutil.copytree(trained_run.val, inputs)
    (inputs / "red" / "broken.png").write_bytes(b"not an image")
    assert cli.main(["infer", "--model_dir", str(exported_run), "--input", str(inputs), "--top_k", "2"]) == 0
    plain = _rows(capsys)
    cams = tmp_path / "cams"
    assert cli.main(["infer", "--model_dir", str(exported_run), "--input", str(inputs), "--top_k", "2",
                     "--cam", str(cams), "--batch_size", "5"]) == 0
    assert _rows(capsys) == plain and sum("error" in row for row in plain) == 1
    readable = [Path(row["file"]) for row in plain if "error" not in row]
    # The input folder's sub-folders are kept (here every class has 0.png ... 3.png).
    expected = sorted(f"{p.parent.name}/{p.stem}_cam.png" for p in readable)
    assert sorted(str(p.relative_to(cams)) for p in cams.rglob("*.png")) == expected
    for path in readable:
        with Image.open(cams / path.parent.name / f"{path.stem}_cam.png") as image, Image.open(path) as source:
            assert image.size == source.size and image.mode == "RGB"
    # --run names the checkpoint itself: the same overlays. A list of inputs with the
    # same stems: numbered, not overwritten.
    again = tmp_path / "again"
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{path}\n" for path in readable[:2] + readable[4:6]))
    assert cli.main(["infer", "--model_dir", str(exported_run), "--input", str(listed),
                     "--cam", str(again), "--run", str(trained_run.dir)]) == 0
    assert sorted(p.name for p in again.iterdir()) == ["0_cam.png", "0_cam_2.png", "1_cam.png", "1_cam_2.png"]
    for name, path in (("0_cam.png", readable[0]), ("1_cam_2.png", readable[5])):
        assert np.array_equal(np.asarray(Image.open(again / name)),
                              np.asarray(Image.open(cams / path.parent.name / f"{path.stem}_cam.png")))


@pytest.mark.slow
def test_infer_cam_without_the_checkpoint_is_a_one_line_error(trained_run, exported_run, tmp_path, capsys):
    moved = tmp_path / "inference"
    shutil.copytree(exported_run, moved)
    meta = yaml.safe_load((moved / "inference.yml").read_text())
    meta["exported_from"] = str(tmp_path / "gone" / "best_model")
    (moved / "inference.yml").write_text(yaml.safe_dump(meta))
    cams = tmp_path / "cams"
    assert cli.main(["infer", "--model_dir", str(moved), "--input", str(trained_run.val), "--cam", str(cams)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"error: --cam needs the dynamic network: the checkpoint {moved} was exported from "
        f"({tmp_path / 'gone' / 'best_model'}) is not there; keep the run's best_model next to where it was "
        "exported from, or name its run folder with --run RUN_DIR"]
    assert not _rows(capsys) and not cams.exists()
    # The run folder named with --run instead: it works.
    assert cli.main(["infer", "--model_dir", str(moved), "--input", str(trained_run.val), "--cam", str(cams),
                     "--run", str(trained_run.dir)]) == 0
    assert len(list(cams.rglob("*_cam.png"))) == 12


def test_report_error_grid_blends_the_heat_maps(tmp_path):
    from paddle_tl.engine.report import plot_errors

    pre = Preprocess(64, 73, (0.5,) * 3, (0.5,) * 3)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (96, 80), (120, 120, 120)).save(paths[-1])
    errors = [(str(path), "cat", "dog", 0.9) for path in paths]
    heat = np.zeros((64, 64), np.float32)
    heat[16:48, 16:48] = 1.0
    plot_errors(errors, tmp_path / "plain.png")
    plot_errors(errors, tmp_path / "cam.png", [heat, heat], pre)
    plain, cam = (np.asarray(Image.open(tmp_path / name).convert("RGB"), dtype=int)
                  for name in ("plain.png", "cam.png"))
    assert plain.shape == cam.shape
    def reddish(image):  # jet's 1 blended over grey
        return (image[..., 0] - image[..., 2] > 40).sum()
    assert reddish(cam) > 100 and reddish(plain) == 0
