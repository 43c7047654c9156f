"""Config: YAML + -o overrides, validated before any work, with messages that
name the key."""

import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from paddle_tl.config import SHIPPED_CONFIGS, find_config, load_config, shipped_configs
from paddle_tl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
ROOTS = ["DataLoader.Train.dataset.root=/data/train", "DataLoader.Eval.dataset.root=/data/val"]


def refused(*overrides):
    with pytest.raises(ConfigError) as info:
        load_config(None, [*ROOTS, *overrides])
    return str(info.value)


def test_overrides_are_yaml_typed():
    cfg = load_config(None, [*ROOTS, "Global.epochs=3", "Arch.pretrained=false", "Optimizer.lr.learning_rate=1e-3",
                             "Arch.kwargs={scale: 0.25}", "Metric.topk=[1, 3]"])
    assert cfg.Global.epochs == 3
    assert cfg.Arch.pretrained is False
    assert cfg.Optimizer.lr.learning_rate == pytest.approx(1e-3)
    assert cfg.Arch.kwargs == {"scale": 0.25}
    assert cfg.Metric.topk == [1, 3]


def test_unknown_key_names_closest_valid_key():
    assert "unknown config key 'Global.epoch'; did you mean 'Global.epochs'?" in refused("Global.epoch=3")
    assert "did you mean 'DataLoader.Train.batch_size'" in refused("DataLoader.Train.batchsize=8")
    assert "unknown config key 'Glob'" in refused("Glob.epochs=3")


@pytest.mark.parametrize("override, expected", [
    ("Global.epochs=abc", "Global.epochs: expected int, got str 'abc'"),
    ("DataLoader.Train.batch_size=2.5", "DataLoader.Train.batch_size: expected int"),
    ("Global.epochs=true", "Global.epochs: expected int, got bool"),
    ("Optimizer.lr.learning_rate=-0.1", "Optimizer.lr.learning_rate: must be > 0"),
    ("Global.epochs=0", "Global.epochs: must be >= 1"),
    ("Loss.label_smoothing=1.5", "Loss.label_smoothing: must be in [0, 1)"),
    ("Transfer.strategy=ful", "Transfer.strategy: 'ful' is not one of auto, linear_probe, partial, full, gradual, bitfit, lp_ft; did you "
                              "mean 'full'?"),
    ("Arch.pretrained=true", "Arch.pretrained: true is ambiguous"),
    ("DataLoader.Train.augment.crop_scale=[0.9, 0.1]", "crop_scale: must be [low, high]"),
    ("Global.epochs.x=1", "Global.epochs: expected int, got dict"),
])
def test_wrong_types_and_impossible_values_are_refused(override, expected):
    assert expected in refused(override)


@pytest.mark.parametrize("level", ["true", "O1", "O2"])
def test_amp_is_refused_on_cpu_before_any_work(level):
    message = refused("Global.device=cpu", f"Global.amp={level}")
    assert message.startswith(f"Global.amp={'true' if level == 'true' else level} cannot be combined with "
                              "Global.device=cpu: mixed precision needs a GPU")
    for device in ("gpu", "auto"):  # auto: refused at run time when no GPU turns up (test_train)
        assert load_config(None, [*ROOTS, f"Global.device={device}", f"Global.amp={level}"]).Global.amp


@pytest.mark.parametrize("value, level", [("false", None), ("true", "O1"), ("O1", "O1"), ("O2", "O2")])
def test_amp_level_true_means_o1(value, level):
    assert load_config(None, [*ROOTS, "Global.device=gpu", f"Global.amp={value}"]).Global.amp_level == level


@pytest.mark.parametrize("value", ["O3", "o2", "1"])
def test_amp_level_must_be_o1_or_o2(value):
    assert refused("Global.device=gpu", f"Global.amp={value}").startswith(
        "Global.amp: expected bool or 'O1' or 'O2', got ")


def test_num_workers_takes_a_count_or_auto():
    loaders = load_config(None, [*ROOTS, "DataLoader.Train.num_workers=4"]).DataLoader
    assert loaders.Train.num_workers == 4 and loaders.Eval.num_workers == "auto"  # auto is the default
    assert refused("DataLoader.Train.num_workers=-1") == "DataLoader.Train.num_workers: must be >= 0 or auto"
    assert refused("DataLoader.Eval.num_workers=many") == (
        "DataLoader.Eval.num_workers: expected int or 'auto', got str 'many'")


@pytest.mark.parametrize("override, problem", [
    ("Transfer.strategy=gradual", "stages unfrozen after the graph is traced would stay frozen"),
    ("Transfer.domain_adaptation=mmd", "the per-step gradient-reversal and ramp coefficients would be traced"),
])
def test_to_static_refuses_what_changes_after_tracing(override, problem):
    message = refused("Global.to_static=true", override)
    assert message.startswith(f"Global.to_static=true cannot be combined with {override}: {problem}")
    assert not load_config(None, [*ROOTS, override]).Global.to_static  # fine without to_static


def test_yaml_file_is_read_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("Global: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "mobilenet_v2_imagefolder.yaml", ["Global.epochs=2"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["Global"]["epochs"] == 2


def test_config_remembers_the_keys_written_but_does_not_save_them(tmp_path):
    """Config.given: what the YAML and the -o overrides wrote, as dotted keys
    (a mapping value such as Arch.kwargs is one key); defaults are not in it."""
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"Arch": {"name": "resnet18", "kwargs": {"scale": 0.5}}, "Loss": None,
                                    "DataLoader": {"Eval": {"dataset": {"root": "/data/val"}}}}))
    cfg = load_config(path, ["Arch.input_size=160", "Global.epochs=3"])
    assert cfg.given == frozenset({"Arch.name", "Arch.kwargs", "Arch.input_size", "Global.epochs",
                                   "DataLoader.Eval.dataset.root"})
    assert load_config().given == frozenset()
    cfg.save(tmp_path / "config.yaml")
    assert "given" not in (tmp_path / "config.yaml").read_text()
    # A saved config states every key.
    assert {"Arch.name", "Arch.num_classes", "Global.seed"} <= load_config(tmp_path / "config.yaml").given



