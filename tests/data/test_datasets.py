import logging
import os
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from paddle_tl.config import AugmentConfig, DatasetConfig
from paddle_tl.data.datasets import ClassificationDataset, build_dataset, load_rgb, split_validation
from paddle_tl.data.loaders import loader_settings, make_loader
from paddle_tl.data.transforms import Preprocess, TrainTransform, eval_transform
from paddle_tl.errors import DataError

PRE = Preprocess(32, 36, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def folder_config(root):
    return DatasetConfig(name="ImageFolder", root=str(root))


def noise_jpeg(path, size=(64, 64)):
    data = np.random.RandomState(1).randint(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(data).save(path, quality=90)


# ---------------------------------------------------------------- load_rgb

def test_greyscale_becomes_rgb(tmp_path):
    Image.new("L", (5, 4), 77).save(tmp_path / "grey.png")
    image = load_rgb(tmp_path / "grey.png")
    assert image.mode == "RGB" and image.size == (5, 4)
    assert np.all(np.asarray(image) == 77)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    pixels = np.asarray(load_rgb(tmp_path / "deep.png"))
    assert pixels.shape == (1, 3, 3)
    assert list(pixels[0, :, 0]) == [0, 128, 255]


def test_16_bit_scaling_is_exact_for_every_value(tmp_path):
    """Every 16-bit value maps where rounding v * 255 / 65535 in float64 put it
    (the integer arithmetic that replaced it changes no pixel)."""
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(values).save(tmp_path / "all.png")
    expected = np.round(values.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "all.png"))[..., 0], expected)


def test_16_bit_png_decodes_without_whole_image_float_arrays(tmp_path):
    """A large 16-bit PNG (a 9400 x 9400 one took 2.5 GB through float64
    arrays): the arrays allocated besides the 16- and 8-bit pixels stay small."""
    side = 1500
    Image.fromarray(np.full((side, side), 40000, np.uint16)).save(tmp_path / "deep.png")
    tracemalloc.start()
    try:
        image = load_rgb(tmp_path / "deep.png")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image.getpixel((0, 0)) == (156, 156, 156)
    # Measured: 18 bytes a pixel through float64, 6.7 now (Pillow's copies of the 16-bit bytes, the 8-bit array).
    assert peak < 10 * side * side, f"{peak / side / side:.1f} bytes a pixel"


def test_float_image_in_unit_range_is_scaled(tmp_path):
    Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32)).save(tmp_path / "float.tif")
    assert list(np.asarray(load_rgb(tmp_path / "float.tif"))[0, :, 1]) == [0, 64, 255]


def test_palette_gif_transparency_goes_on_white(tmp_path):
    image = Image.new("P", (4, 2), 0)
    image.putpalette([10, 200, 30, 255, 0, 0] + [0] * 762)
    image.paste(1, (2, 0, 4, 2))  # right half opaque red, left half transparent index 0
    image.save(tmp_path / "clear.gif", transparency=0)
    pixels = np.asarray(load_rgb(tmp_path / "clear.gif"))
    assert np.all(pixels[:, :2] == 255)
    assert np.all(pixels[:, 2:] == [255, 0, 0])


def test_la_alpha_goes_on_white(tmp_path):
    Image.new("LA", (3, 3), (20, 0)).save(tmp_path / "la.png")
    assert np.all(np.asarray(load_rgb(tmp_path / "la.png")) == 255)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "print.jpg", quality=95)
    pixels = np.asarray(load_rgb(tmp_path / "print.jpg")).astype(int)
    assert np.abs(pixels - [255, 0, 0]).max() <= 8


def test_one_pixel_image(tmp_path):
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "dot.png")
    image = load_rgb(tmp_path / "dot.png")
    assert image.size == (1, 1) and image.getpixel((0, 0)) == (1, 2, 3)
    assert eval_transform(PRE)(image).shape == (3, 32, 32)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: stored landscape, shown portrait
    Image.new("RGB", (40, 20)).save(tmp_path / "phone.jpg", exif=exif)
    assert load_rgb(tmp_path / "phone.jpg").size == (20, 40)


