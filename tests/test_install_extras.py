"""The set-up command is written in three places: install.sh runs it, the
README quotes it verbatim and tables the extras, setup.py defines them.
They drift apart silently; this keeps them in step."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def setup_extras():
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    [node] = [n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "EXTRAS"]
    return set(ast.literal_eval(node.value))


def test_readme_quotes_install_sh_default_extras_and_tables_every_extra():
    default = re.search(r'\$\{EXTRAS:-([a-z,]+)\}', (REPO / "install.sh").read_text(encoding="utf-8")).group(1)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f'python -m pip install -e ".[{default}]"' in readme
    assert set(default.split(",")) <= setup_extras()
    tabled = set(re.findall(r"^\| `([a-z]+)` \|", readme, flags=re.M))
    assert setup_extras() <= tabled
    assert "detect" in default.split(",")  # detection's AP (pycocotools) is part of the default set-up
