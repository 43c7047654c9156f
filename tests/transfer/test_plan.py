"""LP-FT: a linear probe first, then the top stages fine-tune, on cached
activations, with the bottom stages (BatchNorm statistics included) never
moving."""

import numpy as np
import pytest

from paddle_tl.combinations import Facts, check_combinations
from paddle_tl.config import load_config
from paddle_tl.engine import fit
from paddle_tl.engine.train import train
from paddle_tl.errors import ConfigError
from paddle_tl.models.zoo import get_spec, stage_index
from paddle_tl.transfer.feature_cache import TopOrHead
from paddle_tl.transfer.plan import plan_transfer
from tests.engine.test_train import _weights, make_cfg


def _plan(*overrides, epochs=6):
    return plan_transfer(load_config(None, list(overrides)).Transfer, 5, [40, 40], True, epochs=epochs)


def test_lp_ft_trains_the_head_alone_then_the_top_stages():
    plan = _plan("Transfer.strategy=lp_ft")
    assert [plan.frozen_stages_at(epoch) for epoch in range(6)] == [5, 5, 5, 4, 4, 4]  # half the epochs probe
    assert plan.always_frozen == 4 and plan.unfreezes
    plan = _plan("Transfer.strategy=lp_ft", "Transfer.lp_epochs=1", "Transfer.freeze_stages=2", epochs=3)
    assert [plan.frozen_stages_at(epoch) for epoch in range(3)] == [5, 2, 2] and plan.always_frozen == 2
    assert [_plan("Transfer.strategy=lp_ft", epochs=1).frozen_stages_at(0)] == [5]  # at least one probe epoch


def test_lp_ft_that_leaves_no_stage_to_fine_tune_is_refused():
    # A rule of combinations.py, checked once the stages are known (before any work: tests/test_combinations.py).
    with pytest.raises(ConfigError, match=r"^Transfer.strategy=lp_ft cannot be combined with Transfer.freeze_stages=5 "
                                          r"\(all 5 stages of mobilenet_v2\): lp_ft fine-tunes the stages above"):
        check_combinations(Facts(load_config(None, ["Transfer.strategy=lp_ft", "Transfer.freeze_stages=5"]), stages=5))
    with pytest.raises(ConfigError, match=r"Transfer.lp_epochs.*must be >= 1"):
        _plan("Transfer.strategy=lp_ft", "Transfer.lp_epochs=0")


@pytest.mark.slow
def test_lp_ft_keeps_the_bottom_stages_bit_identical_on_cached_activations(workspace, tmp_path):
    metrics = train(make_cfg(workspace, tmp_path / "run", "Transfer.strategy=lp_ft", "Transfer.freeze_stages=3",
                             "Transfer.lp_epochs=1", "Global.epochs=3"))
    assert metrics["strategy"]["strategy"] == "lp_ft"
    assert metrics["strategy"]["cached_activations"]["boundary"] == 3
    assert [row["frozen_stages"] for row in metrics["history"]] == [5, 3, 3]
    head_only = 771  # MobileNetV1 x0.25's 256 features x 3 classes + 3
    assert metrics["trainable_params"] > 10 * head_only  # the fine-tuning phase's count, not the probe's
    spec = get_spec("mobilenet_v1")
    before, after = _weights(workspace["pretrained"]), _weights(tmp_path / "run" / "latest.pdparams")
    stages = {key: stage_index(spec, key) for key in after}
    assert all(np.array_equal(after[key], before[key]) for key, stage in stages.items()
               if stage is not None and stage < 3)  # weights and BatchNorm statistics
    assert any(not np.array_equal(after[key], before[key]) for key, stage in stages.items()
               if stage is not None and stage >= 3)  # the top stages fine-tuned after the probe


@pytest.mark.slow
def test_the_linear_probe_phase_trains_the_head_on_features_computed_from_the_activations(workspace, tmp_path,
                                                                                           monkeypatch):
    """LP-FT's probe epochs feed the head features (computed once from the
    cached activations) instead of running the frozen top stages every step:
    the head comes out as it does through the top stages (MobileNetV1 has no
    dropout before its head), and a run that ends probing is scored right."""
    inputs = []
    forward = TopOrHead.forward
    monkeypatch.setattr(TopOrHead, "forward", lambda self, x: inputs.append(x.ndim) or forward(self, x))
    common = ("Transfer.strategy=lp_ft", "Transfer.freeze_stages=3", "Global.epochs=1")
    fast = train(make_cfg(workspace, tmp_path / "fast", *common))
    assert fast["strategy"]["cached_activations"]["probe_on_features"] is True
    assert inputs and set(inputs) == {2}  # training, validation and Eval alike
    monkeypatch.setattr(fit, "_probes_first", lambda *args: False)
    slow = train(make_cfg(workspace, tmp_path / "slow", *common))
    assert slow["strategy"]["cached_activations"]["probe_on_features"] is False
    heads = [_weights(tmp_path / run / "best_model.pdparams") for run in ("fast", "slow")]
    assert all(np.allclose(heads[0][key], heads[1][key], atol=1e-4) for key in heads[0] if key.startswith("fc."))
    assert fast["best_top1"] == slow["best_top1"] and fast["final_top1"] == slow["final_top1"]


@pytest.mark.slow
def test_the_linear_probe_phase_moves_the_head_alone(workspace, tmp_path):
    train(make_cfg(workspace, tmp_path / "run", "Transfer.strategy=lp_ft", "Transfer.lp_epochs=2", "Global.epochs=2"))
    spec = get_spec("mobilenet_v1")
    before, after = _weights(workspace["pretrained"]), _weights(tmp_path / "run" / "latest.pdparams")
    assert all(np.array_equal(after[key], before[key]) for key in after if stage_index(spec, key) is not None)


def test_lp_ft_unfreezes_mid_run_so_it_cannot_be_traced_once():
    with pytest.raises(ConfigError, match=r"Global.to_static=true cannot be combined with Transfer.strategy=lp_ft: "
                                          r"stages unfrozen after the graph is traced would stay frozen"):
        load_config(None, ["Global.to_static=true", "Transfer.strategy=lp_ft"])