def test_training_decodes_large_jpegs_reduced_and_evaluation_in_full(tmp_path):
    """Training augmentation lets a large JPEG decode at 1/8 size (both
    decodes show the same view, to resampling error); evaluation decodes
    every pixel, as inference does."""
    y, x = np.mgrid[0:1024, 0:1024] / 1024.0
    smooth = np.stack([255 * x, 255 * y, 127 + 100 * np.sin(6 * x + 4 * y)], axis=-1).astype(np.uint8)
    (tmp_path / "data" / "a").mkdir(parents=True)
    Image.fromarray(smooth).save(tmp_path / "data" / "a" / "big.jpg", quality=95)
    (tmp_path / "data" / "b").mkdir()  # a classifier needs two classes
    Image.fromarray(smooth[:64, :64]).save(tmp_path / "data" / "b" / "small.jpg")
    path = tmp_path / "data" / "a" / "big.jpg"
    pre = Preprocess(64, 73, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    augment = TrainTransform(pre, AugmentConfig(crop_scale=[1.0, 1.0], hflip=False))  # a square's only crop: all of it

    assert load_rgb(path, augment.draft_size).size == (128, 128) and load_rgb(path).size == (1024, 1024)
    dataset = build_dataset(folder_config(tmp_path / "data"), "train", augment)
    reduced, full = dataset[0][0], augment(load_rgb(path))
    assert reduced.shape == full.shape == (3, 64, 64)
    assert 0 < np.abs(reduced - full).max() < 0.1  # decoded differently, the same view

    dataset.transform = eval_transform(pre)
    assert np.array_equal(dataset[0][0], eval_transform(pre)(load_rgb(path)))


def test_unreadable_file_names_itself(tmp_path):
    (tmp_path / "note.jpg").write_text("not an image")
    with pytest.raises(DataError, match="note.jpg"):
        load_rgb(tmp_path / "note.jpg")


# ---------------------------------------------------------------- ImageFolder

def test_image_folder_builds(tiny_image_folder):
    root = tiny_image_folder()
    dataset = build_dataset(folder_config(root), "train", eval_transform(PRE))
    assert dataset.class_names == ["cat", "dog", "fox"]
    assert dataset.class_counts() == [6, 6, 6] and len(dataset) == 18
    assert dataset.skipped == []
    image, label = dataset[7]
    assert image.shape == (3, 32, 32) and image.dtype == np.float32
    assert label.shape == (1,) and label.dtype == np.int64 and label[0] == 1


def test_image_folder_walks_subfolders_and_ignores_the_rest(tiny_image_folder):
    root = tiny_image_folder()
    nested = root / "cat" / "more" / "deeper"
    nested.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(nested / "UPPER.PNG")
    Image.new("RGB", (8, 8)).save(root / "cat" / ".hidden.png")
    (root / "cat" / "notes.txt").write_text("a cat")
    (root / ".ipynb_checkpoints").mkdir()
    os.symlink(root / "cat", root / "cat" / "more" / "loop")  # a cycle must not hang the walk
    dataset = build_dataset(folder_config(root), "train", None)
    assert dataset.class_names == ["cat", "dog", "fox"]
    assert dataset.class_counts() == [7, 6, 6]


def test_unreadable_images_are_skipped_and_reported(tiny_image_folder, caplog):
    root = tiny_image_folder()
    noise_jpeg(root / "dog" / "whole.jpg")
    data = (root / "dog" / "whole.jpg").read_bytes()
    (root / "dog" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "fox" / "empty.png").write_bytes(b"")
    (root / "fox" / "text.jpg").write_text("this is not a JPEG")
    with caplog.at_level(logging.WARNING, logger="paddle_tl"):
        dataset = build_dataset(folder_config(root), "train", None)
    skipped = sorted(os.path.basename(path) for path, _ in dataset.skipped)
    assert skipped == ["empty.png", "text.jpg", "truncated.jpg"]
    assert dataset.class_counts() == [6, 7, 6]
    for name in skipped:
        assert name in caplog.text
    assert "skipped 3 unreadable of 22 images" in caplog.text


def test_class_with_only_unreadable_images_refused(tiny_image_folder):
    root = tiny_image_folder()
    (root / "broken").mkdir()
    (root / "broken" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="broken"):
        build_dataset(folder_config(root), "train", None)


def test_empty_class_folder_refused(tiny_image_folder):
    root = tiny_image_folder()
    (root / "owl").mkdir()
    (root / "owl" / "readme.txt").write_text("no images yet")
    with pytest.raises(DataError, match="class folder .*owl has no images"):
        build_dataset(folder_config(root), "train", None)


def test_a_single_class_folder_is_refused_before_decoding(tiny_image_folder, monkeypatch):
    root = tiny_image_folder(classes=("cat",))
    monkeypatch.setattr("paddle_tl.data.datasets._drop_unreadable", lambda samples: pytest.fail("decoded"))
    with pytest.raises(DataError, match=rf"ImageFolder {root}: only one class found \('cat'\)") as caught:
        build_dataset(folder_config(root), "train", None)
    assert "\n" not in str(caught.value)


def test_a_single_class_is_fine_to_evaluate(tiny_image_folder):
    root = tiny_image_folder(classes=("cat",))
    assert build_dataset(folder_config(root), "eval", None, class_names=["cat", "dog"]).class_counts() == [6, 0]


def test_single_class_training_folder_is_one_line_from_the_cli(tiny_image_folder, tmp_path, capsys):
    from paddle_tl import cli
    root = tiny_image_folder(classes=("cat",))
    config = tmp_path / "one_class.yaml"
    config.write_text(f"DataLoader:\n  Train:\n    dataset: {{name: ImageFolder, root: {root}}}\n"
                      f"  Eval:\n    dataset: {{name: ImageFolder, root: {root}}}\n")
    code = cli.main(["train", "-c", str(config), "-o", f"Global.output_dir={tmp_path / 'run'}",
                     "-o", "Arch.pretrained=false", "-o", "Transfer.strategy=auto", "-o", "Global.device=cpu"])
    stderr = capsys.readouterr().err
    assert code == 2
    assert stderr.strip().splitlines()[-1] == (f"error: ImageFolder {root}: only one class found ('cat'); "
                                               "a classifier needs at least two")
    assert "Traceback" not in stderr


@pytest.mark.parametrize("layout", ["missing", "file", "no_class_folders"])
def test_bad_root_refused(tmp_path, layout):
    root = tmp_path / "root"
    if layout == "file":
        root.write_text("")
    elif layout == "no_class_folders":
        root.mkdir()
        Image.new("RGB", (8, 8)).save(root / "loose.png")
    with pytest.raises(DataError, match="root"):
        build_dataset(folder_config(root), "train", None)


def test_root_one_level_too_high_is_flagged(tiny_image_folder, caplog):
    root = tiny_image_folder(classes=("train", "val"), per_class=1)
    with caplog.at_level(logging.WARNING, logger="paddle_tl"):
        build_dataset(folder_config(root), "train", None)
    assert "look like splits" in caplog.text


def test_eval_labels_follow_the_training_classes(tiny_image_folder, caplog):
    train = build_dataset(folder_config(tiny_image_folder("train")), "train", None)
    val_root = tiny_image_folder("val", classes=("dog", "fox"), per_class=2)
    with caplog.at_level(logging.WARNING, logger="paddle_tl"):
        val = build_dataset(folder_config(val_root), "eval", None, class_names=train.class_names)
    assert val.class_names == ["cat", "dog", "fox"]
    assert val.class_counts() == [0, 2, 2]
    assert [label for _, label in val.samples] == [1, 1, 2, 2]
    assert "cat" in caplog.text


def test_eval_class_unknown_to_training_refused(tiny_image_folder):
    train = build_dataset(folder_config(tiny_image_folder("train", classes=("cat", "dog"))), "train", None)
    val_root = tiny_image_folder("val", classes=("cat", "dog", "emu"), per_class=1)
    with pytest.raises(DataError, match=r"\['emu'\].*\['cat', 'dog', 'emu'\].*\['cat', 'dog'\]"):
        build_dataset(folder_config(val_root), "eval", None, class_names=train.class_names)


def test_loader_with_workers_yields_batches(tiny_image_folder):
    dataset = build_dataset(folder_config(tiny_image_folder()), "train", eval_transform(PRE))
    loader = make_loader(dataset, batch_size=4, shuffle=True, num_workers=2, drop_last=True)
    batches = list(loader)
    assert len(batches) == 4
    images, labels = batches[0]
    assert images.shape == [4, 3, 32, 32] and str(images.dtype) == "paddle.float32"
    assert labels.shape == [4, 1] and str(labels.dtype) == "paddle.int64"


# ---------------------------------------------------------------- ListFile

@pytest.fixture
def listed(tmp_path):
    """Six images in 'my images/' (a space in the path) and a writer of list files."""
    folder = tmp_path / "my images"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (10, 10), (40 * i, 0, 0)).save(folder / f"img {i}.png")

    def write(lines, name="list.txt"):
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n")
        return path

    return write


