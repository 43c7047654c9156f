"""Every error a user can fix by changing their input (config, data,
weights, paths, the machine's room). The command line prints these as one
line, without a traceback; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    pass


class ConfigError(UserError, ValueError):
    """A config that cannot be run; the message names the offending key."""


class DataError(UserError, ValueError):
    """Data that cannot be trained on; the message names the file or folder."""


class WeightsError(UserError, ValueError):
    """Pretrained weights could not be found, read, or fitted to the model."""


class TorchCheckpointError(UserError, ValueError):
    """The file is not a checkpoint we can read, or it is not safe to read."""


class DiskFullError(UserError, OSError):
    """No room on the device for the run's files; the message names the file or folder."""


class PaddleMissingError(UserError, ImportError):
    """PaddlePaddle is not installed; the message says how to install it."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, torn, or does not fit the model."""


class NonFiniteError(UserError, FloatingPointError):
    """A NaN/Inf loss or gradient stopped the run (Global.nan_policy)."""


class OutOfMemoryError(UserError):
    """Training ran out of (GPU) memory; the message says what to lower."""


class ExportError(UserError, RuntimeError):
    """An inference folder that cannot be written, verified or read."""


class NotWritableError(UserError, PermissionError):
    """A folder that cannot be written (read-only, or another user's); the message names it."""
