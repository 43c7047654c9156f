"""A finished run read back: its checkpoints describe their network and
preprocessing, eval rebuilds what trained (refusing a config that says
otherwise, taking defaults nobody wrote for no statement), older checkpoints
without that record still evaluate from the config, and `paddle-tl eval
RUN_DIR [--data FOLDER]` needs nothing but the run folder."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from paddle_tl import cli
from paddle_tl.config import load_config
from paddle_tl.engine.checkpoint import load_state
from paddle_tl.engine.evaluate import evaluate
from paddle_tl.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[2]
MOBILENET_V1_HEAD = ["fc"]


def _pretrained(run):
    return f"Global.pretrained_model={run.best}"


def _last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def test_checkpoints_record_the_network_and_its_preprocessing(trained_run):
    expected = {"arch": "mobilenet_v1", "kwargs": {"scale": 0.25}, "num_classes": 3, "head": MOBILENET_V1_HEAD,
                "head_config": {"type": "linear", "hidden": [512], "activation": "relu", "dropout": 0.5},
                "preprocess": {"input_size": 64, "resize_short": 73, "mean": [0.485, 0.456, 0.406],
                               "std": [0.229, 0.224, 0.225], "channel_order": "RGB"},
                "class_names": ["blue", "green", "red"]}
    # best_model's also holds the calibration temperature (1.0 where none could be fitted), and its
    # files still match the sha256 that state.json holds (load_state checks them).
    assert load_state(trained_run.dir / "latest")["model"] == expected
    assert load_state(trained_run.dir / "best_model")["model"] == dict(
        expected, temperature=trained_run.metrics["calibration"]["temperature"])


def test_eval_of_a_run_folder_prints_what_the_config_form_prints(trained_run, capsys):
    assert cli.main(["eval", "-c", str(trained_run.config), "-o", _pretrained(trained_run)]) == 0
    config_form = _last_json(capsys.readouterr().out)
    assert config_form["top1"] == pytest.approx(trained_run.metrics["best_top1"])
    assert cli.main(["eval", str(trained_run.dir), "--data", str(trained_run.val)]) == 0
    assert _last_json(capsys.readouterr().out) == config_form
    # the script, in its own process, as a user runs it
    done = subprocess.run([sys.executable, str(REPO / "tools" / "eval.py"), str(trained_run.dir)],
                          capture_output=True, text=True, timeout=300,
                          env={"HOME": str(trained_run.dir.parent / "home"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    run_form = _last_json(done.stdout)
    assert run_form["top1"] == config_form["top1"] and run_form["per_class"] == config_form["per_class"]
    assert run_form["loss"] == pytest.approx(config_form["loss"], abs=1e-5)


def test_a_written_arch_name_that_contradicts_the_run_is_refused(trained_run):
    with pytest.raises(ConfigError) as info:
        evaluate(load_config(trained_run.config, [_pretrained(trained_run), "Arch.name=resnet18"]))
    assert str(info.value) == (f"Arch.name: resnet18 contradicts the run, which trained with "
                               f"Arch.name=mobilenet_v1 ({trained_run.best}); leave it out")
    kwargs_refused = r"^Arch.kwargs: \{'scale': 0.5\} contradicts .* Arch.kwargs=\{'scale': 0.25\}"
    with pytest.raises(ConfigError, match=kwargs_refused):
        evaluate(load_config(trained_run.config, [_pretrained(trained_run), "Arch.kwargs={scale: 0.5}"]))
    with pytest.raises(ConfigError, match="^Arch.num_classes: 4 contradicts .* Arch.num_classes=3 "):
        evaluate(load_config(trained_run.config, [_pretrained(trained_run), "Arch.num_classes=4"]))


def test_defaults_nobody_wrote_are_no_contradiction(trained_run):
    """No Arch section at all: Arch.name is mobilenet_v2 by default and the
    input size unset, which says nothing; the run's record decides."""
    cfg = load_config(None, [_pretrained(trained_run), f"DataLoader.Eval.dataset.root={trained_run.val}"])
    assert cfg.Arch.name == "mobilenet_v2" and "Arch.name" not in cfg.given
    assert evaluate(cfg)["top1"] == pytest.approx(trained_run.metrics["best_top1"])
    assert (cfg.Arch.name, cfg.Arch.input_size, cfg.Arch.num_classes) == ("mobilenet_v1", 64, 3)
    # Written values that agree with the run are fine, and so is an explicit null.
    agreeing = load_config(trained_run.config, [_pretrained(trained_run), "Arch.input_size=64"])
    assert evaluate(agreeing)["top1"] == pytest.approx(trained_run.metrics["best_top1"])
    unset = load_config(trained_run.config, [_pretrained(trained_run), "Arch.input_size=null"])
    assert evaluate(unset)["top1"] == pytest.approx(trained_run.metrics["best_top1"])


