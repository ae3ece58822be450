"""Run a supervisor whose workers are ``tests/probe_worker.py LAYERS`` (the Python-only test hook).

Usage: ``python tests/run_probe_supervisor.py HOME LAYERS``; tests run it as root
and, through ``setpriv``, as an unprivileged user.
"""

from __future__ import annotations

import sys
from pathlib import Path

from run_supervisor import main

PROBE_WORKER = Path(__file__).resolve().parent / "probe_worker.py"


if __name__ == "__main__":
    sys.exit(main(PROBE_WORKER, "run_probe_supervisor.py HOME LAYERS"))
