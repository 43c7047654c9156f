"""Training: `train()` builds the run from its parts and fits it with
`paddle.Model` and callbacks, writing the run folder (paddle_tl/runs/);
evaluation and the report read a finished run back."""
