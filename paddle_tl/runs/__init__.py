"""The run folder (Global.output_dir): the interface between training and
everything after it (evaluation, export, the report, distillation, the
predictor's `--run`). Training writes it; the rest read it through this
package, so none of them imports the trainer.

    best_model.pdparams / .state.json   the model selected on the validation split (checkpoint.py)
    latest.pdparams / .pdopt / .state.json   where a killed run resumes from
    config.yaml                         the resolved config of the run
    metrics.json                        what the run measured
    auto.json                           what `auto` measured and chose (a resume reuses it)
    vdl/                                VisualDL logs

Their names are the constants below; the checkpoint format is checkpoint.py's,
creating and reading the folder back run_folder.py's.
"""

BEST_MODEL = "best_model"  # a checkpoint prefix
LATEST = "latest"  # a checkpoint prefix
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
AUTO_RECORD = "auto.json"
VDL_DIR = "vdl"
