"""A short chaos soak (scripts/soak.py, small): random worker kills and a supervisor SIGKILL mid-traffic,
over WAT agents and one Python agent.

Every reply a client received must be in the agent's chain, every chain must
verify, every agent must be running again, and nothing of the home may be left
running after `down`. The long run is `scripts/soak`; its figures are in
docs/reliability.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"


def test_a_short_soak_loses_nothing_acknowledged() -> None:
    run = subprocess.run([sys.executable, str(SOAK), "--agents", "10", "--messages", "2000", "--clients", "3",
                          "--kill-every", "0.1", "--python", "1", "--json"], capture_output=True, text=True, timeout=300)
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert run.returncode == 0 and figures["ok"], (figures, run.stderr[-2000:])
    assert figures["acknowledged_but_lost"] == 0 and figures["chains_broken"] == 0
    assert figures["agents_not_running"] == 0 and figures["processes_left"] == []
    assert figures["worker_kills_before"] + figures["worker_kills_after"] > 0  # the chaos happened
    assert figures["answered"] > 0 and figures["python_agents"] == 1
