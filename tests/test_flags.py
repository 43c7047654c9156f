"""The one table of command-line flags that cannot combine
(paddle_tl/flags.py): every rule refuses its pair, for each command it
names, with its message, lets each side alone through, and through the
command line it is one line on stderr and exit code 2, before any file is
read (the model folders and configs below do not exist)."""

import pytest

from paddle_tl import cli
from paddle_tl.errors import ConfigError
from paddle_tl.flags import RULES, check_flags
from paddle_tl.predict import predictor

PARSERS = {"eval": cli._eval_parser, "export": cli._export_parser, "infer": predictor._parser}
M = ["--model_dir", "no_such_model", "--input", "no_such_images"]  # infer's required flags
C = ["-c", "no_such_config.yaml"]


def _id(rule, command):
    return f"{command}: {rule.first.name} x {rule.second.name}"


# Per rule and command: flags that turn both sides on, then the same with one side off (each must pass).
CASES = {
    "export: RUN_DIR x no --output": (["RUN"], [C, ["RUN", "--output", "out"]]),
    "export: --calib_images x no --int8": ([*C, "--calib_images", "50"], [C, [*C, "--int8", "--calib_images", "50"]]),
    "export: --max_drop x no --int8": ([*C, "--max_drop", "0.02"], [C, [*C, "--int8", "--max_drop", "0.02"]]),
    "export: --int8 x --onnx": ([*C, "--int8", "--onnx"], [[*C, "--int8"], [*C, "--onnx"]]),
    "eval: no -c x no RUN_DIR": ([], [C, ["RUN"]]),
    "export: no -c x no RUN_DIR": ([], [C, ["RUN", "--output", "out"]]),
    "eval: RUN_DIR x -c": (["RUN", *C], [["RUN"], C]),
    "export: RUN_DIR x -c": (["RUN", "--output", "out", *C], [["RUN", "--output", "out"], C]),
    "infer: --run x no --cam": ([*M, "--run", "RUN"], [M, [*M, "--run", "RUN", "--cam", "cams"]]),
    "infer: --backend onnx x --device gpu": ([*M, "--backend", "onnx", "--device", "gpu"],
                                             [[*M, "--device", "gpu"], [*M, "--backend", "onnx"]]),
    "infer: --backend onnx x --gpu_mem": ([*M, "--backend", "onnx", "--gpu_mem", "512"],
                                          [[*M, "--device", "gpu", "--gpu_mem", "512"], [*M, "--backend", "onnx"]]),
    "infer: --backend onnx x --trt": ([*M, "--backend", "onnx", "--trt", "fp16"],
                                      [[*M, "--device", "gpu", "--trt", "fp16"], [*M, "--backend", "onnx"]]),
    "infer: --gpu_mem x --device cpu": ([*M, "--gpu_mem", "512", "--device", "cpu"],
                                        [[*M, "--gpu_mem", "512", "--device", "gpu"], M]),
    "infer: --trt x --device cpu": ([*M, "--trt", "fp32"], [[*M, "--trt", "fp32", "--device", "gpu"], M]),
}
# --eval and --benchmark print one JSON object: the per-image flags are refused with either.
# (--reject_below 0 labels nothing "unknown", and is still refused: it is given.)
for mode in ("--eval", "--benchmark"):
    for flag, value in (("--output", "out.jsonl"), ("--csv", "out.csv"), ("--reject_below", "0"), ("--cam", "cams")):
        CASES[f"infer: {mode} x {flag}"] = ([*M, mode, flag, value], [[*M, flag, value], [*M, mode]])

PAIRS = [(rule, command) for rule in RULES for command in rule.commands]


def test_every_rule_has_its_cases_and_every_command_its_parser():
    assert sorted(CASES) == sorted(_id(rule, command) for rule, command in PAIRS)
    assert {command for _, command in PAIRS} == set(PARSERS)


@pytest.mark.parametrize("rule, command", PAIRS, ids=[_id(*pair) for pair in PAIRS])
def test_a_refused_pair_gives_its_message_and_each_side_alone_passes(rule, command):
    on, alone = CASES[_id(rule, command)]
    args = PARSERS[command]().parse_args(on)
    assert rule.refuses(args)
    with pytest.raises(ConfigError) as refused:
        check_flags(command, args)
    assert str(refused.value) == rule.message
    for argv in alone:
        check_flags(command, PARSERS[command]().parse_args(argv))


@pytest.mark.parametrize("rule, command", PAIRS, ids=[_id(*pair) for pair in PAIRS])
def test_the_command_line_refuses_it_in_one_line_before_reading_anything(rule, command, capsys):
    on, _ = CASES[_id(rule, command)]
    assert cli.main([command, *on]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {rule.message}"]
