"""`paddle-tl train|eval|export|infer|check-data|report`: the one
command-line front end; the `tools/*.py` scripts call it with their
sub-command."""

import argparse
import json
import logging
import sys

from paddle_tl.errors import UserError


def _config_parser(prog, description):
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-c", "--config", required=True, help="YAML config file")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="Section.key=value",
                        help="override a config value (repeatable), e.g. -o Global.epochs=3")
    return parser


def _load(args):
    from paddle_tl.config import load_config
    return load_config(args.config, args.override)


def run_train(argv):
    args = _config_parser("paddle-tl train", "Fine-tune a pretrained network.").parse_args(argv)
    from paddle_tl.engine.train import train
    train(_load(args))


def run_eval(argv):
    args = _config_parser("paddle-tl eval", "Evaluate Global.pretrained_model on the Eval split.").parse_args(argv)
    from paddle_tl.engine.evaluate import evaluate
    result = evaluate(_load(args))
    print(json.dumps(result))


def run_export(argv):
    parser = _config_parser("paddle-tl export", "Export a static inference model.")
    parser.add_argument("--onnx", action="store_true",
                        help="also write inference.onnx (paddle2onnx; needs the onnx extra) and check its parity")
    args = parser.parse_args(argv)
    from paddle_tl.deploy.export import export
    export(_load(args), onnx=args.onnx)


def run_check_data(argv):
    parser = _config_parser("paddle-tl check-data", "Summarise and check the Train and Eval data.")
    parser.add_argument("--output", default="data_check", help="folder for data_check.json and the histogram")
    args = parser.parse_args(argv)
    from paddle_tl.data.check import check_data, format_table
    report = check_data(_load(args), args.output)
    print(format_table(report))
    print(f"report: {args.output}/data_check.json, {args.output}/class_histogram.png")


def run_report(argv):
    from paddle_tl.engine.report import report_command
    report_command(argv)


def run_infer(argv):
    from paddle_tl.predict.predictor import main as infer_main
    infer_main(argv)


COMMANDS = {"train": run_train, "eval": run_eval, "export": run_export, "infer": run_infer,
            "check-data": run_check_data, "report": run_report}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: paddle-tl {{{','.join(COMMANDS)}}} [options]  (paddle-tl COMMAND -h for help)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        COMMANDS[argv[0]](argv[1:])
    except UserError as exc:  # bad input gets one clear line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