def list_config(list_file, **kwargs):
    return DatasetConfig(name="ListFile", list_file=str(list_file), **kwargs)


def test_list_file_builds_with_default_names(listed):
    path = listed(["my images/img 0.png 0", "", "my images/img 1.png 1", "my images/img 2.png  2 "])
    dataset = build_dataset(list_config(path), "train", None)
    assert dataset.class_names == ["0", "1", "2"]
    assert dataset.samples[0] == (str(path.parent / "my images" / "img 0.png"), 0)
    assert dataset.class_counts() == [1, 1, 1]


def test_list_file_paths_relative_to_root(listed, tmp_path):
    path = listed(["img 0.png 0", "img 1.png 1"], name="elsewhere.txt")
    dataset = build_dataset(list_config(path, root=str(tmp_path / "my images")), "train", None)
    assert len(dataset) == 2


@pytest.mark.parametrize("names_text", ["ant\nbee\n", "0 ant\n1 bee\n", "1 bee\n0 ant\n"])
def test_label_names_file_formats(listed, tmp_path, names_text):
    (tmp_path / "names.txt").write_text(names_text)
    path = listed(["my images/img 0.png 0", "my images/img 1.png 1", "my images/img 2.png 1"])
    dataset = build_dataset(list_config(path, label_names_file=str(tmp_path / "names.txt")), "train", None)
    assert dataset.class_names == ["ant", "bee"]
    assert dataset.class_counts() == [1, 2]


