"""Run a supervisor that reads each fork-server answer only once the worker's hello needs it (a test hook).

``python tests/run_late_answer_supervisor.py HOME`` serves HOME with the real
workers, but its fork-server (this script run as ``--fork-server --socket-fd
...``) keeps no spare, so every worker is forked on request, and the
supervisor's loop does not poll the fork-server's socket. Each answer is then
read by the worker's hello (``Workers._on_hello`` reads it when the hello comes
first), the order a busy loop meets now and then: here, for every worker.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    if sys.argv[1:2] == ["--fork-server"]:
        from worker import _zygote

        _zygote.SPARES = False
        return _zygote.main(sys.argv[2:])
    if len(sys.argv) != 2:
        print("usage: run_late_answer_supervisor.py HOME", file=sys.stderr)
        return 2
    from supervisor import Supervisor
    from supervisor._spawner import WORKER_COMMAND
    from supervisor._workers import Workers
    from theater.home import Home

    Workers._sync_zygote_fd = lambda self: None  # type: ignore[method-assign]
    fork_server = [sys.executable, str(Path(__file__).resolve()), "--fork-server"]
    Supervisor(Home(sys.argv[1]), worker_command=WORKER_COMMAND, zygote_command=fork_server).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
