"""The one table of settings that cannot combine (paddle_tl/combinations.py):
every rule refuses its pair with a message naming both settings, lets each
side alone through, and its allowed neighbour trains. (Pairs of command-line
flags: tests/test_flags.py.)"""

import pytest
import yaml

from paddle_tl.combinations import RULES, Facts, check_combinations
from paddle_tl.config import load_config
from paddle_tl.engine import train as train_module
from paddle_tl.engine.train import train
from paddle_tl.errors import ConfigError
from paddle_tl.models.zoo import get_spec
from paddle_tl.runtime import import_paddle

paddle = import_paddle()
STAGES = len(get_spec("mobilenet_v1").stages)


def _id(rule):
    return f"{rule.first.key} x {rule.second.key}"


# Per rule: overrides and training facts that turn both settings on, then the
# same with one side off (each must pass), then the allowed neighbour that
# trains here on CPU (None where it needs a GPU, or a teacher run:
# tests/transfer/test_distill.py trains those; where the other side is a
# command, cv or check-labels, which their own tests run; or where another
# test trains it: layer_decay in tests/engine/test_train.py, the MLP head in
# tests/models/test_heads.py).
CASES = {
    "Global.amp x Global.device": (["Global.device=auto", "Global.amp=O1"], {"device": "cpu"},
                                   [(["Global.device=auto", "Global.amp=false"], {"device": "cpu"}),
                                    (["Global.device=auto", "Global.amp=O1"], {"device": "gpu"})], None),
    "Global.to_static x Transfer.strategy": (["Global.to_static=true", "Transfer.strategy=gradual"], {},
                                             [(["Transfer.strategy=gradual"], {}),
                                              (["Global.to_static=true", "Transfer.strategy=partial"], {})],
                                             ["Global.to_static=true", "Transfer.strategy=partial"]),
    "Global.to_static x Transfer.domain_adaptation": (
        ["Global.to_static=true", "Transfer.domain_adaptation=dann"], {},
        [(["Transfer.domain_adaptation=dann"], {}), (["Global.to_static=true"], {})],
        ["Transfer.domain_adaptation=dann", "Transfer.strategy=partial"]),
    "Transfer.domain_adaptation x Transfer.strategy": (
        ["Transfer.domain_adaptation=mmd", "Transfer.strategy=linear_probe"], {},
        [(["Transfer.strategy=linear_probe"], {}), (["Transfer.domain_adaptation=mmd", "Transfer.strategy=full"], {})],
        ["Transfer.domain_adaptation=mmd", "Transfer.strategy=full"]),
    "Transfer.domain_adaptation x Transfer.freeze_stages": (
        ["Transfer.domain_adaptation=dann", "Transfer.strategy=partial", f"Transfer.freeze_stages={STAGES}"],
        {"stages": STAGES},
        [(["Transfer.strategy=partial", f"Transfer.freeze_stages={STAGES}"], {"stages": STAGES}),
         (["Transfer.domain_adaptation=dann", "Transfer.strategy=partial", f"Transfer.freeze_stages={STAGES - 1}"],
          {"stages": STAGES})],
        ["Transfer.domain_adaptation=dann", "Transfer.strategy=partial", f"Transfer.freeze_stages={STAGES - 1}"]),
    "Transfer.domain_adaptation x Arch.name": (
        ["Transfer.domain_adaptation=mmd", "Arch.name=squeezenet1_0"], {"feature_head": False},
        [(["Arch.name=squeezenet1_0"], {"feature_head": False}),
         (["Transfer.domain_adaptation=mmd"], {"feature_head": True})],
        ["Transfer.domain_adaptation=mmd", "Transfer.strategy=partial"]),
    "Transfer.domain_adaptation x data-parallel training": (
        ["Transfer.domain_adaptation=mmd"], {"processes": 2},
        [([], {"processes": 2}), (["Transfer.domain_adaptation=mmd"], {"processes": 1})],
        ["Transfer.domain_adaptation=mmd", "Transfer.strategy=partial"]),
    "Distill.teacher x Transfer.domain_adaptation": (
        ["Distill.teacher=runs/teacher", "Transfer.domain_adaptation=dann"], {},
        [(["Transfer.domain_adaptation=dann"], {}), (["Distill.teacher=runs/teacher"], {})], None),
    "Distill.teacher x Global.to_static": (
        ["Distill.teacher=runs/teacher", "Global.to_static=true"], {},
        [(["Global.to_static=true"], {}), (["Distill.teacher=runs/teacher"], {})], None),
    "DataLoader.Train.augment.mixup x Transfer.domain_adaptation": (
        ["DataLoader.Train.augment.mixup=0.2", "Transfer.domain_adaptation=mmd"], {},
        [(["Transfer.domain_adaptation=mmd"], {}), (["DataLoader.Train.augment.mixup=0.2"], {})],
        ["DataLoader.Train.augment.mixup=0.2", "Transfer.strategy=full"]),
    "DataLoader.Train.augment.cutmix x Transfer.domain_adaptation": (
        ["DataLoader.Train.augment.cutmix=1.0", "Transfer.domain_adaptation=dann"], {},
        [(["Transfer.domain_adaptation=dann"], {}), (["DataLoader.Train.augment.cutmix=1.0"], {})],
        ["DataLoader.Train.augment.cutmix=1.0", "Transfer.strategy=partial"]),
    "DataLoader.Train.augment.mixup x Distill.teacher": (
        ["DataLoader.Train.augment.mixup=0.2", "Distill.teacher=runs/teacher"], {},
        [(["Distill.teacher=runs/teacher"], {}), (["DataLoader.Train.augment.mixup=0.2"], {})], None),
    "DataLoader.Train.augment.cutmix x Distill.teacher": (
        ["DataLoader.Train.augment.cutmix=1.0", "Distill.teacher=runs/teacher"], {},
        [(["Distill.teacher=runs/teacher"], {}), (["DataLoader.Train.augment.cutmix=1.0"], {})], None),
    "Transfer.l2sp_alpha x Arch.pretrained": (
        ["Transfer.l2sp_alpha=0.01", "Arch.pretrained=false"], {},
        [(["Arch.pretrained=false"], {}), (["Transfer.l2sp_alpha=0.01"], {})],
        ["Transfer.l2sp_alpha=0.01", "Transfer.strategy=full"]),
    "Transfer.layer_decay x Transfer.stage_lr_mults": (
        ["Transfer.layer_decay=0.5", "Transfer.stage_lr_mults=[1, 1, 1, 1, 1]"], {},
        [(["Transfer.layer_decay=0.5"], {}), (["Transfer.stage_lr_mults=[1, 1, 1, 1, 1]"], {})], None),
    "Transfer.strategy x Transfer.freeze_stages": (
        ["Transfer.strategy=lp_ft", f"Transfer.freeze_stages={STAGES}"], {"stages": STAGES},
        [(["Transfer.strategy=partial", f"Transfer.freeze_stages={STAGES}"], {"stages": STAGES}),
         (["Transfer.strategy=lp_ft", f"Transfer.freeze_stages={STAGES - 1}"], {"stages": STAGES}),
         # more stages than the architecture has: refused on its own, by transfer/plan.py
         (["Transfer.strategy=lp_ft", f"Transfer.freeze_stages={STAGES + 1}"], {"stages": STAGES})],
        ["Transfer.strategy=lp_ft", f"Transfer.freeze_stages={STAGES - 1}"]),
    "Arch.head.type x Arch.name": (
        ["Arch.head.type=mlp", "Arch.name=squeezenet1_0"], {"feature_head": False},
        [(["Arch.name=squeezenet1_0"], {"feature_head": False}), (["Arch.head.type=mlp"], {"feature_head": True})],
        None),
    "Arch.name x paddle-tl command": (
        ["Arch.name=squeezenet1_0"], {"feature_head": False, "command": "check-labels"},
        [(["Arch.name=squeezenet1_0"], {"feature_head": False, "command": "cv"}),
         ([], {"feature_head": True, "command": "check-labels"})], None),
    # The neighbour (a concatenation's linear probe) trains in tests/engine/test_backbones.py.
    "Arch.name x Transfer.strategy": (
        ["Arch.name=mobilenet_v2+efficientnet_lite0", "Transfer.strategy=partial"], {},
        [(["Arch.name=mobilenet_v2+efficientnet_lite0", "Transfer.strategy=linear_probe"], {}),
         (["Transfer.strategy=partial"], {})], None),
    "Global.resume x paddle-tl command": (
        ["Global.resume=runs/a"], {"command": "cv"},
        [(["Global.resume=runs/a"], {}), ([], {"command": "cv"})], None),
    "Distill.teacher x paddle-tl command": (
        ["Distill.teacher=runs/teacher"], {"command": "cv"},
        [(["Distill.teacher=runs/teacher"], {"command": "check-labels"}), ([], {"command": "cv"})], None),
    **{f"Global.task x DataLoader.{side}.dataset.name": (
        [f"DataLoader.{side}.dataset.name=VOC"], {},
        [(["Global.task=detection", "DataLoader.Train.dataset.name=VOC", "DataLoader.Eval.dataset.name=VOC"], {}),
         ([], {})], None) for side in ("Train", "Eval")},
    "Global.task x Global.budget_minutes": (["Global.budget_minutes=5"], {},
                                            [(["Global.budget_minutes=5", "Global.task=detection",
                                               "DataLoader.Train.dataset.name=VOC", "DataLoader.Eval.dataset.name=VOC"],
                                              {}), ([], {})], None),
}
_DETECTION = ["Global.task=detection", "DataLoader.Train.dataset.name=VOC", "DataLoader.Eval.dataset.name=COCO"]
# Settings detection does not take: each is refused with Global.task=detection and passes with classification
# (detection's allowed neighbour trains in tests/tasks/detection/test_detection_train.py).
for key, on, facts in [
        ("Transfer.strategy", ["Transfer.strategy=lp_ft"], {}), ("Transfer.bn", ["Transfer.bn=train"], {}),
        ("Arch.kwargs", ["Arch.kwargs={scale: 0.5}"], {}), ("Arch.input_size", ["Arch.input_size=160"], {}),
        ("Arch.num_classes", ["Arch.num_classes=3"], {}),
        ("Arch.head.type", ["Arch.head.type=mlp"], {}), ("Distill.teacher", ["Distill.teacher=runs/t"], {}),
        ("Transfer.domain_adaptation", ["Transfer.domain_adaptation=mmd"], {}),
        ("DataLoader.Train.augment.mixup", ["DataLoader.Train.augment.mixup=0.2"], {}),
        ("DataLoader.Train.augment.cutmix", ["DataLoader.Train.augment.cutmix=1.0"], {}),
        ("Global.amp", ["Global.amp=O1"], {"device": "gpu"}), ("Global.to_static", ["Global.to_static=true"], {}),
        ("Transfer.l2sp_alpha", ["Transfer.l2sp_alpha=0.1"], {}),
        ("Transfer.layer_decay", ["Transfer.layer_decay=0.5"], {}),
        ("Transfer.stage_lr_mults", ["Transfer.stage_lr_mults=[1, 1, 1, 1, 1]"], {}),
        ("Global.ema_decay", ["Global.ema_decay=0.9"], {}), ("DataLoader.Eval.tta", ["DataLoader.Eval.tta=flip"], {}),
        ("DataLoader.Train.sampler", ["DataLoader.Train.sampler=balanced"], {}),
        ("Loss.class_weights", ["Loss.class_weights=balanced"], {}),
        ("Loss.label_smoothing", ["Loss.label_smoothing=0.1"], {}),
        ("data-parallel training", [], {"processes": 2}), ("paddle-tl command", [], {"command": "cv"})]:
    CASES[f"Global.task x {key}"] = ([*_DETECTION, *on], facts, [(_DETECTION, {}), (on, facts)], None)
