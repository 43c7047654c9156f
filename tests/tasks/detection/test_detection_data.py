"""Detection readers (paddle_tl/tasks/detection/data.py) and the data check
(check.py): well-formed VOC and COCO data read back exactly, and each kind
of malformed input refused, repaired or left out with one line naming the
file (and the box)."""

import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from paddle_tl.errors import DataError
from paddle_tl.tasks.detection.check import check_voc, format_table
from paddle_tl.tasks.detection.data import check_voc_root, read_coco, read_voc
from synthetic_detection import CLASSES, coco_json, make_images, voc_xml, write_coco, write_voc


def refusal(call, *args, **kwargs):
    """The DataError message of a call that must be refused, checked to be one line."""
    with pytest.raises(DataError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def voc(tmp_path):
    """A VOC folder: 8 train images (every 4th without objects, every 2nd
    object difficult) and 4 val images, as written."""
    root = tmp_path / "voc"
    written = write_voc(root, {"train": 8, "val": 4}, seed=1, empty_every=4, difficult_every=2)
    return root, written


def one_image_voc(root, objects, size=(50, 40), image=True):
    """A VOC folder of one image `a` (size width x height) with `objects`
    (name, (xmin, ymin, xmax, ymax), difficult) as written; split `train`."""
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    if image:
        Image.new("RGB", size, (90, 30, 160)).save(root / "JPEGImages" / "a.jpg")
    (root / "Annotations" / "a.xml").write_text(voc_xml("a.jpg", size, objects))
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    return root


# ---------------------------------------------------------------- well-formed

def test_voc_reads_back_what_was_written(voc):
    root, written = voc
    train = read_voc(root, "train")
    present = sorted({CLASSES[label] for image in written["train"] for label in image["labels"]})
    assert train.class_names == present
    assert len(train) == 8
    for sample, image in zip(train.samples, written["train"]):
        assert sample.image == str(root / "JPEGImages" / f"{image['id']}.jpg")
        assert sample.size == (96, 72)
        np.testing.assert_array_equal(sample.boxes, image["boxes"])  # 1-based corners converted back exactly
        assert sample.boxes.dtype == np.float32 and sample.labels.dtype == np.int64
        assert [train.class_names[label] for label in sample.labels] == [CLASSES[label] for label in image["labels"]]
        np.testing.assert_array_equal(sample.difficult, image["difficult"])
    summary = train.summary()
    assert summary["images_without_objects"] == 2 and [len(s) for s in train.samples][3] == 0
    assert summary["difficult"] == sum(int(image["difficult"].sum()) for image in written["train"]) > 0
    assert sum(summary["objects_per_class"].values()) == sum(len(image["labels"]) for image in written["train"])

    evaluation = read_voc(root, "val", class_names=train.class_names)
    assert len(evaluation) == 4 and evaluation.class_names == train.class_names


def test_voc_corners_become_continuous_pixels(tmp_path):
    # A box over every pixel of the 50 x 40 image (1-based, inclusive) is the whole image.
    root = one_image_voc(tmp_path / "v", [("cat", (1, 1, 50, 40), 0), ("cat", (11, 21, 11, 21), 0)])
    sample = read_voc(root, "train").samples[0]
    np.testing.assert_array_equal(sample.boxes, [[0, 0, 50, 40], [10, 20, 11, 21]])  # one pixel is 1 x 1
    assert read_voc(root, "train").issues.clipped == []


def test_dataset_item_is_the_decoded_image_and_its_target(voc):
    root, written = voc
    train = read_voc(root, "train", transform=lambda image, target: (image.size, target))
    size, target = train[0]
    assert size == (96, 72)
    np.testing.assert_array_equal(target["boxes"], written["train"][0]["boxes"])
    assert set(target) == {"boxes", "labels", "difficult", "iscrowd"}


def test_coco_reads_back_what_was_written(tmp_path):
    images_dir, path, written = write_coco(tmp_path / "coco", 6, seed=2, empty_every=3)
    data = json.loads(path.read_text())
    data["annotations"][0]["iscrowd"] = 1
    path.write_text(json.dumps(data))
    dataset = read_coco(images_dir, path)
    assert dataset.class_names == list(CLASSES)  # categories in id order
    assert len(dataset) == 6 and dataset.summary()["images_without_objects"] == 2
    for sample, image in zip(dataset.samples, written):
        np.testing.assert_allclose(sample.boxes, image["boxes"])
        np.testing.assert_array_equal(sample.labels, image["labels"])
        assert sample.segmentations == [[polygon] for polygon in image["polygons"]]  # as in the json
        assert not sample.difficult.any()
    assert dataset.samples[0].iscrowd.tolist()[0] is True
    assert dataset.summary()["crowd"] == 1


def test_coco_class_names_follow_category_ids_not_file_order(tmp_path):
    images = make_images(3, seed=4)
    for image in images:
        image["image"].save(tmp_path / f"{image['id']}.png")
    data = coco_json(images, (96, 72), category_ids=[9, 2, 5])  # ellipse 9, rectangle 2, triangle 5
    (tmp_path / "a.json").write_text(json.dumps(data))
    dataset = read_coco(tmp_path, tmp_path / "a.json")
    assert dataset.class_names == ["rectangle", "triangle", "ellipse"]
    by_name = [CLASSES[label] for label in images[0]["labels"]]
    assert [dataset.class_names[label] for label in dataset.samples[0].labels] == by_name
    # Given names (the training set's) re-index the labels.
    given = read_coco(tmp_path, tmp_path / "a.json", class_names=["triangle", "rectangle", "ellipse", "star"])
    assert [given.class_names[label] for label in given.samples[0].labels] == by_name


# ---------------------------------------------------------------- malformed VOC

def test_bad_xml_is_one_line_naming_the_file(voc):
    root, _ = voc
    bad = root / "Annotations" / "train_img_002.xml"
    bad.write_text("<annotation><object><name>cat</name>")
    assert refusal(read_voc, root, "train").startswith(f"{bad}: not readable as XML")


def test_box_outside_the_image_is_clipped_and_counted(tmp_path, caplog):
    root = one_image_voc(tmp_path / "v", [("cat", (-9, 5, 30, 55), 0), ("cat", (45, 30, 70, 40), 0),
                                          ("cat", (60, 5, 80, 20), 0)])  # the last lies wholly outside
    with caplog.at_level(logging.INFO, logger="paddle_tl"):
        dataset = read_voc(root, "train")
    np.testing.assert_array_equal(dataset.samples[0].boxes, [[0, 4, 30, 40], [44, 29, 50, 40]])
    xml = str(root / "Annotations" / "a.xml")
    assert [c["box"] for c in dataset.issues.clipped] == [[-9, 5, 30, 55], [45, 30, 70, 40]]
    assert all(c["file"] == xml for c in dataset.issues.clipped)
    assert dataset.issues.dropped == [{"file": xml, "class": "cat", "box": [60, 5, 80, 20],
                                       "reason": "outside the 50x40 image"}]
    assert f"{xml}: dropping the 'cat' box [60, 5, 80, 20]: outside the 50x40 image" in caplog.text


def test_zero_and_negative_area_boxes_are_dropped_naming_file_and_box(tmp_path, caplog):
    # VOC corners are inclusive: xmax = xmin - 1 is zero width, xmax < xmin - 1 negative.
    root = one_image_voc(tmp_path / "v", [("cat", (10, 10, 9, 20), 0), ("dog", (30, 10, 20, 20), 0),
                                          ("dog", (5, 5, 15, 15), 0)])
    with caplog.at_level(logging.WARNING, logger="paddle_tl"):
        dataset = read_voc(root, "train")
    assert dataset.class_names == ["cat", "dog"]
    np.testing.assert_array_equal(dataset.samples[0].boxes, [[4, 4, 15, 15]])
    assert dataset.samples[0].labels.tolist() == [1]
    xml = root / "Annotations" / "a.xml"
    assert [(d["box"], d["reason"]) for d in dataset.issues.dropped] == [
        ([10, 10, 9, 20], "zero or negative area"), ([30, 10, 20, 20], "zero or negative area")]
    assert f"{xml}: dropping the 'cat' box [10, 10, 9, 20]: zero or negative area" in caplog.text
    assert dataset.summary()["dropped"] == dataset.issues.dropped


def test_unknown_class_is_refused_naming_file_and_class(voc):
    root, _ = voc
    xml = root / "Annotations" / "val_img_001.xml"
    xml.write_text(voc_xml("val_img_001.jpg", (96, 72), [("zebra", (1, 1, 10, 10), 0)]))
    message = refusal(read_voc, root, "val", class_names=["ellipse", "rectangle", "triangle"])
    assert message == f"{xml}: class 'zebra' is not among the classes ['ellipse', 'rectangle', 'triangle']"


def test_missing_image_is_one_line_naming_it(tmp_path):
    root = one_image_voc(tmp_path / "v", [("cat", (1, 1, 10, 10), 0)], image=False)
    message = refusal(read_voc, root, "train")
    assert message.startswith(f"{root / 'Annotations' / 'a.xml'}: its image is missing")
    assert str(root / "JPEGImages" / "a.jpg") in message


def test_split_id_without_annotation_names_the_list_line(voc):
    root, _ = voc
    listing = root / "ImageSets" / "Main" / "val.txt"
    listing.write_text(listing.read_text() + "ghost\n")
    xml = root / "Annotations" / "ghost.xml"
    assert refusal(read_voc, root, "val") == f"{listing}:5: 'ghost' has no annotation {xml}"


def test_missing_split_names_those_there_are(voc):
    root, _ = voc
    message = refusal(read_voc, root, "test", where="DataLoader.Eval.dataset.root")
    assert message == (f"DataLoader.Eval.dataset.root: {root / 'ImageSets' / 'Main' / 'test.txt'} is missing "
                       "(splits found: train, val)")


def test_box_that_is_not_a_number_is_one_line(tmp_path):
    root = one_image_voc(tmp_path / "v", [("cat", (1, 1, "ten", 10), 0)])
    assert refusal(read_voc, root, "train") == \
        f"{root / 'Annotations' / 'a.xml'}: object 1 ('cat') has a non-numeric bndbox/xmax ('ten')"


def test_unreadable_image_is_left_out_and_reported(voc):
    root, _ = voc
    broken = root / "JPEGImages" / "train_img_001.jpg"
    broken.write_bytes(b"not a jpeg")
    dataset = read_voc(root, "train")
    assert len(dataset) == 7 and str(broken) not in {s.image for s in dataset.samples}
    assert [u["file"] for u in dataset.issues.unreadable] == [str(broken)]


# ---------------------------------------------------------------- malformed COCO

@pytest.fixture
def coco(tmp_path):
    images_dir, path, _ = write_coco(tmp_path / "coco", 4, seed=3)
    return images_dir, path, json.loads(path.read_text())


def test_coco_unknown_category_id_names_annotation_and_image(coco):
    images_dir, path, data = coco
    data["annotations"][1]["category_id"] = 42
    path.write_text(json.dumps(data))
    image = next(i["file_name"] for i in data["images"] if i["id"] == data["annotations"][1]["image_id"])
    assert refusal(read_coco, images_dir, path) == (
        f"{path}: annotation 2 (image {image}) has category_id 42, which is not among the categories (ids [1, 2, 3])")


def test_coco_unknown_class_annotation_image_and_missing_file(coco):
    images_dir, path, data = coco
    message = refusal(read_coco, images_dir, path, class_names=["ellipse"])
    assert message.startswith(f"{path}: annotation ") and "is not among the classes ['ellipse']" in message

    data["annotations"][0]["image_id"] = 99
    path.write_text(json.dumps(data))
    assert refusal(read_coco, images_dir, path) == f"{path}: annotation 1 has image_id 99, which no image has"

    (images_dir / data["images"][2]["file_name"]).unlink()
    message = refusal(read_coco, images_dir, path)
    assert message.startswith(f"{path}: image {data['images'][2]['file_name']!r} (id 3) is missing")


def test_coco_bad_json_and_bad_bbox(coco):
    images_dir, path, data = coco
    data["annotations"][0]["bbox"] = [1, 2, 3]
    path.write_text(json.dumps(data))
    assert refusal(read_coco, images_dir, path).endswith("bbox [1, 2, 3] is not [x, y, width, height]")
    path.write_text("{not json")
    assert refusal(read_coco, images_dir, path).startswith(f"{path}: not readable as COCO json")


def test_coco_degenerate_box_is_dropped_naming_the_image(coco):
    images_dir, path, data = coco
    data["annotations"][0]["bbox"] = [10, 10, 0, 5]
    path.write_text(json.dumps(data))
    dataset = read_coco(images_dir, path)
    image = next(i["file_name"] for i in data["images"] if i["id"] == data["annotations"][0]["image_id"])
    name = CLASSES[data["annotations"][0]["category_id"] - 1]  # ids 1..K (synthetic_detection.coco_json)
    assert dataset.issues.dropped == [{"file": f"{path} (image {image})", "class": name, "box": [10, 10, 0, 5],
                                       "reason": "zero or negative area"}]
    assert sum(len(s) for s in dataset.samples) == len(data["annotations"]) - 1


# ---------------------------------------------------------------- the wrong kind of dataset

def test_class_folder_dataset_is_refused_as_such(tiny_image_folder):
    root = tiny_image_folder("flowers")
    message = refusal(read_voc, root, "train", where="DataLoader.Train.dataset.root")
    assert message.startswith(f"DataLoader.Train.dataset.root: {root} has no Annotations/ folder; it looks like "
                              "a class-folder dataset (ImageFolder) - use a classification config")


def test_other_folders_get_the_voc_layout(tmp_path):
    (tmp_path / "Annotations").mkdir()
    message = refusal(check_voc_root, tmp_path)
    assert message == (f"VOC root: {tmp_path} has no JPEGImages/ folder; a detection dataset is a PASCAL VOC folder "
                       "(JPEGImages/, Annotations/*.xml and ImageSets/Main/<split>.txt)")
    assert "is missing" in refusal(check_voc_root, tmp_path / "nowhere")


# ---------------------------------------------------------------- the data check

def test_check_reports_counts_and_repairs(voc, tmp_path):
    root, written = voc
    xml = root / "Annotations" / "val_img_000.xml"
    xml.write_text(voc_xml("val_img_000.jpg", (96, 72), [("ellipse", (1, 1, 200, 10), 0),
                                                         ("ellipse", (5, 5, 4, 9), 0)]))
    report = check_voc(root, out_dir=tmp_path / "out")
    assert report["splits"]["train"]["images"] == 8 and report["splits"]["eval"]["images"] == 4
    assert report["splits"]["train"]["images_without_objects"] == 2
    assert len(report["splits"]["eval"]["clipped"]) == 1 and len(report["splits"]["eval"]["dropped"]) == 1
    assert "eval: 1 boxes of no area dropped" in report["problems"]
    assert json.loads((tmp_path / "out" / "data_check.json").read_text())["problems"] == report["problems"]
    table = format_table(report)
    assert f"eval dropped: {xml}: 'ellipse' box [5, 5, 4, 9] (zero or negative area)" in table

    shutil.copy(root / "ImageSets" / "Main" / "train.txt", root / "ImageSets" / "Main" / "val.txt")
    report = check_voc(root)
    assert len(report["in_both_splits"]) == 8 and "8 images are in both splits" in report["problems"][0]


# ---------------------------------------------------------------- the shared raccoon set

@pytest.mark.slow
def test_raccoon_splits(shared_dir):
    root = shared_dir / "datasets" / "raccoon"
    report = check_voc(root)
    train, evaluation = report["splits"]["train"], report["splits"]["eval"]
    assert report["class_names"] == ["raccoon"]
    assert (train["images"], evaluation["images"]) == (160, 40)  # SOURCE.md: the dataset's own split
    # one <object> per raccoon, 217 in Annotations/; none clipped or dropped
    assert (train["objects"], evaluation["objects"]) == (173, 44)
    assert report["problems"] == []
    assert train["images_without_objects"] == evaluation["images_without_objects"] == 0
    assert not train["unreadable"] and not evaluation["unreadable"]
    assert report["in_both_splits"] == []


def test_split_listing_an_id_twice_is_refused(voc):
    root, _ = voc
    listing = root / "ImageSets" / "Main" / "val.txt"
    listing.write_text(listing.read_text() + "val_img_002\n")
    assert refusal(read_voc, root, "val") == f"{listing}: 'val_img_002' is listed 2 times"
