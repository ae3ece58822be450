"""What one client may see: the operator sees the whole home, a tenant only its own agents and nodes.

A tenant writes its agents' names without its prefix (``counter`` for
``acme:counter``); an agent or node of another tenant is "not found", exactly as
one that does not exist, and the attempt is recorded as a denial. Its own agent
by its full name is not found either, with a hint, and is no denial.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from ._agent import Agent, Member
from ._config import OPERATOR, TENANT_SEP
from ._errors import NotFound
from ._tenants import Tenants, local_name

if TYPE_CHECKING:
    from ._trees import Supervision

__all__ = ["Scope", "localized"]

_NAME_KEYS = ("name", "parent", "agent", "owner")


class Scope:
    def __init__(self, supervision: Supervision, tenants: Tenants, tenant: str) -> None:
        self.supervision = supervision
        self.tenants = tenants
        self.tenant = tenant

    def owns(self, member: Member) -> bool:
        return self.tenant == OPERATOR or member.config.tenant == self.tenant

    def _lookup(self, ref: object) -> Member:
        """A reference as the home names it: a tenant's own name first (prefixed), then an id (an agent may be
        named like one)."""
        if self.tenant == OPERATOR or not isinstance(ref, str):
            return self.supervision.member(ref)
        try:
            return self.supervision.member(f"{self.tenant}{TENANT_SEP}{ref}")
        except NotFound:
            try:
                uuid.UUID(ref)
            except ValueError:
                raise NotFound(ref) from None
            return self.supervision.member(ref)

    def member(self, ref: object) -> Member:
        try:
            member = self._lookup(ref)
        except NotFound:
            if self.tenant != OPERATOR and isinstance(ref, str) and TENANT_SEP in ref:
                try:
                    other = self.supervision.member(ref)
                except NotFound:
                    pass
                else:
                    if self.owns(other):  # its own agent by the full name: a slip, not a probe
                        raise NotFound(f"a tenant names its own agents without its prefix: "  # no full name in it:
                                       f"{local_name(other.name, self.tenant)!r}") from None  # replies drop it
                    # another tenant's agent, by its full name: as not found, and recorded as a probe
                    self.tenants.deny(self.tenant, "not-found", f"asked for {other.name} ({other.uuid})")
            raise NotFound(f"no agent named or with id {str(ref)[:256]!r}") from None
        if not self.owns(member):
            self.tenants.deny(self.tenant, "not-found", f"asked for {member.name} ({member.uuid})")
            raise NotFound(f"no agent named or with id {str(ref)[:256]!r}")
        return member

    def agent(self, ref: object) -> Agent:
        member = self.member(ref)
        if not isinstance(member, Agent):
            raise NotFound(f"no agent named or with id {str(ref)[:256]!r}")
        return member

    def chain(self, ref: str) -> str:
        """A reference to a chain this client may read: the operator's as given (removed agents too),
        a tenant's only to a live member of its own."""
        if self.tenant == OPERATOR:
            return ref
        return self.member(ref).name

    def agents(self) -> list[Agent]:
        return [a for a in self.supervision.agents if self.owns(a)]

    def members(self) -> list[Member]:
        nodes = [n for n in self.supervision.nodes.values() if self.owns(n)]
        return [*self.agents(), *nodes]


def localized(result: Any, tenant: str) -> Any:
    """A reply as ``tenant`` reads it: its own names without its prefix. Only containers are descended
    into: a `ps` of 1,000 rows is 13,000 values, most of them plain (3.3 ms when each was a call)."""
    if isinstance(result, dict):
        return {k: (local_name(v, tenant) if k in _NAME_KEYS else v) if isinstance(v, str)
                else localized(v, tenant) if isinstance(v, (dict, list)) else v
                for k, v in result.items()}
    if isinstance(result, list):
        return [localized(v, tenant) if isinstance(v, (dict, list)) else v for v in result]
    return result