@pytest.mark.parametrize("bad_line, problem", [
    ("my images/img 1.png one", "not an integer"),
    ("my images/img 1.png 2", "out of range"),
    ("my images/img 1.png -1", "out of range"),
    ("my images/img 9.png 1", "does not exist"),
    ("lonely", "expected 'path label'"),
])
def test_bad_list_line_refused_naming_file_and_line(listed, tmp_path, bad_line, problem):
    (tmp_path / "names.txt").write_text("ant\nbee\n")
    path = listed(["my images/img 0.png 0", "", bad_line])
    with pytest.raises(DataError, match=rf"list.txt:3: .*{problem}"):
        build_dataset(list_config(path, label_names_file=str(tmp_path / "names.txt")), "train", None)


def test_a_list_file_naming_one_image_under_two_labels_is_refused(listed):
    path = listed(["my images/img 0.png 0", "my images/img 1.png 1", "my images/img 0.png 1"])
    with pytest.raises(DataError, match=r"list file .*list.txt: 1 images are filed under more than one class .*"
                                        r"1 under '0' and '1'"):
        build_dataset(list_config(path), "train", None)
    # the same image listed twice under one label is left as written (repeating a line may be meant)
    path = listed(["my images/img 0.png 0", "my images/img 1.png 1", "my images/img 0.png 0"], name="again.txt")
    assert build_dataset(list_config(path), "train", None).class_counts() == [2, 1]


