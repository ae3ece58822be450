"""Worker entry point: read the bootstrap pipe, confine, then serve.

Launched by the supervisor as ``python -m worker --bootstrap-fd N``; the pipe
carries the endpoint and the one-time spawn token, so neither appears in argv
or the environment.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] != "--bootstrap-fd":
        print("usage: python -m worker --bootstrap-fd N (started by the supervisor)", file=sys.stderr)
        return 2
    fd = int(sys.argv[2])
    with os.fdopen(fd, "rb") as pipe:
        boot = json.loads(pipe.read(4096))
    from ._harden import basic_hygiene

    confinement = basic_hygiene(int(boot["parent_pid"]))
    from ._loop import serve

    return serve(boot["endpoint"], bytes.fromhex(boot["token"]), confinement)


if __name__ == "__main__":
    sys.exit(main())