# The mask head without detection (its allowed neighbour trains in tests/tasks/detection/test_mask_rcnn.py).
CASES["Arch.mask x Global.task"] = (["Arch.mask=true"], {}, [([*_DETECTION, "Arch.mask=true"], {}), ([], {})], None)


def test_every_rule_has_its_cases():
    assert sorted(CASES) == sorted(_id(rule) for rule in RULES)


def _facts(overrides, known):
    """Facts of the default config with `overrides` set on it directly (so
    that load_config's own check does not refuse the pair first)."""
    cfg = load_config(None, [])
    for override in overrides:
        key, _, value = override.partition("=")
        *sections, name = key.split(".")
        node = cfg
        for section in sections:
            node = getattr(node, section)
        setattr(node, name, yaml.safe_load(value))
    return Facts(cfg, **known)


@pytest.mark.parametrize("rule", RULES, ids=_id)
def test_a_refused_pair_names_both_settings_and_each_side_alone_passes(rule):
    on, known, alone, _neighbour = CASES[_id(rule)]
    with pytest.raises(ConfigError) as refused:
        check_combinations(_facts(on, known))
    message = str(refused.value)
    assert message.startswith(f"{rule.first.key}=") and f" with {rule.second.key}=" in message, message
    assert rule.why in message
    for overrides, facts in alone:
        check_combinations(_facts(overrides, facts))