def test_class_without_samples_refused_for_training(listed):
    path = listed(["my images/img 0.png 0", "my images/img 1.png 2"])
    with pytest.raises(DataError, match=r"\['1'\]"):
        build_dataset(list_config(path), "train", None)


@pytest.mark.parametrize("names_text", [None, "ant\n"])
def test_a_single_class_list_is_refused(listed, tmp_path, names_text):
    kwargs = {}
    if names_text is not None:
        (tmp_path / "names.txt").write_text(names_text)
        kwargs["label_names_file"] = str(tmp_path / "names.txt")
    path = listed(["my images/img 0.png 0", "my images/img 1.png 0"])
    name = "0" if names_text is None else "ant"
    with pytest.raises(DataError, match=rf"list file {path}: only one class found \('{name}'\)"):
        build_dataset(list_config(path, **kwargs), "train", None)


def test_eval_list_names_are_mapped_to_training_indices(listed, tmp_path):
    (tmp_path / "val_names.txt").write_text("bee\n")
    path = listed(["my images/img 0.png 0"], name="val.txt")
    config = list_config(path, label_names_file=str(tmp_path / "val_names.txt"))
    dataset = build_dataset(config, "eval", None, class_names=["ant", "bee"])
    assert dataset.samples[0][1] == 1


def test_eval_list_uses_the_training_class_names(listed):
    path = listed(["my images/img 0.png 1"], name="val.txt")
    dataset = build_dataset(list_config(path), "eval", None, class_names=["ant", "bee"])
    assert dataset.class_names == ["ant", "bee"]
    assert dataset.samples[0][1] == 1


# ---------------------------------------------------------------- elpv

@pytest.fixture
def elpv():
    pytest.importorskip("elpv_dataset", reason="elpv-dataset is not installed (the `demo` extra)")
    from paddle_tl.data.datasets import _elpv  # the listing without the image scan keeps these tests fast

    def listing(split, **kwargs):
        samples, names = _elpv(DatasetConfig(name="elpv", **kwargs), split)
        return samples, names

    return listing


def test_elpv_split_is_deterministic_disjoint_and_complete(elpv):
    train, names = elpv("train")
    evals, _ = elpv("eval")
    assert names == ["functional", "possibly_defective", "likely_defective", "defective"]
    assert len(train) + len(evals) == 2624
    assert not {p for p, _ in train} & {p for p, _ in evals}
    assert elpv("eval")[0] == evals
    assert elpv("eval", split_seed=1)[0] != evals


def test_elpv_split_is_stratified(elpv):
    train, _ = elpv("train", eval_fraction=0.3)
    evals, _ = elpv("eval", eval_fraction=0.3)
    for label in range(4):
        n_eval = sum(1 for _, y in evals if y == label)
        n_all = n_eval + sum(1 for _, y in train if y == label)
        assert abs(n_eval - 0.3 * n_all) <= 1


def test_elpv_binary_mode(elpv):
    samples = elpv("train", label_mode="binary")[0] + elpv("eval", label_mode="binary")[0]
    assert elpv("train", label_mode="binary")[1] == ["functional", "defective"]
    assert np.bincount([y for _, y in samples]).tolist() == [1803, 821]


def test_elpv_cell_type_filter(elpv):
    def total(cell_type):
        return sum(len(elpv(split, cell_type=cell_type)[0]) for split in ("train", "eval"))

    assert (total("mono"), total("poly")) == (1074, 1550)
    mono_eval = {p for p, _ in elpv("eval", cell_type="mono")[0]}
    assert mono_eval <= {p for p, _ in elpv("eval")[0]}  # a filter does not reshuffle the split


