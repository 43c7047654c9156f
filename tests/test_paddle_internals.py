"""The private Paddle names paddle_tl relies on (paddle_tl/paddle_internals.py)
are still there in the installed Paddle, each check failing with the name
that moved; and no code reads a private Paddle name that is not listed."""

import ast
from pathlib import Path

import numpy as np
import pytest

from paddle_tl.paddle_internals import PADDLE_INTERNALS, PADDLE_MODEL_PRIVATES
from paddle_tl.runtime import import_paddle

paddle = import_paddle()
ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("paddle_tl", "bench", "tools")


def _batch_norms():
    # paddle.nn.BatchNorm (the older API, used by PaddleClas models) is not a _BatchNormBase
    return [paddle.nn.BatchNorm(4), paddle.nn.BatchNorm2D(4)]


def _c_ops():
    one = paddle.ones([1], dtype="float32")
    finite = [paddle.to_tensor([1.0, 2.0])]
    _, found = paddle._C_ops.check_finite_and_unscale_(finite, one)
    assert not bool(found) and finite[0].numpy().tolist() == [1.0, 2.0], "finite gradients not left as they were"
    _, found = paddle._C_ops.check_finite_and_unscale_([paddle.to_tensor([np.inf, 0.0])], one)
    assert bool(found), "an Inf gradient not reported"


def _scale():
    scaler = paddle.amp.GradScaler(init_loss_scaling=1024.0)
    assert hasattr(scaler, "_scale")
    if scaler.is_enable():  # a GPU: the scale is a tensor of the initial value (on a CPU AMP is off, None)
        assert float(scaler._scale) == 1024.0


def _batch_norm_base():
    for kind in (paddle.nn.BatchNorm1D, paddle.nn.BatchNorm2D, paddle.nn.BatchNorm3D, paddle.nn.SyncBatchNorm):
        assert issubclass(kind, paddle.nn.layer.norm._BatchNormBase), kind.__name__


def _statistic(name):
    def check():
        for layer in _batch_norms():
            value = getattr(layer, name)
            assert isinstance(value, paddle.Tensor) and list(value.shape) == [4], type(layer).__name__
    return check


def _use_global_stats():
    """True keeps the running statistics in train mode; None (paddle's default) moves them."""
    for layer in _batch_norms():
        layer.train()
        for setting, moves in ((True, False), (None, True)):
            layer._use_global_stats = setting
            before = layer._mean.numpy().copy()
            layer(paddle.rand([2, 4, 3, 3]) + 5)
            assert (not np.array_equal(before, layer._mean.numpy())) == moves, (type(layer).__name__, setting)


def _learning_rate():
    schedule = paddle.optimizer.lr.CosineAnnealingDecay(0.1, 10)
    optimizer = paddle.optimizer.Momentum(schedule, parameters=paddle.nn.Linear(2, 2).parameters())
    assert optimizer._learning_rate is schedule


def _dygraph_tracer():
    assert paddle.base.framework._dygraph_tracer() is not None


def _train_mode():
    """Layer.eval()/train() set the tracer's train mode, which Grad-CAM restores."""
    tracer, layer = paddle.base.framework._dygraph_tracer(), paddle.nn.Linear(2, 2)
    layer.eval()
    assert tracer._train_mode is False
    layer.train()
    assert tracer._train_mode is True


CHECKS = {"_C_ops": _c_ops, "_scale": _scale, "_BatchNormBase": _batch_norm_base,
          "_mean": _statistic("_mean"), "_variance": _statistic("_variance"),
          "_use_global_stats": _use_global_stats, "_learning_rate": _learning_rate,
          "_dygraph_tracer": _dygraph_tracer, "_train_mode": _train_mode}


def test_every_listed_internal_has_a_check():
    assert set(CHECKS) == set(PADDLE_INTERNALS), "add a check here for each entry of PADDLE_INTERNALS"


@pytest.mark.parametrize("name", sorted(PADDLE_INTERNALS))
def test_the_internal_is_still_in_the_installed_paddle(name):
    owner, used_in, why = PADDLE_INTERNALS[name]
    try:
        CHECKS[name]()
    except (AttributeError, AssertionError, TypeError) as exc:
        pytest.fail(f"paddle {paddle.__version__}: {owner} ({name}) is gone or behaves differently "
                    f"({type(exc).__name__}: {exc}); {', '.join(used_in)} rely on it for {why}")


def _private_reads():
    """(file, attribute name, line) for each `obj._name` in the scanned code
    whose name paddle_tl, bench and tools do not define themselves (reads
    through `self`/`cls` are a class's own, hapi's aside: PADDLE_MODEL_PRIVATES)."""
    trees = {path: ast.parse(path.read_text(encoding="utf-8"))
             for folder in SCANNED for path in sorted((ROOT / folder).rglob("*.py"))}
    own = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id == "self"):
                own.add(node.attr)
    own -= set(PADDLE_MODEL_PRIVATES)  # hapi sets them; GuardedModel only reads them
    return [(path.relative_to(ROOT).as_posix(), node.attr, node.lineno)
            for path, tree in trees.items() for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            and node.attr not in own
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))]


def test_no_unlisted_private_paddle_name_is_read_and_the_list_says_where_each_is():
    reads = _private_reads()
    unlisted = [f"{path}:{line}: .{name}" for path, name, line in reads
                if path not in PADDLE_INTERNALS.get(name, ((), ()))[1]]
    assert not unlisted, ("private names read but not listed (for this file) in paddle_tl/paddle_internals.py:\n"
                          + "\n".join(unlisted))
    used = {(path, name) for path, name, _ in reads}
    stale = [f"{name}: {path}" for name, (_, used_in, _) in PADDLE_INTERNALS.items()
             for path in used_in if (path, name) not in used]
    assert not stale, "paddle_internals.py lists uses that are gone:\n" + "\n".join(stale)
