"""The Theater supervisor: the trusted process that owns agents, their chains and their workers.

Private modules (``_*.py``) hold the engine; this package exports only what the
CLI and tests use.
"""

from ._config import AgentConfig, Policy, load_manifest, load_policy
from ._errors import ConfigError, NotFound, Refused, StoreError, SupervisorError
from ._server import Supervisor

__all__ = [
    "AgentConfig",
    "ConfigError",
    "NotFound",
    "Policy",
    "Refused",
    "StoreError",
    "Supervisor",
    "SupervisorError",
    "load_manifest",
    "load_policy",
]