def test_elpv_builds_and_scans(elpv):
    dataset = build_dataset(DatasetConfig(name="elpv", eval_fraction=0.05), "eval", eval_transform(PRE))
    assert len(dataset) == len(elpv("eval", eval_fraction=0.05)[0]) and dataset.skipped == []
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and label.dtype == np.int64


# ---------------------------------------------------------------- shared data

def test_hymenoptera(shared_dir):
    root = shared_dir / "datasets" / "hymenoptera"
    train = build_dataset(folder_config(root / "train"), "train", eval_transform(PRE))
    val = build_dataset(folder_config(root / "val"), "eval", eval_transform(PRE), class_names=train.class_names)
    assert train.class_names == ["ants", "bees"]
    assert train.class_counts() == [124, 121] and val.class_counts() == [70, 83]
    assert train[0][0].shape == (3, 32, 32)


def test_missing_root_names_the_config_key():
    from paddle_tl.config import load_config

    cfg = load_config(None, [])
    with pytest.raises(DataError, match=r"DataLoader\.Eval\.dataset\.root: required for the ImageFolder dataset"):
        build_dataset(cfg.DataLoader.Eval.dataset, "eval", transform=None)


def _folder_cfg(root):
    return DatasetConfig(name="ImageFolder", root=str(root))


def test_symlink_loop_in_the_data_folder_is_skipped(tiny_image_folder, tmp_path, caplog):
    root = tiny_image_folder(per_class=2)
    os.symlink(root, root / "cat" / "loop")  # cat/loop -> root -> cat -> ...; and dog, fox filed as cat
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (20, 20), (9, 9, 9)).save(elsewhere / "linked.png")
    os.symlink(elsewhere, root / "dog" / "more")  # an ordinary link to images kept elsewhere
    with caplog.at_level(logging.WARNING, logger="paddle_tl"):
        dataset = build_dataset(_folder_cfg(root), "train", transform=None)
    assert dataset.class_counts() == [2, 3, 2]
    assert "cat/loop" in caplog.text and "links back" in caplog.text


def test_a_link_from_one_class_folder_into_another_is_refused_before_decoding(tiny_image_folder, monkeypatch):
    """cat/todog -> ../dog filed every dog also as a cat, silently."""
    root = tiny_image_folder()
    os.symlink("../dog", root / "cat" / "todog")
    monkeypatch.setattr("paddle_tl.data.datasets._drop_unreadable", lambda samples: pytest.fail("decoded"))
    for side, class_names in (("train", None), ("eval", ["cat", "dog", "fox"])):
        with pytest.raises(DataError) as caught:
            build_dataset(_folder_cfg(root), side, None, class_names=class_names)
        assert str(caught.value) == (
            f"ImageFolder {root}: 6 images are filed under more than one class (by their real path): 6 under "
            f"'cat' and 'dog', e.g. {root}/cat/todog/dog_0.png is {root}/dog/dog_0.png; an image needs one "
            "class: remove the link or the copy under the wrong class")


