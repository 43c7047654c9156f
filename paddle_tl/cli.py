"""`paddle-tl train|eval|export|infer|serve|check-data|report|cv|check-labels`: the one
command-line front end; the `tools/*.py` scripts call it with their
sub-command."""

import argparse
import json
import logging
import sys

from paddle_tl.errors import ConfigError, UserError
from paddle_tl.flags import check_flags


def _config_parser(prog, description, run_dir=False):
    """run_dir: the command also takes a finished run folder instead of -c
    (`paddle-tl eval RUN_DIR`), told apart by the positional argument."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if run_dir:
        parser.add_argument("run_dir", nargs="?", metavar="RUN_DIR",
                            help="a finished run folder: its config.yaml and best_model, instead of -c")
    parser.add_argument("-c", "--config", required=not run_dir, help="YAML config file")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="Section.key=value",
                        help="override a config value (repeatable), e.g. -o Global.epochs=3")
    return parser


def _load(args, extra=()):
    """The config of `-c CONFIG -o ...`, or of `RUN_DIR -o ...` (one or the
    other: flags.py); `extra`: overrides from the command's own options,
    applied last."""
    from paddle_tl.config import load_config
    run_dir = getattr(args, "run_dir", None)
    if run_dir is None:
        return load_config(args.config, [*args.override, *extra])
    from paddle_tl.runs.run_folder import run_config
    return run_config(run_dir, [*args.override, *extra])


def _eval_data(folder):
    from paddle_tl.runs.run_folder import eval_data_overrides
    return eval_data_overrides(folder) if folder is not None else []


def run_train(argv):
    args = _config_parser("paddle-tl train", "Fine-tune a pretrained network.").parse_args(argv)
    cfg = _load(args)
    if cfg.Global.task == "detection":
        from paddle_tl.tasks.detection.train import train
    else:
        from paddle_tl.engine.train import train
    train(cfg)


def _eval_parser():
    parser = _config_parser("paddle-tl eval", "Evaluate Global.pretrained_model (or RUN_DIR's best_model) "
                                              "on the Eval split.", run_dir=True)
    parser.add_argument("--data", metavar="FOLDER",
                        help="evaluate on this folder of class sub-folders instead of the Eval dataset")
    return parser


def run_eval(argv):
    args = _eval_parser().parse_args(argv)
    check_flags("eval", args)
    cfg = _load(args, _eval_data(args.data))
    if cfg.Global.task == "detection":
        from paddle_tl.tasks.detection.evaluate import evaluate_checkpoint as evaluate
    else:
        from paddle_tl.engine.evaluate import evaluate
    print(json.dumps(evaluate(cfg)))


def _export_parser():
    parser = _config_parser("paddle-tl export", "Export a static inference model of Global.pretrained_model "
                                                "(or RUN_DIR's best_model).", run_dir=True)
    parser.add_argument("--output", metavar="DIR",
                        help="the inference folder (Global.save_inference_dir); required with RUN_DIR")
    parser.add_argument("--onnx", action="store_true",
                        help="also write inference.onnx (paddle2onnx; needs the onnx extra) and check its parity")
    parser.add_argument("--int8", action="store_true",
                        help="write an INT8 model instead (post-training quantization, Paddle Inference with "
                             "oneDNN INT8), published only when its Eval top-1 is within --max_drop of fp32's")
    parser.add_argument("--calib_images", type=int, default=None,
                        help="--int8: Train images to calibrate on (default 200)")
    parser.add_argument("--max_drop", type=float, default=None,
                        help="--int8: largest fp32 - INT8 Eval top-1 allowed (default 0.01)")
    return parser


def run_export(argv):
    parser = _export_parser()
    args = parser.parse_args(argv)
    check_flags("export", args)
    if args.calib_images is not None and args.calib_images < 1:
        parser.error(f"--calib_images must be >= 1, got {args.calib_images}")
    output = [f"Global.save_inference_dir={args.output}"] if args.output is not None else []
    cfg = _load(args, output)
    if cfg.Global.task == "detection":
        if args.int8 or args.onnx:
            raise ConfigError(f"{'--int8' if args.int8 else '--onnx'}: not for a detection model yet; export it "
                              "without (a static Paddle Inference model)")
        from paddle_tl.tasks.detection.export import export_detector
        export_detector(cfg)
        return
    if args.int8:
        from paddle_tl.deploy.quantize import export_int8
        export_int8(cfg, calib_images=200 if args.calib_images is None else args.calib_images,
                    max_drop=0.01 if args.max_drop is None else args.max_drop)
        return
    from paddle_tl.deploy.export import export
    export(cfg, onnx=args.onnx)


def run_check_data(argv):
    parser = _config_parser("paddle-tl check-data", "Summarise and check the Train and Eval data.")
    parser.add_argument("--output", default="data_check", help="folder for data_check.json and the histogram")
    args = parser.parse_args(argv)
    cfg = _load(args)
    if cfg.Global.task == "detection":
        from paddle_tl.tasks.detection.check import check_config, format_table
        print(format_table(check_config(cfg, args.output)))
        print(f"report: {args.output}/data_check.json")
        return
    from paddle_tl.data.check import check_data, format_table
    report = check_data(cfg, args.output)
    print(format_table(report))
    print(f"report: {args.output}/data_check.json, {args.output}/class_histogram.png")


def _folds_parser(prog, description):
    """A config parser with --folds K (at least 2)."""
    parser = _config_parser(prog, description)
    parser.add_argument("--folds", type=int, default=5, metavar="K", help="stratified folds (default 5)")
    return parser


def _parse_folds(parser, argv):
    args = parser.parse_args(argv)
    if args.folds < 2:
        parser.error(f"--folds must be at least 2, got {args.folds}")
    return args


def run_cv(argv):
    parser = _folds_parser("paddle-tl cv", "Stratified k-fold cross-validation of the configured training over "
                                           "the Train images: per-fold top-1, mean, std and 95% CI.")
    args = _parse_folds(parser, argv)
    from paddle_tl.trust.cv import cross_validate
    result = cross_validate(_load(args), args.folds)
    print(json.dumps({key: value for key, value in result.items() if key != "per_fold"}))


def run_check_labels(argv):
    parser = _folds_parser("paddle-tl check-labels", "Rank the Train images by how likely their label is wrong "
                                                     "(out-of-fold probabilities + confident learning).")
    args = _parse_folds(parser, argv)
    from paddle_tl.trust.label_issues import check_labels, import_cleanlab
    import_cleanlab()  # a missing package is said before the config and the data are read
    print(json.dumps(check_labels(_load(args), args.folds)))


def run_report(argv):
    from paddle_tl.engine.report import report_command
    report_command(argv)


def run_infer(argv):
    from paddle_tl.predict.predictor import main as infer_main
    infer_main(argv)


def run_serve(argv):
    from paddle_tl.predict.serve import main as serve_main
    serve_main(argv)


COMMANDS = {"train": run_train, "eval": run_eval, "export": run_export, "infer": run_infer, "serve": run_serve,
            "check-data": run_check_data, "report": run_report, "cv": run_cv, "check-labels": run_check_labels}


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
