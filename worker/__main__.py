"""Worker entry point: read the bootstrap pipe, confine, then serve.

Launched by the supervisor as ``python -m worker --bootstrap-fd N`` (or forked
from a pre-started process that then calls :func:`run`); the pipe carries the
endpoint and the one-time spawn token, so neither appears in argv or the
environment.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from theater.errors import ProtocolError
from theater.exits import WorkerExit
from theater.forkserver import MAX_MESSAGE, Boot

if TYPE_CHECKING:
    from ._loop import Link


def run(bootstrap_fd: int, artifact: dict[str, object] | None = None,
        confinement: dict[str, str] | None = None, link: Link | None = None) -> int:
    """Read the bootstrap pipe, apply confinement, then serve the agent until stopped.

    ``artifact``: the compiled component the supervisor vouched for (see
    ``worker._engine.load_artifact``), handed over by the fork-server; None: compile.
    ``confinement`` and ``link``: the report of the hardening already applied and the
    key and connection already made (a spare worker does both before it is given an
    agent); None: do it now. (A loaded spare, which has its token and has said
    hello before it is given an agent, goes straight to ``worker._loop.serve``.)
    """
    with os.fdopen(bootstrap_fd, "rb") as pipe:
        data = pipe.read(MAX_MESSAGE + 1)
    try:
        boot = Boot.decode(data)
    except ProtocolError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return WorkerExit.PROTOCOL
    from ._harden import harden_before_connect
    from ._loop import serve  # everything the worker runs is imported before it is confined

    if confinement is None:
        confinement = harden_before_connect(boot.parent_pid, boot.endpoint)
    return serve(boot.endpoint, boot.token, confinement, artifact, link)


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] != "--bootstrap-fd":
        print("usage: python -m worker --bootstrap-fd N (started by the supervisor)", file=sys.stderr)
        return WorkerExit.USAGE
    return run(int(sys.argv[2]))


if __name__ == "__main__":
    sys.exit(main())
