"""Training and the run folder: `train()` builds the run from its parts and
fits it with `paddle.Model` and callbacks; checkpoints, evaluation and the
report read the run folder back."""
