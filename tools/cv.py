"""`python tools/cv.py ...` is `paddle-tl cv ...` (see paddle_tl/cli.py)."""

import os
import sys

# Let the script run from a checkout that was not pip-installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paddle_tl.cli import main  # noqa: E402

sys.exit(main(["cv", *sys.argv[1:]]))
