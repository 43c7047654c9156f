"""`python tools/serve.py ...` is `paddle-tl serve ...` (see paddle_tl/cli.py)."""

import os
import sys

# Let the script run from a checkout that was not pip-installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paddle_tl.cli import main  # noqa: E402

# Guarded: with --workers N, uvicorn's worker processes are spawned and import this file again.
if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
