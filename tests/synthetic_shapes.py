"""A synthetic domain shift for domain adaptation (tests/test_domain.py and
bench/synthetic_shift.py): ellipses, rectangles and triangles as light grey
shapes on black (the labeled source) and the same kinds of shapes blended
into random colour textures, |texture - mask|, as MNIST-M is made from
MNIST (the target). A network trained on the source alone stays near chance
on the target. The source alone also serves Grad-CAM's test
(tests/trust/test_gradcam.py, bench/gradcam_shapes.py): a trained network's
heat map should lie on the shape."""

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("ellipse", "rectangle", "triangle")
SIZE = 64
CAM_INPUT_SIZE = 224


def _mask(rng, kind):
    image = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(image)
    w, h = rng.randint(12, 24, size=2)
    x, y = rng.randint(1, SIZE - w), rng.randint(1, SIZE - h)
    if kind == "ellipse":
        draw.ellipse([x, y, x + w, y + h], fill=255)
    elif kind == "rectangle":
        draw.rectangle([x, y, x + w, y + h], fill=255)
    else:
        draw.polygon([(x, y + h), (x + w, y + h), (x + w // 2, y)], fill=255)
    return np.asarray(image, dtype=np.float64)[..., None] / 255.0


def _texture(rng):
    """Smooth random colours: a 4x4 grid of colours scaled up."""
    grid = Image.fromarray((rng.rand(4, 4, 3) * 255).astype(np.uint8))
    return np.asarray(grid.resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float64) / 255.0


def shapes(root, per_class, seed, domain, labeled=True):
    """per_class images of every shape under root (in class folders when
    labeled, else all in root); domain "source" or "target"."""
    rng = np.random.RandomState(seed)
    for kind in SHAPES:
        folder = root / kind if labeled else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            mask = _mask(rng, kind)
            image = np.repeat(mask, 3, axis=-1) * 0.9 + 0.05 if domain == "source" else np.abs(_texture(rng) - mask)
            Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(folder / f"{kind}_{i}.png")
    return root


def shift_folders(base):
    """120 labeled source images, 120 unlabeled target images, and 60
    labeled target images to score on."""
    return {"source": shapes(base / "source", 40, 1, "source"),
            "target": shapes(base / "target", 40, 2, "target", labeled=False),
            "target_eval": shapes(base / "target_eval", 20, 3, "target")}


def shift_overrides(folders, run, method, weights, seed, epochs=3):
    """Config overrides: ImageNet mobilenet_v2, top stages fine-tuned, one
    `Transfer.domain_adaptation` method (none = source only)."""
    return [
        f"Global.output_dir={run}", f"Global.epochs={epochs}", f"Global.seed={seed}", "Global.log_interval=100",
        "Arch.name=mobilenet_v2", f"Arch.pretrained={weights}", f"Arch.input_size={SIZE}",
        "Transfer.strategy=partial", "Transfer.freeze_stages=2", f"Transfer.domain_adaptation={method}",
        f"DataLoader.Train.dataset.root={folders['source']}", f"DataLoader.Eval.dataset.root={folders['target_eval']}",
        f"DataLoader.Target.dataset.root={folders['target']}",
        "DataLoader.Train.batch_size=16", "DataLoader.Train.num_workers=0", "DataLoader.Eval.num_workers=0",
        "DataLoader.Train.augment.crop_scale=[0.8, 1.0]", "DataLoader.Train.augment.hflip=false"]


def cam_folders(base):
    """120 labeled source images to train on, 30 to score the heat maps on."""
    return {"train": shapes(base / "train", 40, 1, "source"), "eval": shapes(base / "eval", 10, 3, "source")}


def cam_overrides(folders, run, weights, input_size=CAM_INPUT_SIZE, epochs=3, seed=0):
    """Config overrides: ImageNet mobilenet_v2 fine-tuned on the shapes on
    black, two stages frozen, upscaled to `input_size` (the heat map is the
    last stage's, 1/32 of it: 7 x 7 at 224 px)."""
    return [f"Global.output_dir={run}", f"Global.epochs={epochs}", f"Global.seed={seed}", "Global.log_interval=100",
            "Arch.name=mobilenet_v2", f"Arch.pretrained={weights}", f"Arch.input_size={input_size}",
            "Transfer.strategy=partial", "Transfer.freeze_stages=2",
            f"DataLoader.Train.dataset.root={folders['train']}", f"DataLoader.Eval.dataset.root={folders['eval']}",
            "DataLoader.Train.batch_size=16", "DataLoader.Train.num_workers=0", "DataLoader.Eval.num_workers=0",
            "DataLoader.Train.augment.crop_scale=[0.8, 1.0]", "DataLoader.Train.augment.hflip=false"]


def heat_on_shapes(run):
    """(mean fraction of the Grad-CAM mass inside the shape, mean fraction of
    the crop the shape covers) over a shapes run's Eval images, each map of
    its true class from the run's best_model; a shape's mask is its source
    image's light pixels, cropped as the network saw them."""
    from paddle_tl.data.datasets import build_dataset, load_rgb
    from paddle_tl.data.transforms import center_crop, eval_transform, resize_short
    from paddle_tl.runs.run_folder import run_config, trained_model
    from paddle_tl.trust.gradcam import grad_cam

    cfg = run_config(run)
    network, spec, pre, class_names = trained_model(cfg)
    samples = build_dataset(cfg.DataLoader.Eval.dataset, "eval", None, class_names=class_names).samples
    transform = eval_transform(pre)
    images = np.stack([transform(load_rgb(path)) for path, _ in samples])
    maps, _, _ = grad_cam(network, spec, images, [label for _, label in samples])
    inside, area = [], []
    for (path, _), heat in zip(samples, maps):
        mask = np.asarray(center_crop(resize_short(load_rgb(path).convert("L"), pre.resize_short),
                                      pre.input_size)) > 127
        inside.append(float((heat * mask).sum() / heat.sum()))
        area.append(float(mask.mean()))
    return float(np.mean(inside)), float(np.mean(area))