def alias_bomb(levels=9):
    """"Billion laughs": a holds 9 values, b 9 aliases of a, ..., i 9**9
    (387 million) once expanded; as YAML flow mappings, a few hundred bytes."""
    names = "abcdefghi"[:levels]
    entries = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    entries += [f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]" for prev, name in zip(names, names[1:])]
    return "{" + ", ".join(entries) + "}"


def test_an_alias_bomb_in_arch_kwargs_is_refused_at_once(tmp_path):
    """Arch.kwargs is free-form, so the schema never looked inside it: the
    bomb loaded in a moment and then hung config.save. Now it is refused
    as it is read, from a file and from an -o override alike."""
    path = tmp_path / "bomb.yaml"
    path.write_text(f"Arch:\n  kwargs: {alias_bomb()}\n")
    for source, overrides, where in ((path, [], f"{path}: "), (None, [f"Arch.kwargs={alias_bomb()}"],
                                                               "override Arch.kwargs: ")):
        started = time.perf_counter()
        with pytest.raises(ConfigError) as info:
            load_config(source, [*ROOTS, *overrides])
        assert time.perf_counter() - started < 1
        # e is the first key past 10,000 values (9**5 = 59,049)
        assert str(info.value) == (f"{where}Arch.kwargs.e holds more than 10000 values once its YAML aliases "
                                   "are expanded (aliases repeating aliases?); a config needs far fewer")
    # Anchors and aliases that stay small are still a config's own business.
    cfg = load_config(None, [*ROOTS, f"Arch.kwargs={alias_bomb(levels=3)}"])
    assert cfg.Arch.kwargs["c"] == [[["x"] * 9] * 9] * 9  # 729 values, expanded


def test_alias_bomb_is_one_line_from_the_command_line_before_any_work(tmp_path, capsys):
    from paddle_tl import cli
    code = cli.main(["train", "-c", str(REPO / "configs" / "quickstart.yaml"), "-o", f"Arch.kwargs={alias_bomb()}",
                     "-o", f"Global.output_dir={tmp_path / 'run'}"])
    stderr = capsys.readouterr().err
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: override Arch.kwargs: Arch.kwargs.e holds more than")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value, key", [("&a {x: [1, *a]}", "Arch.kwargs.x"),  # an alias inside its own anchor
                                        ("{deep: " + "[" * 400 + "]" * 400 + "}", "Arch.kwargs.deep")])
def test_a_self_referring_or_deeply_nested_value_is_refused(value, key):
    # Both loaded, then crashed config.save with a RecursionError traceback.
    assert refused(f"Arch.kwargs={value}") == (
        f"override Arch.kwargs: {key} is nested more than 50 levels deep (or a YAML alias refers to "
        "the anchor it is in); a config needs far fewer")


def test_yaml_nested_past_the_parser_is_refused(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("Arch:\n  kwargs: {x: " + "[" * 5000 + "]" * 5000 + "}\n")
    with pytest.raises(ConfigError, match="nested too deeply to be a config"):
        load_config(path)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


@pytest.mark.slow
def test_command_line_refuses_typo_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), "-c", str(REPO / "configs" / "quickstart.yaml"),
         "-o", "Global.epoch=3", "-o", f"Global.output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unknown config key 'Global.epoch'; did you mean 'Global.epochs'?")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- shipped configs

def test_configs_folder_is_the_packaged_one():
    """One copy of each config: the checkout's configs/ links into the package."""
    assert (REPO / "configs").is_symlink()
    assert (REPO / "configs").resolve() == (REPO / "paddle_tl" / "configs").resolve()
    assert sorted(p.name for p in (REPO / "paddle_tl" / "configs").glob("*.yaml")) == shipped_configs()


@pytest.mark.parametrize("name", ["quickstart.yaml", "quickstart", "configs/quickstart.yaml"])
def test_a_missing_path_falls_back_to_the_shipped_config(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # no configs/ here, as for a pip-installed user
    assert find_config(name) == SHIPPED_CONFIGS / "quickstart.yaml"
    assert load_config(name).Transfer.strategy == "linear_probe"


def test_a_local_file_wins_over_the_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart.yaml").write_text("Global: {epochs: 3}\n")
    assert load_config("quickstart.yaml").Global.epochs == 3


@pytest.mark.parametrize("name", ["nope.yaml", "elsewhere/quickstart.yaml"])
def test_an_unknown_config_lists_the_shipped_ones(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"config file not found: {name} \(shipped configs, usable by name: "
                                          r".*quickstart\.yaml"):
        load_config(name)


def test_the_wheel_ships_every_config(tmp_path):
    """`pip install .` (a wheel) must carry the configs: build one offline from
    a copy of the sources (the build leaves build/ and egg-info behind)."""
    pytest.importorskip("wheel", reason="building a wheel without isolation needs the wheel package (dev extra)")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "paddle_tl", source / "paddle_tl", ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
                             "--no-index", "-q", "-w", str(tmp_path / "dist")],
                            cwd=source, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("paddle_tl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = sorted(name for name in archive.namelist() if name.endswith(".yaml"))
    assert shipped == [f"paddle_tl/configs/{name}" for name in shipped_configs()]
    assert len(shipped) >= 6