def test_pairs_the_config_alone_shows_are_refused_when_it_is_read():
    with pytest.raises(ConfigError, match=r"^Global.to_static=true cannot be combined with "
                                          r"Transfer.strategy=gradual: stages unfrozen after"):
        load_config(None, ["Global.to_static=true", "Transfer.strategy=gradual"])
    with pytest.raises(ConfigError, match=r"^Global.amp=true cannot be combined with Global.device=cpu: "):
        load_config(None, ["Global.device=cpu", "Global.amp=true"])
    with pytest.raises(ConfigError, match=r"^Transfer.layer_decay=0.5 cannot be combined with "
                                          r"Transfer.stage_lr_mults=\[1, 2\]: give either layer_decay or "
                                          r"stage_lr_mults, not both"):
        load_config(None, ["Transfer.layer_decay=0.5", "Transfer.stage_lr_mults=[1, 2]"])
    # Known only once training starts: the device auto finds, the stages, the processes.
    load_config(None, ["Global.device=auto", "Global.amp=true"])
    load_config(None, ["Transfer.domain_adaptation=dann", "Transfer.strategy=partial", "Transfer.freeze_stages=99"])
    load_config(None, ["Transfer.strategy=lp_ft", "Transfer.freeze_stages=99"])
    load_config(None, ["Arch.head.type=mlp", "Arch.name=squeezenet1_0"])