def test_a_checkpoint_without_the_record_is_built_from_the_config(trained_run, tmp_path):
    """Checkpoints written before the record keep today's behaviour."""
    old = tmp_path / "old"
    old.mkdir()
    for suffix in (".pdparams", ".state.json"):
        shutil.copy(f"{trained_run.best}{suffix}", old / f"best_model{suffix}")
    state_file = old / "best_model.state.json"
    state = json.loads(state_file.read_text())
    del state["model"]
    state_file.write_text(json.dumps(state))
    pretrained = f"Global.pretrained_model={old / 'best_model'}"
    assert evaluate(load_config(trained_run.config, [pretrained]))["top1"] == pytest.approx(
        trained_run.metrics["best_top1"])
    # ... so the config must describe the network, as before.
    with pytest.raises(CheckpointError, match="does not fit this model"):
        evaluate(load_config(None, [pretrained, f"DataLoader.Eval.dataset.root={trained_run.val}"]))


def test_run_folder_mistakes_are_one_line_errors(trained_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["eval", str(tmp_path / "nowhere")]) == 2
    assert cli.main(["eval", str(tmp_path / "empty")]) == 2
    assert cli.main(["eval", str(trained_run.dir), "--data", str(tmp_path / "no_images")]) == 2
    assert cli.main(["export", str(tmp_path / "empty"), "--output", str(tmp_path / "out")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [
        f"error: run folder {tmp_path / 'nowhere'} does not exist",
        f"error: {tmp_path / 'empty'} is not a run folder: it has no best_model.state.json "
        "(write one with paddle-tl train)",
        f"error: --data: {tmp_path / 'no_images'} does not exist; give a folder of class sub-folders",
        f"error: {tmp_path / 'empty'} is not a run folder: it has no best_model.state.json "
        "(write one with paddle-tl train)"]
    assert not (tmp_path / "out").exists()
    # pairs of flags (paddle_tl/flags.py): neither form, both forms, an export without --output
    for argv in (["eval"], ["eval", str(trained_run.dir), "-c", str(trained_run.config)],
                 ["export", str(trained_run.dir)]):
        assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: -c/--config is required (or give a run folder: RUN_DIR)",
        "error: give either RUN_DIR or -c CONFIG, not both", "error: --output DIR is required with RUN_DIR"]


def test_resuming_a_checkpoint_without_the_record_writes_it(trained_run, tmp_path):
    from paddle_tl.engine.train import train
    run = tmp_path / "run"
    shutil.copytree(trained_run.dir, run)
    state_file = run / "latest.state.json"
    state = json.loads(state_file.read_text())
    del state["model"]
    state_file.write_text(json.dumps(state))
    train(load_config(trained_run.config, [f"Global.output_dir={run}", f"Global.resume={run}", "Global.epochs=2"]))
    assert load_state(run / "latest")["epochs_done"] == 2
    best = load_state(trained_run.best)["model"]
    best.pop("temperature")  # best_model's alone, once training finished
    assert load_state(run / "latest")["model"] == best
