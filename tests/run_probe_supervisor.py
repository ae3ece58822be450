"""Run a supervisor whose workers are ``tests/probe_worker.py LAYERS`` (the Python-only test hook).

Usage: ``python tests/run_probe_supervisor.py HOME LAYERS``; tests run it as root
and, through ``setpriv``, as an unprivileged user.
"""

from __future__ import annotations

import sys
from pathlib import Path

from supervisor import Supervisor
from theater.home import Home

PROBE_WORKER = Path(__file__).resolve().parent / "probe_worker.py"


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: run_probe_supervisor.py HOME LAYERS", file=sys.stderr)
        return 2
    home, layers = Home(sys.argv[1]), sys.argv[2]
    Supervisor(home, worker_command=[sys.executable, str(PROBE_WORKER), layers]).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
