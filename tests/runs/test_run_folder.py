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
from paddle_tl.engine.evaluate import evaluate
from paddle_tl.errors import CheckpointError, ConfigError, UserError
from paddle_tl.runs.checkpoint import load_state

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


def test_eval_and_export_refuse_weights_that_are_not_the_checkpoints_own(trained_run, tmp_path, capsys):
    """A best_model.pdparams changed after it was written (the head's columns
    swapped: same size, loads and scores, wrongly) or truncated is refused in
    one line naming the file, by eval and export alike: its sha256 is not the
    one state.json records."""
    from paddle_tl.runtime import import_paddle
    paddle = import_paddle()
    swapped, truncated = tmp_path / "swapped", tmp_path / "truncated"
    for run in (swapped, truncated):
        shutil.copytree(trained_run.dir, run)
    weights = paddle.load(str(swapped / "best_model.pdparams"))
    head = next(key for key in weights if key.endswith("weight") and key.startswith("fc"))
    weights[head] = paddle.flip(weights[head], axis=[1])  # another class's column in each
    paddle.save(weights, str(swapped / "best_model.pdparams"))
    data = (truncated / "best_model.pdparams").read_bytes()
    (truncated / "best_model.pdparams").write_bytes(data[: len(data) // 2])
    for run in (swapped, truncated):
        assert cli.main(["eval", str(run)]) == 2
        assert cli.main(["export", str(run), "--output", str(tmp_path / f"{run.name}_inference")]) == 2
        assert not (tmp_path / f"{run.name}_inference").exists()
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("error: checkpoint ") for line in errors), errors
    assert all("best_model.pdparams does not match the sha256 that best_model.state.json records" in line
               for line in errors)


def test_a_damaged_checkpoint_without_a_digest_is_one_line(trained_run, tmp_path, capsys):
    """Written before checkpoints recorded their sha256 (no `files`), a
    truncated best_model cannot be caught by its digest: reading it is
    still one line naming the file, not the unpickler's traceback."""
    run = tmp_path / "old"
    shutil.copytree(trained_run.dir, run)
    state = json.loads((run / "best_model.state.json").read_text())
    del state["files"]
    (run / "best_model.state.json").write_text(json.dumps(state))
    data = (run / "best_model.pdparams").read_bytes()
    (run / "best_model.pdparams").write_bytes(data[: len(data) // 2])
    assert cli.main(["eval", str(run)]) == 2
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert error.startswith(f"error: {run / 'best_model.pdparams'} cannot be read (") and "damaged" in error


def _tree(folder):
    """Every file under `folder` with its bytes, and the folder's siblings."""
    return ({str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()},
            sorted(path.name for path in folder.parent.iterdir()))


@pytest.mark.parametrize("refusal", [
    ("Arch.kwargs={scale: 0.25, no_such_argument: 1}", "does not accept no_such_argument"),  # when the network is built
    ("DataLoader.Eval.dataset.root=/nowhere/at/all", "/nowhere/at/all"),  # when the data is read
])
def test_a_refused_run_leaves_the_finished_run_it_would_replace_as_it_was(trained_run, tmp_path, refusal):
    from paddle_tl.engine.train import train
    run = tmp_path / "run"
    shutil.copytree(trained_run.dir, run)
    before = _tree(run)
    override, message = refusal
    with pytest.raises(UserError, match=message):
        train(load_config(trained_run.config, [f"Global.output_dir={run}", override]))
    assert _tree(run) == before  # not moved aside, no config.yaml of the refused run


def test_a_refused_resume_leaves_the_run_it_resumes_as_it_was(trained_run, tmp_path):
    from paddle_tl.engine.train import train
    run = tmp_path / "run"
    shutil.copytree(trained_run.dir, run)
    before = _tree(run)
    with pytest.raises(ConfigError, match="does not accept no_such_argument"):
        train(load_config(trained_run.config, [f"Global.output_dir={run}", f"Global.resume={run}", "Global.epochs=2",
                                               "Arch.kwargs={scale: 0.25, no_such_argument: 1}"]))
    assert _tree(run) == before  # config.yaml rewritten, then given its old contents back


def test_a_refused_run_into_a_new_folder_leaves_no_folder(trained_run, tmp_path):
    from paddle_tl.engine.train import train
    with pytest.raises(ConfigError, match="does not accept no_such_argument"):
        train(load_config(trained_run.config, [f"Global.output_dir={tmp_path / 'new' / 'run'}",
                                               "Arch.kwargs={scale: 0.25, no_such_argument: 1}"]))
    assert not (tmp_path / "new" / "run").exists()


def test_a_run_that_cannot_move_the_finished_run_aside_is_one_line(trained_run, tmp_path, monkeypatch, capsys):
    """A read-only parent folder: the finished run cannot be renamed (root
    passes permission checks, so the rename is made to fail as it does for
    other users)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run.dir, run)
    before = _tree(run)

    def read_only(self, target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "rename", read_only)
    assert cli.main(["train", "-c", str(trained_run.config), "-o", f"Global.output_dir={run}"]) == 2
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert error.startswith(f"error: Global.output_dir: {run} holds a run that cannot be moved aside to run.")
    assert error.endswith("(Permission denied); choose another Global.output_dir")
    assert _tree(run) == before