def test_a_link_between_class_folders_is_one_line_from_the_cli(tiny_image_folder, tmp_path, capsys):
    from paddle_tl import cli
    root = tiny_image_folder()
    os.symlink("../dog", root / "cat" / "todog")
    config = tmp_path / "linked.yaml"
    config.write_text(f"DataLoader:\n  Train:\n    dataset: {{name: ImageFolder, root: {root}}}\n"
                      f"  Eval:\n    dataset: {{name: ImageFolder, root: {root}}}\n")
    code = cli.main(["train", "-c", str(config), "-o", f"Global.output_dir={tmp_path / 'run'}",
                     "-o", "Arch.pretrained=false", "-o", "Transfer.strategy=auto", "-o", "Global.device=cpu"])
    stderr = capsys.readouterr().err
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"error: ImageFolder {root}: 6 images are filed under more "
                                                      "than one class")
    # Refused before anything is written (an empty run folder is left, as for every data refusal).
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_two_classes_linking_one_file_kept_elsewhere_are_refused(tiny_image_folder, tmp_path):
    root = tiny_image_folder()
    pool = tmp_path / "pool"
    pool.mkdir()
    Image.new("RGB", (20, 20), (5, 6, 7)).save(pool / "shared.png")
    os.symlink(pool / "shared.png", root / "dog" / "a.png")
    os.symlink(pool / "shared.png", root / "fox" / "b.png")
    with pytest.raises(DataError, match=rf"1 images .* 1 under 'dog' and 'fox', e\.g\. {root}/dog/a\.png and "
                                        rf"{root}/fox/b\.png are both {pool}/shared\.png;"):
        build_dataset(_folder_cfg(root), "train", None)


def test_ordinary_links_keep_their_class_and_the_order(tiny_image_folder, tmp_path):
    """A class folder that is a link, an image that is a link, a folder of
    images linked in: one label each, in the order of the plain folder."""
    root = tiny_image_folder()
    plain = build_dataset(_folder_cfg(root), "train", None).samples
    assert plain == [(str(root / name / f"{name}_{i}.{'png' if i % 2 == 0 else 'jpg'}"), label)
                     for label, name in enumerate(["cat", "dog", "fox"]) for i in range(6)]
    elsewhere = tmp_path / "elsewhere"
    (root / "fox").rename(elsewhere)
    os.symlink(elsewhere, root / "fox")  # the class folder itself
    Image.new("RGB", (20, 20), (1, 1, 1)).save(tmp_path / "single.png")
    os.symlink(tmp_path / "single.png", root / "dog" / "zz_linked.png")  # one image
    linked = build_dataset(_folder_cfg(root), "train", None)
    assert linked.samples == plain[:12] + [(str(root / "dog" / "zz_linked.png"), 1)] + plain[12:]


def test_the_same_file_twice_in_one_class_counts_once(tiny_image_folder, caplog):
    root = tiny_image_folder()
    os.symlink("cat_3.jpg", root / "cat" / "again.jpg")
    (root / "cat" / "sub").mkdir()
    os.symlink("../cat_4.png", root / "cat" / "sub" / "deeper.png")
    with caplog.at_level(logging.WARNING, logger="paddle_tl"):
        dataset = build_dataset(_folder_cfg(root), "train", None)
    assert dataset.class_counts() == [6, 6, 6]
    # the first path in the walk's order stands for the file
    assert [os.path.basename(path) for path, label in dataset.samples if label == 0] == [
        "again.jpg", "cat_0.png", "cat_1.jpg", "cat_2.png", "cat_4.png", "cat_5.jpg"]
    assert f"class folder {root / 'cat'}: 2 images reached a second time through symbolic links" in caplog.text


def test_non_utf8_file_name_loads(tiny_image_folder):
    root = tiny_image_folder(per_class=2)
    name = os.fsencode(str(root / "dog")) + b"/caf\xe9-latin1.png"  # not valid UTF-8
    Image.new("RGB", (20, 20), (1, 2, 3)).save(os.fsdecode(name), format="PNG")
    dataset = build_dataset(_folder_cfg(root), "train", transform=None)
    assert os.fsdecode(name) in [path for path, _ in dataset.samples] and not dataset.skipped


