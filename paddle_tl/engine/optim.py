"""Optimizer and learning-rate schedule from the Optimizer section.

Schedules count optimizer steps, not epochs: `paddle.Model.fit` installs a
callback that steps the scheduler after every batch.
"""

from paddle_tl.runtime import import_paddle

paddle = import_paddle()
lr_schedules = paddle.optimizer.lr


def _constant(_step):
    return 1.0


def build_scheduler(lr_cfg, steps_per_epoch, epochs):
    base = lr_cfg.learning_rate
    total = max(1, steps_per_epoch * epochs)
    warmup = min(total - 1, round(lr_cfg.warmup_epochs * steps_per_epoch))
    if lr_cfg.name == "Cosine":
        schedule = lr_schedules.CosineAnnealingDecay(base, T_max=max(1, total - warmup))
    elif lr_cfg.name == "Step":
        schedule = lr_schedules.StepDecay(base, step_size=lr_cfg.step_epochs * steps_per_epoch,
                                          gamma=lr_cfg.gamma)
    else:
        schedule = lr_schedules.LambdaDecay(base, _constant)
    if warmup > 0:
        schedule = lr_schedules.LinearWarmup(schedule, warmup_steps=warmup,
                                             start_lr=lr_cfg.warmup_start_lr, end_lr=base)
    return schedule


def build_optimizer(opt_cfg, parameters, steps_per_epoch, epochs):
    schedule = build_scheduler(opt_cfg.lr, steps_per_epoch, epochs)
    common = dict(learning_rate=schedule, parameters=parameters,
                  weight_decay=opt_cfg.weight_decay)
    if opt_cfg.name == "Momentum":
        return paddle.optimizer.Momentum(momentum=opt_cfg.momentum, **common)
    if opt_cfg.name == "SGD":
        return paddle.optimizer.SGD(**common)
    if opt_cfg.name == "Adam":
        return paddle.optimizer.Adam(**common)
    return paddle.optimizer.AdamW(**common)
