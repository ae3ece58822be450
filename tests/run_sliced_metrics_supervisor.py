"""Run a supervisor whose /metrics snapshot takes two agents a loop turn (a test hook).

``python tests/run_sliced_metrics_supervisor.py HOME`` serves HOME with
``--metrics 127.0.0.1:0`` and ``SNAPSHOT_SLICE`` of 2, so a handful of agents
already make a snapshot in several turns, as thousands do with the real slice.
"""

from __future__ import annotations

import sys


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: run_sliced_metrics_supervisor.py HOME", file=sys.stderr)
        return 2
    from supervisor import Supervisor, _usage
    from theater.home import Home

    _usage.SNAPSHOT_SLICE = 2
    Supervisor(Home(sys.argv[1]), metrics=("127.0.0.1", 0)).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