def test_decompression_bomb_is_skipped_not_decoded(tiny_image_folder, monkeypatch):
    root = tiny_image_folder(per_class=2)
    Image.new("RGB", (400, 400)).save(root / "fox" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400 * 400 // 3)  # > 2x the limit: PIL refuses it
    dataset = build_dataset(_folder_cfg(root), "train", transform=None)
    assert [path for path, _ in dataset.skipped] == [str(root / "fox" / "huge.png")]


# ---------------------------------------------------------------- loader settings

GB = 1 << 30


@pytest.mark.parametrize("device, cores, processes, workers", [
    ("cpu", 2, 1, 2), ("cpu", 64, 1, 2),  # CPU: the model needs the cores; 2 as before "auto"
    ("gpu", 16, 1, 8), ("gpu", 64, 1, 8),  # capped
    ("gpu", 4, 1, 3),  # one core left to the training process
    ("gpu", 1, 1, 1),  # but at least one worker
    ("gpu", 16, 4, 3),  # 4 data-parallel processes share the 16 cores
])
def test_auto_workers_follow_the_device_and_the_cores(device, cores, processes, workers):
    assert loader_settings("auto", device, cores, processes, shm_free=2 * GB) == {
        "num_workers": workers, "use_shared_memory": True}


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_a_worker_count_is_used_as_given(device):
    assert loader_settings(5, device, cores=2)["num_workers"] == 5
    assert loader_settings(0, device, cores=16, shm_free=2 * GB) == {"num_workers": 0, "use_shared_memory": False}


def test_small_shared_memory_hands_batches_over_through_pipes():
    assert not loader_settings("auto", "gpu", 16, shm_free=64 << 20)["use_shared_memory"]  # a container's 64 MB
    assert loader_settings("auto", "gpu", 16, shm_free=2 * GB)["use_shared_memory"]


def test_make_loader_resolves_auto_for_the_current_device(tiny_image_folder):
    from paddle_tl.runtime import import_paddle
    if import_paddle().device.get_device() != "cpu":
        pytest.skip("paddle runs on a GPU here")
    dataset = build_dataset(folder_config(tiny_image_folder()), "train", eval_transform(PRE))
    loader = make_loader(dataset, 4, shuffle=False, num_workers="auto")
    assert loader.num_workers == 2
    assert len(list(loader)) == 5  # 18 images in batches of 4


def _labelled(counts):
    samples = [(f"c{c}/{i}.png", c) for c, n in enumerate(counts) for i in range(n)]
    return ClassificationDataset(samples, [f"c{c}" for c in range(len(counts))], transform="train")


def test_validation_split_is_stratified_disjoint_and_reproducible():
    dataset = _labelled([40, 21, 5, 1])
    train, val = split_validation(dataset, 0.1, seed=7, transform="eval")
    assert val.class_counts() == [4, 2, 1, 0]  # round(n x 0.1), a lone image stays in training
    assert train.class_counts() == [36, 19, 4, 1]
    assert set(train.samples).isdisjoint(val.samples) and set(train.samples) | set(val.samples) == set(dataset.samples)
    assert train.transform == "train" and val.transform == "eval"
    assert split_validation(dataset, 0.1, seed=7, transform="eval")[1].samples == val.samples
    assert split_validation(dataset, 0.1, seed=8, transform="eval")[1].samples != val.samples
    assert [s for s in dataset.samples if s in set(val.samples)] == val.samples  # the dataset's order kept


def test_validation_split_keeps_one_image_per_class_to_train_on():
    train, val = split_validation(_labelled([2, 2]), 0.9, seed=0, transform=None)
    assert train.class_counts() == [1, 1] and val.class_counts() == [1, 1]


def test_subsample_keeps_at_most_per_class_seeded_and_knows_its_rows():
    from paddle_tl.data.datasets import ClassificationDataset, subsample
    samples = [(f"{i}.png", i % 3 if i < 30 else 0) for i in range(40)]  # class 0: 20, 1 and 2: 10 each
    dataset = ClassificationDataset(samples, ["a", "b", "c"], None)
    part = subsample(dataset, 12, seed=0)
    assert sorted(part.class_counts()) == [10, 10, 12]
    assert [dataset.samples[i] for i in part.indices] == part.samples and part.parent is dataset
    assert subsample(dataset, 12, seed=0).samples == part.samples != subsample(dataset, 12, seed=1).samples
    assert subsample(dataset, 20, seed=0) is dataset  # nothing to drop
