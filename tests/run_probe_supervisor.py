"""Run a supervisor whose workers are ``tests/probe_worker.py LAYERS`` (the Python-only test hook).

Usage: ``python tests/run_probe_supervisor.py HOME LAYERS [fork-server]``; tests run it
as root and, through ``setpriv``, as an unprivileged user. With ``fork-server`` the
workers are forked by a fork-server that carries the same hooks, as real workers are.
"""

from __future__ import annotations

import sys
from pathlib import Path

from supervisor import Supervisor
from theater.home import Home

PROBE_WORKER = Path(__file__).resolve().parent / "probe_worker.py"


def main() -> int:
    if len(sys.argv) not in (3, 4) or sys.argv[3:] not in ([], ["fork-server"]):
        print("usage: run_probe_supervisor.py HOME LAYERS [fork-server]", file=sys.stderr)
        return 2
    home, layers = Home(sys.argv[1]), sys.argv[2]
    command = [sys.executable, str(PROBE_WORKER), layers]
    Supervisor(home, worker_command=command, zygote_command=command if sys.argv[3:] else None).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
