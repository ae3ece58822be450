"""Worker entry point: read the bootstrap pipe, confine, then serve.

Launched by the supervisor as ``python -m worker --bootstrap-fd N`` (or forked
from a pre-started process that then calls :func:`run`); the pipe carries the
endpoint and the one-time spawn token, so neither appears in argv or the
environment.
"""

from __future__ import annotations

import json
import os
import sys


def run(bootstrap_fd: int) -> int:
    """Read the bootstrap pipe, apply confinement, then serve the agent until stopped."""
    with os.fdopen(bootstrap_fd, "rb") as pipe:
        boot = json.loads(pipe.read(65536))
    from ._harden import basic_hygiene

    confinement = basic_hygiene(int(boot["parent_pid"]))
    from ._loop import serve

    return serve(boot["endpoint"], bytes.fromhex(boot["token"]), confinement)


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] != "--bootstrap-fd":
        print("usage: python -m worker --bootstrap-fd N (started by the supervisor)", file=sys.stderr)
        return 2
    return run(int(sys.argv[2]))


if __name__ == "__main__":
    sys.exit(main())
