"""Data flows one way: config -> model + data -> trainer -> run folder ->
export -> predictor. What reads a finished run (deploy, predict, transfer,
the run folder itself) does so through paddle_tl/runs and imports no
trainer (paddle_tl.engine); this fails naming the module that does."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "paddle_tl"
# trust/cv.py runs the training recipe once per fold, by design: it is a trainer's client.
READERS = ("runs", "deploy", "predict", "transfer", "models", "data")


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_what_reads_a_run_imports_no_trainer():
    offenders = [f"{path.relative_to(PACKAGE.parent)} imports {module}"
                 for package in READERS for path in sorted((PACKAGE / package).glob("*.py"))
                 for module in _imports(path) if module == "paddle_tl.engine" or module.startswith("paddle_tl.engine.")]
    assert not offenders, "\n".join(offenders)


def test_the_run_folder_names_are_typed_out_once():
    """The run folder's file names are constants in paddle_tl/runs/__init__.py;
    a module that spells one out again would drift from it."""
    names = ('"best_model"', '"latest"', '"metrics.json"', '"config.yaml"', '"auto.json"')
    offenders = [f"{path.relative_to(PACKAGE.parent)} spells {name}"
                 for path in sorted(PACKAGE.rglob("*.py")) if path != PACKAGE / "runs" / "__init__.py"
                 for name in names if name in path.read_text()]
    assert not offenders, "\n".join(offenders)
