"""Which command-line flags combine: every pair of flags a command refuses,
in one table that tests enumerate (tests/test_flags.py).

A command checks its arguments against the table right after argparse has
read them (`check_flags`), before any file is read, and a refused pair is one
line on stderr (`error: ...`, exit code 2) like every other refusal. Pairs of
config settings (`-o` overrides included) are in combinations.py; a flag
refused on its own (`--folds 1`, `--calib_images 0`) stays with its parser,
and a flag refused for what the model folder holds (`--backend onnx` or
`--device gpu` for an INT8 folder) where the folder is read
(predict/predictor.py, models/static.py). argparse itself refuses
`--eval` with `--benchmark` (a mutually exclusive group).
"""

from dataclasses import dataclass
from typing import Callable

from paddle_tl.errors import ConfigError


@dataclass(frozen=True)
class Flag:
    """One side of a rule: the flag as a user writes it, and whether the
    parsed arguments have it."""
    name: str
    given: Callable[[object], bool]


@dataclass(frozen=True)
class FlagRule:
    commands: tuple  # the paddle-tl commands whose arguments it checks
    first: Flag
    second: Flag
    message: str  # what the user reads: both flags, and what to do instead

    def refuses(self, args):
        return bool(self.first.given(args) and self.second.given(args))


def _set(dest, name=None):
    """A flag given on the command line (store_true flags: true; others: not None)."""
    return Flag(name or f"--{dest}", lambda args: _given(getattr(args, dest)))


def _named(dest):
    """A flag given a name that is not empty (a file or folder)."""
    return Flag(f"--{dest}", lambda args: bool(getattr(args, dest)))


def _unset(dest, name=None):
    return Flag(f"no {name or f'--{dest}'}", lambda args: not _given(getattr(args, dest)))


def _given(value):
    return value is not None and value is not False  # not `in (None, False)`: 0 == False (--reject_below 0)


def _equal(dest, value):
    return Flag(f"--{dest} {value}", lambda args: getattr(args, dest) == value)


RUN_DIR, NO_RUN_DIR = _set("run_dir", "RUN_DIR"), _unset("run_dir", "RUN_DIR")
CONFIG, NO_CONFIG = _set("config", "-c"), _unset("config", "-c")
NO_INT8 = _unset("int8")
# What --eval and --benchmark (one JSON object, not a row per image) refuse.
PER_IMAGE_ONLY = (((_named("output"), _named("csv")), "--output and --csv record per-image predictions; they do "
                                                      "not apply to --eval or --benchmark"),
                  ((_set("reject_below"),), "--reject_below labels per-image predictions; it does not apply to "
                                            "--eval or --benchmark"),
                  ((_named("cam"),), "--cam draws per-image heat maps; it does not apply to --eval or --benchmark"))
ONNX_ON_CPU = ("--backend onnx runs on CPU (onnxruntime's CPUExecutionProvider); --device gpu, --gpu_mem and --trt "
               "are for --backend paddle")
GPU_ONLY = "--gpu_mem and --trt apply only with --device gpu"

RULES = (
    # export
    FlagRule(("export",), RUN_DIR, _unset("output"), "--output DIR is required with RUN_DIR"),
    FlagRule(("export",), _set("calib_images"), NO_INT8, "--calib_images and --max_drop apply only with --int8"),
    FlagRule(("export",), _set("max_drop"), NO_INT8, "--calib_images and --max_drop apply only with --int8"),
    FlagRule(("export",), _set("int8"), _set("onnx"),
             "--int8 writes a model for Paddle Inference with oneDNN INT8; export --onnx into another folder"),
    # eval and export: a run folder or a config
    FlagRule(("eval", "export"), NO_CONFIG, NO_RUN_DIR, "-c/--config is required (or give a run folder: RUN_DIR)"),
    FlagRule(("eval", "export"), RUN_DIR, CONFIG, "give either RUN_DIR or -c CONFIG, not both"),
    # infer
    *(FlagRule(("infer",), _set(mode), flag, message)
      for flags, message in PER_IMAGE_ONLY for flag in flags for mode in ("eval", "benchmark")),
    FlagRule(("infer",), _named("run"), Flag("no --cam", lambda args: not args.cam),
             "--run names the checkpoint for --cam; give --cam DIR too"),
    FlagRule(("infer",), _equal("backend", "onnx"), _equal("device", "gpu"), ONNX_ON_CPU),
    FlagRule(("infer",), _equal("backend", "onnx"), _set("gpu_mem"), ONNX_ON_CPU),
    FlagRule(("infer",), _equal("backend", "onnx"), _set("trt"), ONNX_ON_CPU),
    FlagRule(("infer",), _set("gpu_mem"), _equal("device", "cpu"), GPU_ONLY),
    FlagRule(("infer",), _set("trt"), _equal("device", "cpu"), GPU_ONLY),
)


def check_flags(command, args):
    """Raise ConfigError for the first pair of `command`'s parsed arguments
    `args` that the table refuses."""
    for rule in RULES:
        if command in rule.commands and rule.refuses(args):
            raise ConfigError(rule.message)
