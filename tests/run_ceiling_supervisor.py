"""Run a supervisor whose fork-server gives compile jobs a tiny ceiling (the Python-only test hook).

``python tests/run_ceiling_supervisor.py HOME cpu|memory`` serves HOME with the
real workers; its fork-server is this script run as ``--fork-server cpu|memory
--socket-fd ...``, which lowers the compile jobs' CPU-time ceiling to 1 s or
their address-space ceiling to 64 MiB (far below what the fork-server has
mapped) before it serves, so every compile job hits it. With ``cpu`` the
compile job also spins instead of compiling, so it meets its ceiling however
fast the compile would have been, and first writes its OOM score adjustment to
the supervisor's output.
"""

from __future__ import annotations

import sys
from pathlib import Path

CEILINGS = {"cpu": ("COMPILE_CPU_S", 1), "memory": ("COMPILE_AS_BYTES", 64 * 1024 * 1024)}


def main() -> int:
    if sys.argv[1:2] == ["--fork-server"]:
        from worker import _zygote

        name, value = CEILINGS[sys.argv[2]]
        setattr(_zygote, name, value)
        if sys.argv[2] == "cpu":
            # A compile of a small component can end before the kernel next looks at the job's CPU
            # time; a job that spins instead of compiling always meets the ceiling. Only the job
            # spins: the waiting worker then compiles the component itself, as usual.
            compile_job = _zygote._compile_job

            def spinning_job(request: object, result_fd: int) -> None:
                from worker import _engine

                def spin(*_args: object) -> object:
                    with open("/proc/self/oom_score_adj") as f:  # what the test checks of a compile job
                        print(f"compile job oom_score_adj {f.read().strip()}", file=sys.stderr, flush=True)
                    while True:
                        pass

                _engine.compile_component = spin  # type: ignore[assignment]
                compile_job(request, result_fd)  # type: ignore[arg-type]

            _zygote._compile_job = spinning_job  # type: ignore[assignment]
        return _zygote.main(sys.argv[3:])
    if len(sys.argv) != 3 or sys.argv[2] not in CEILINGS:
        print("usage: run_ceiling_supervisor.py HOME cpu|memory", file=sys.stderr)
        return 2
    from supervisor import Supervisor
    from supervisor._spawner import WORKER_COMMAND
    from theater.home import Home

    fork_server = [sys.executable, str(Path(__file__).resolve()), "--fork-server", sys.argv[2]]
    Supervisor(Home(sys.argv[1]), worker_command=WORKER_COMMAND, zygote_command=fork_server).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
