"""Paddle's private names that paddle_tl relies on, listed in one place with
why each is needed and where it is used.

Paddle may rename, retype or drop any of them in a release without notice.
tests/test_paddle_internals.py checks each against the installed Paddle and
fails naming the one that moved; it also fails when code in paddle_tl, bench
or tools reads a private name (`obj._name`) that is neither paddle_tl's own
nor listed here, so this list stays the whole story.

No import of paddle here: the list is read by tests and by people.
"""

# paddle.Model's (hapi's) private attributes, read only by
# engine/model.py's GuardedModel through `self`, and what hapi (paddle 3.3)
# keeps in them; `_scaler` exists only once a model is prepared with AMP (a
# GradScaler from the first training step; None before). Checked, with their
# types on a prepared model, by tests/engine/test_model.py.
PADDLE_MODEL_PRIVATES = {"_optimizer": "paddle.optimizer.Optimizer",
                         "_metrics": "list of paddle.metric.Metric",
                         "_scaler": "paddle.amp.GradScaler or None, under AMP only"}

# Every other private Paddle name, by the attribute name as the code spells
# it: (whose it is, the files (under the repository root) that use it, why).
PADDLE_INTERNALS = {
    "_C_ops": (
        "paddle._C_ops.check_finite_and_unscale_",
        ("paddle_tl/engine/model.py",),
        "GuardedModel's finiteness check over every gradient in one fused op and one host sync "
        "(the op GradScaler uses, with scale 1); the public paddle.isfinite is one op and one sync per tensor"),
    "_scale": (
        "paddle.amp.GradScaler._scale",
        ("paddle_tl/engine/model.py",),
        "the loss scale as a tensor, which L2-SP's gradient hook multiplies its penalty's gradient by "
        "under AMP; GradScaler has no public getter for it"),
    "_BatchNormBase": (
        "paddle.nn.layer.norm._BatchNormBase",
        ("paddle_tl/transfer/freezing.py",),
        "the common base of BatchNorm1D/2D/3D (and SyncBatchNorm): how a BatchNorm layer is recognised "
        "whatever its dimensions; paddle exports no public base class"),
    "_mean": (
        "BatchNorm layers' running mean (paddle.nn.BatchNorm and _BatchNormBase)",
        ("paddle_tl/transfer/freezing.py", "paddle_tl/engine/model.py"),
        "the running statistics: kept out of the trainable parameters, and saved and put back by "
        "GuardedModel when a non-finite batch must leave them as they were"),
    "_variance": (
        "BatchNorm layers' running variance (paddle.nn.BatchNorm and _BatchNormBase)",
        ("paddle_tl/transfer/freezing.py", "paddle_tl/engine/model.py"),
        "as _mean"),
    "_use_global_stats": (
        "BatchNorm layers' use_global_stats (paddle.nn.BatchNorm and _BatchNormBase)",
        ("paddle_tl/transfer/freezing.py", "paddle_tl/engine/model.py", "paddle_tl/tasks/detection/backbone.py",
         "bench/train_throughput.py"),
        "freezing a stage's statistics: hapi calls network.train() every batch, and only "
        "use_global_stats=True keeps a frozen BatchNorm on its stored statistics in train mode; set "
        "after construction because gradual unfreezing changes it between epochs"),
    "_learning_rate": (
        "paddle.optimizer.Optimizer._learning_rate",
        ("paddle_tl/runs/checkpoint.py", "bench/train_throughput.py", "paddle_tl/tasks/detection/train.py"),
        "the optimizer's LRScheduler object (get_lr() gives only its value): its state_dict to keep a "
        "fresh schedule at its start when resuming, its step() in a hand-written loop (also detection's), "
        "and detection's budget shortening its cosine"),
    "_dygraph_tracer": (
        "paddle.base.framework._dygraph_tracer",
        ("paddle_tl/trust/gradcam.py",),
        "the dygraph tracer, whose train mode Layer.eval() changes and Grad-CAM puts back"),
    "_train_mode": (
        "paddle.base.dygraph.tracer.Tracer._train_mode",
        ("paddle_tl/trust/gradcam.py",),
        "Layer.train()/eval() set it along with the layers' `training` flags; Grad-CAM runs a training "
        "network in eval mode and must leave both as they were (a frozen BatchNorm may be in eval "
        "inside a training network, so calling network.train() after would not do)"),
}
