"""`python tools/check_labels.py ...` is `paddle-tl check-labels ...` (see paddle_tl/cli.py)."""

import os
import sys

# Let the script run from a checkout that was not pip-installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paddle_tl.cli import main  # noqa: E402

sys.exit(main(["check-labels", *sys.argv[1:]]))
