"""Run a supervisor whose compile jobs wait for the test, with a hello deadline of a fifth of a second.

``python tests/run_held_compile_supervisor.py HOME GATE`` serves HOME with the
real workers; its fork-server is this script run as ``--fork-server GATE
--socket-fd ...``, whose compile jobs each open the FIFO ``GATE`` before they
compile, so a compile lasts until the test opens it for writing. Each time a
worker's hello deadline is reached, the supervisor logs ``hello deadline
reached for NAME``, so the test knows the deadline passed during the compile.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    if sys.argv[1:2] == ["--fork-server"]:
        from worker import _zygote

        gate, compile_job = sys.argv[2], _zygote._compile_job

        def held_job(request: object, result_fd: int) -> None:
            with open(gate, "rb") as f:  # blocks until the test opens the FIFO for writing
                f.read()
            compile_job(request, result_fd)  # type: ignore[arg-type]

        _zygote._compile_job = held_job  # type: ignore[assignment]
        return _zygote.main(sys.argv[3:])
    if len(sys.argv) != 3:
        print("usage: run_held_compile_supervisor.py HOME GATE", file=sys.stderr)
        return 2
    from supervisor import Supervisor, _workers
    from supervisor._spawner import WORKER_COMMAND
    from theater.home import Home

    _workers.HELLO_TIMEOUT_S, _workers.COMPILE_CHECK_S = 0.2, 0.05
    hello_timeout = _workers.Workers._hello_timeout

    def traced(self: _workers.Workers, agent: object, worker: object) -> None:
        self.log(f"hello deadline reached for {agent.name}")  # type: ignore[attr-defined]
        hello_timeout(self, agent, worker)  # type: ignore[arg-type]

    _workers.Workers._hello_timeout = traced  # type: ignore[method-assign,assignment]
    fork_server = [sys.executable, str(Path(__file__).resolve()), "--fork-server", sys.argv[2]]
    Supervisor(Home(sys.argv[1]), worker_command=WORKER_COMMAND, zygote_command=fork_server).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
