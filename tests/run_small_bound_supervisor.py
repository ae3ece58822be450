"""Run a supervisor whose tenants' mailboxes hold at most BYTES bytes together (not 256 MiB).

``python tests/run_small_bound_supervisor.py HOME BYTES`` serves HOME with the real
workers, ``TENANT_QUEUED_BYTES`` set to BYTES, so a test reaches the bound with a
few messages.
"""

from __future__ import annotations

import sys


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: run_small_bound_supervisor.py HOME BYTES", file=sys.stderr)
        return 2
    from supervisor import Supervisor, _agent
    from theater.home import Home

    _agent.TENANT_QUEUED_BYTES = int(sys.argv[2])
    Supervisor(Home(sys.argv[1])).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
