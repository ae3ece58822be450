"""Run a supervisor whose workers are ``tests/evil_worker.py MODE`` (the Python-only test hook).

Usage: ``python tests/run_supervisor.py HOME MODE``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from supervisor import Supervisor
from theater.home import Home

EVIL_WORKER = Path(__file__).resolve().parent / "evil_worker.py"


def main() -> int:
    """Serve ``HOME`` (argv[1]) with workers ``python evil_worker.py MODE`` (MODE: argv[2]) until told to stop."""
    if len(sys.argv) != 3:
        print("usage: run_supervisor.py HOME MODE", file=sys.stderr)
        return 2
    home, mode = Home(sys.argv[1]), sys.argv[2]
    Supervisor(home, worker_command=[sys.executable, str(EVIL_WORKER), mode]).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
