"""The table the benchmarks over seeds print: a row per recipe with its Eval
top-1 per seed and their mean, then the mean of each further measure."""

import statistics


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
