"""Benchmarks over seeds: the runs (each recipe with each seed), and the
table they print: a row per recipe with its Eval top-1 per seed and their
mean, then the mean of each further measure."""

import statistics
import tempfile
from pathlib import Path

from paddle_tl.config import load_config
from paddle_tl.engine import train as train_module


def train_over_seeds(config, recipes, seeds, common):
    """{recipe: [(Eval top-1, training seconds) of each seed]}: `config`
    trained with the `common` overrides, then each recipe's, for each seed,
    in a temporary folder, without the report (it is not measured)."""
    train_module.write_report = lambda run_dir: run_dir
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for name, overrides in recipes.items():
            for seed in seeds:
                metrics = train_module.train(load_config(config, [
                    f"Global.output_dir={Path(out) / f'{len(rows)}-{seed}'}", f"Global.seed={seed}", *common,
                    *overrides]))
                rows.setdefault(name, []).append((metrics["best_top1"], metrics["train_seconds"]))
    return rows


def print_seed_table(title, first_column, rows, measures):
    """rows: {recipe: [(Eval top-1, *measures) of each seed]}; measures:
    [(column header, format spec)] of the values after top-1."""
    print(f"\n{title}")
    headers = [first_column, "Eval top-1 per seed", "mean", *(header for header, _ in measures)]
    print("| " + " | ".join(headers) + " |")
    print("| " + " | ".join("---" for _ in headers) + " |")
    for recipe, results in rows.items():
        tops = [result[0] for result in results]
        means = [format(statistics.mean(result[i + 1] for result in results), spec)
                 for i, (_, spec) in enumerate(measures)]
        print(f"| {recipe} | {' / '.join(f'{t:.4f}' for t in tops)} | {statistics.mean(tops):.4f} | "
              + " | ".join(means) + " |")