@pytest.fixture(scope="module")
def folders(tmp_path_factory, colour_folder):
    base = tmp_path_factory.mktemp("combinations")
    paddle.seed(3)
    pretrained = base / "pretrained.pdparams"
    paddle.save(paddle.vision.models.mobilenet_v1(scale=0.25, num_classes=1000).state_dict(), str(pretrained))
    return {"train": colour_folder(base / "train", 6, 0), "val": colour_folder(base / "val", 2, 1),
            "pretrained": pretrained}


def _cfg(folders, run, *overrides):
    return load_config(None, [
        f"Global.output_dir={run}", "Global.epochs=1", "Global.seed=3",
        "Arch.name=mobilenet_v1", "Arch.kwargs={scale: 0.25}", "Arch.input_size=32",
        f"Arch.pretrained={folders['pretrained']}",
        f"DataLoader.Train.dataset.root={folders['train']}", f"DataLoader.Eval.dataset.root={folders['val']}",
        f"DataLoader.Target.dataset.root={folders['val']}",
        "DataLoader.Train.batch_size=6", "DataLoader.Train.num_workers=0", "DataLoader.Eval.num_workers=0",
        *overrides])


def test_domain_adaptation_with_every_stage_frozen_is_refused_before_any_work(folders, tmp_path):
    """It used to cache the frozen body's features and then crash in a
    convolution fed cached feature vectors."""
    run = tmp_path / "run"
    cfg = _cfg(folders, run, "Transfer.domain_adaptation=dann", "Transfer.strategy=partial",
               f"Transfer.freeze_stages={STAGES}")
    with pytest.raises(ConfigError, match=rf"^Transfer.domain_adaptation=dann cannot be combined with "
                                          rf"Transfer.freeze_stages={STAGES} \(all {STAGES} stages of mobilenet_v1\)"):
        train(cfg)
    assert not run.exists()


@pytest.mark.slow
@pytest.mark.parametrize("rule", [rule for rule in RULES if CASES[_id(rule)][3] is not None], ids=_id)
def test_the_allowed_neighbour_of_every_rule_trains(folders, tmp_path, monkeypatch, rule):
    monkeypatch.setattr(train_module, "write_report", lambda run_dir: run_dir)  # the report is not under test
    metrics = train(_cfg(folders, tmp_path / "run", *CASES[_id(rule)][3]))
    assert metrics["epochs_run"] == 1


def test_domain_adaptation_on_an_architecture_without_a_feature_head_is_refused_before_training(folders, tmp_path):
    cfg = _cfg(folders, tmp_path / "run", "Arch.name=squeezenet1_0", "Arch.kwargs={}", "Arch.pretrained=false",
               "Transfer.domain_adaptation=mmd", "Transfer.strategy=full")
    with pytest.raises(ConfigError, match=r"^Transfer.domain_adaptation=mmd cannot be combined with "
                                          r"Arch.name=squeezenet1_0 \(whose head is not one Linear layer\)"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_lp_ft_with_every_stage_frozen_is_refused_before_any_work(folders, tmp_path):
    """It used to be refused when the plan was made: after the data was read,
    config.yaml written and the pretrained weights loaded."""
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"^Transfer.strategy=lp_ft cannot be combined with "
                                          rf"Transfer.freeze_stages={STAGES} \(all {STAGES} stages of mobilenet_v1\): "
                                          r"lp_ft fine-tunes the stages above"):
        train(_cfg(folders, run, "Transfer.strategy=lp_ft", f"Transfer.freeze_stages={STAGES}"))
    assert not run.exists()


def test_an_mlp_head_on_an_architecture_without_a_linear_head_is_refused_before_training(folders, tmp_path):
    cfg = _cfg(folders, tmp_path / "run", "Arch.name=squeezenet1_0", "Arch.kwargs={}", "Arch.pretrained=false",
               "Arch.head.type=mlp", "Transfer.strategy=full")
    with pytest.raises(ConfigError, match=r"^Arch.head.type=mlp cannot be combined with Arch.name=squeezenet1_0 "
                                          r"\(whose head is _conv9, not one Linear layer\): an MLP head replaces"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.json").exists()
