"""Tenants: who owns which agents, what each may use, and what each used (docs/tenancy.md).

The operator (owner of the home, on the local socket) is the tenant ``operator``
and is bounded by nothing here. Every other tenant is added by the operator with
a CurveZMQ client key, the policies it may spawn under, the tenants its agents may
exchange messages with, and its quotas. Quotas are checked where work is taken:
spawns, calls, messages, kv writes, children; past one the request is refused
with an error naming it, and every refusal is recorded as a denial.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from theater.remote import valid_key

from ._config import OPERATOR, TENANT_SEP
from ._errors import Refused
from ._supervision import Status

if TYPE_CHECKING:
    from ._agent import Agent, Agents
    from ._store import EventStore

__all__ = ["QUOTAS", "QuotaExceeded", "Quotas", "Tenant", "Tenants", "local_name"]

TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")  # used with fullmatch
DAY_NS = 86_400 * 10**9
HOUR_NS = 3_600 * 10**9
DENIALS_STORED_PER_SECOND = 10  # per tenant; beyond, denials are counted, not each stored

# name -> what it bounds, per tenant
QUOTAS: dict[str, str] = {
    "agents": "agents running at once (starting, running or restarting)",
    "memory_bytes": "linear memory granted to its running agents, the sum of their memory_bytes limits",
    "fuel_per_second": "fuel its agents burn per second, across all of them",
    "calls_per_second": "calls and messages delivered to its agents per second, from clients and agents",
    "kv_bytes": "bytes of keys and values its agents hold in kv",
    "record_bytes_per_day": "bytes of event records its agents write in any 24 hours",
    "children": "children its agents keep, running or stopped (agents started by its agents)",
}


class QuotaExceeded(Refused):
    code = "quota"


@dataclass(frozen=True, slots=True)
class Quotas:
    """A tenant's bounds; None is unbounded."""

    agents: int | None = None
    memory_bytes: int | None = None
    fuel_per_second: int | None = None
    calls_per_second: int | None = None
    kv_bytes: int | None = None
    record_bytes_per_day: int | None = None
    children: int | None = None

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def parse(cls, items: dict[str, Any]) -> Quotas:
        """From ``{name: value}`` as a client sends them: every name known, every value an integer ≥ 0."""
        if not isinstance(items, dict):
            raise Refused("quotas must be an object of name: integer")
        known = {f.name for f in fields(cls)}
        for name, value in items.items():
            if name not in known:
                raise Refused(f"unknown quota {name!r} (known: {', '.join(sorted(known))})")
            if type(value) is not int or not 0 <= value <= 2**62:
                raise Refused(f"quota {name} must be an integer from 0 to 2**62, not {value!r}")
        return cls(**items)


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    public_key: str  # its client's CurveZMQ public key, Z85 (40 characters)
    policies: tuple[str, ...]  # the policies its agents may run under
    routes: tuple[str, ...]  # tenants its agents may exchange messages with, if those tenants list it too
    quotas: Quotas
    created_ns: int

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "public_key": self.public_key, "policies": list(self.policies),
                "routes": list(self.routes), "quotas": self.quotas.as_dict(), "created_ns": self.created_ns}


class _Bucket:
    """A token bucket: ``rate`` per second, holding at most one second's worth. Debits may take it below
    zero (fuel is known only after the call); nothing more is admitted until it is back above zero."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.level = float(rate)
        self.at = time.monotonic()

    def _fill(self) -> None:
        now = time.monotonic()
        self.level = min(float(self.rate), self.level + (now - self.at) * self.rate)
        self.at = now

    def admit(self) -> bool:
        self._fill()
        return self.level > 0

    def take(self, amount: float) -> None:
        self._fill()
        self.level -= amount


@dataclass
class _Account:
    """A tenant's running tallies, kept by the supervisor while it runs."""

    calls: _Bucket | None = None
    fuel: _Bucket | None = None
    record_hours: deque[list[int]] = field(default_factory=deque)  # [hour, bytes], the last 24 hours
    denials: int = 0
    stored_this_second: tuple[int, int] = (0, 0)  # (second, denials stored in it)

    def record_bytes_today(self, now_ns: int) -> int:
        self._forget_hours_before(now_ns)
        return sum(b for _, b in self.record_hours)

    def add_record_bytes(self, now_ns: int, size: int) -> None:
        hour = now_ns // HOUR_NS
        if self.record_hours and self.record_hours[-1][0] == hour:
            self.record_hours[-1][1] += size
        else:  # a new hour: forget those past a day here too, since only the quota's check reads the tally
            self.record_hours.append([hour, size])
            self._forget_hours_before(now_ns)

    def _forget_hours_before(self, now_ns: int) -> None:
        while self.record_hours and self.record_hours[0][0] <= (now_ns - DAY_NS) // HOUR_NS:
            self.record_hours.popleft()


def local_name(name: str, tenant: str) -> str:
    """An agent's name as ``tenant`` writes it: its own agents without their prefix, others' in full."""
    prefix = tenant + TENANT_SEP
    return name[len(prefix):] if tenant != OPERATOR and name.startswith(prefix) else name


class Tenants:
    def __init__(self, store: EventStore, agents: Agents, log: Callable[[str], None]) -> None:
        self.store = store
        self.agents = agents
        self.log = log
        self.by_name: dict[str, Tenant] = {}
        self.accounts: dict[str, _Account] = {}
        self.refused_connections = 0  # clients refused at the handshake (no key, a wrong key, a removed tenant)
        for row in store.tenants():
            self._load(Tenant(name=row["name"], public_key=row["public_key"], policies=tuple(row["policies"]),
                              routes=tuple(row["routes"]), quotas=Quotas(**row["quotas"]),
                              created_ns=row["created_ns"]))
        for tenant, hour, size in store.record_bytes_by_hour(time.time_ns() - DAY_NS):
            if tenant in self.accounts:
                self.accounts[tenant].add_record_bytes(hour * HOUR_NS, size)

    def _load(self, tenant: Tenant) -> None:
        self.by_name[tenant.name] = tenant
        q = tenant.quotas
        self.accounts[tenant.name] = _Account(
            calls=_Bucket(q.calls_per_second) if q.calls_per_second is not None else None,
            fuel=_Bucket(q.fuel_per_second) if q.fuel_per_second is not None else None)

    # --- the operator's requests -----------------------------------------------------------

    def add(self, name: object, public_key: object, policies: object, routes: object, quotas: object) -> Tenant:
        if not isinstance(name, str) or not TENANT_RE.fullmatch(name) or name == OPERATOR:
            raise Refused("a tenant's name is 1-32 characters of a-z, 0-9, '-', '_', starting with a letter or "
                          f"digit, and not {OPERATOR!r}")
        if name in self.by_name:
            raise Refused(f"a tenant named {name!r} already exists")
        left = len(self.agents_of(name))
        if left:  # a removed tenant's agents: a new tenant of that name must not inherit them
            raise Refused(f"{left} agents of a removed tenant {name!r} are still in the home: remove them "
                          f"(theater rm {name}:NAME) before adding a tenant of that name")
        if not valid_key(public_key):
            raise Refused("public_key must be a CurveZMQ public key in Z85 (40 characters)")
        if any(t.public_key == public_key for t in self.by_name.values()):
            raise Refused("that public key is already another tenant's")
        for what, items in (("policies", policies), ("routes", routes)):
            if not isinstance(items, list) or not all(isinstance(i, str) and TENANT_RE.fullmatch(i) for i in items):
                raise Refused(f"{what} must be a list of names")
        assert isinstance(policies, list) and isinstance(routes, list)
        if not policies:
            raise Refused("a tenant needs at least one policy to spawn under")
        tenant = Tenant(name, public_key, tuple(policies), tuple(routes),
                        Quotas.parse(quotas if isinstance(quotas, dict) else {}), time.time_ns())
        self.store.add_tenant(tenant.as_dict())
        self._load(tenant)
        self.log(f"tenant {name} added (policies {', '.join(policies)})")
        return tenant

    def remove(self, name: object) -> None:
        """Forget a tenant: its key no longer connects, nor does a connection it already has."""
        if not isinstance(name, str) or name not in self.by_name:
            raise Refused(f"no tenant named {name!r}")
        self.store.remove_tenant(name)
        del self.by_name[name]
        del self.accounts[name]
        self.log(f"tenant {name} removed")

    def agents_of(self, tenant: str) -> list[Agent]:
        """Every agent of ``tenant`` the supervisor knows, in any state."""
        return [a for a in self.agents if a.config.tenant == tenant]

    def by_key(self, public_key: str) -> Tenant | None:
        return next((t for t in self.by_name.values() if t.public_key == public_key), None)

    # --- what a tenant may do ---------------------------------------------------------------

    def deny(self, tenant: str, what: str, detail: str) -> None:
        """Record a refusal: counted always, stored (``denials``) up to a rate, logged."""
        account = self.accounts.get(tenant)
        now = time.time_ns()
        if account is not None:
            account.denials += 1
            second, stored = account.stored_this_second
            if second != now // 10**9:
                second, stored = now // 10**9, 0
            if stored >= DENIALS_STORED_PER_SECOND:
                account.stored_this_second = (second, stored)
                return
            account.stored_this_second = (second, stored + 1)
        self.store.add_denial(now, tenant, what, detail[:512])
        self.log(f"denied tenant {tenant}: {what}: {detail[:200]}")

    def _exceeded(self, tenant: str, quota: str, detail: str) -> QuotaExceeded:
        limit = getattr(self.by_name[tenant].quotas, quota)
        message = f"tenant {tenant}'s quota {quota} ({limit}) {detail}"
        self.deny(tenant, f"quota {quota}", message)
        return QuotaExceeded(message)

    def check_spawn(self, tenant: str, policies: Iterable[str], new_agents: list[tuple[str, int]]) -> None:
        """A spawn of agents ``(name, memory_bytes)`` under ``policies``: the tenant's policies and quotas allow it."""
        t = self.by_name.get(tenant)
        if t is None:
            return  # the operator
        for policy in policies:
            if policy not in t.policies:
                message = f"tenant {tenant} may not spawn under policy {policy!r} (its policies: {', '.join(t.policies)})"
                self.deny(tenant, "policy", message)
                raise Refused(message)
        mine = [a for a in self.agents_of(tenant) if a.status not in (Status.STOPPED, Status.FAILED)]
        q = t.quotas
        if q.agents is not None and len(mine) + len(new_agents) > q.agents:
            raise self._exceeded(tenant, "agents", f"is reached: {len(mine)} running, {len(new_agents)} more asked")
        if q.memory_bytes is not None:
            granted = sum(a.config.limits.memory_bytes for a in mine) + sum(m for _, m in new_agents)
            if granted > q.memory_bytes:
                raise self._exceeded(tenant, "memory_bytes", f"would be passed: {granted} bytes granted in all")
        self._admit(tenant, "spawn")

    def check_child(self, tenant: str, memory_bytes: int) -> None:
        """An agent of ``tenant`` starts a child: the children quota, and the spawn's."""
        t = self.by_name.get(tenant)
        if t is None:
            return
        if t.quotas.children is not None:
            kept = sum(1 for a in self.agents_of(tenant) if a.parent_is_agent)
            if kept >= t.quotas.children:
                raise self._exceeded(tenant, "children", f"is reached: its agents keep {kept} children")
        self.check_spawn(tenant, (), [("", memory_bytes)])

    def check_message(self, tenant: str) -> None:
        """A call or message to one of ``tenant``'s agents is about to be taken."""
        if tenant not in self.by_name:
            return
        self._admit(tenant, "message")
        bucket = self.accounts[tenant].calls
        if bucket is not None:
            bucket.take(1)

    def _admit(self, tenant: str, what: str) -> None:
        account, q = self.accounts[tenant], self.by_name[tenant].quotas
        if account.calls is not None and what == "message" and not account.calls.admit():
            raise self._exceeded(tenant, "calls_per_second", "is used up for now: try again in a moment")
        if account.fuel is not None and not account.fuel.admit():
            raise self._exceeded(tenant, "fuel_per_second", "is used up for now: try again in a moment")
        if q.record_bytes_per_day is not None:
            used = account.record_bytes_today(time.time_ns())
            if used >= q.record_bytes_per_day:
                raise self._exceeded(tenant, "record_bytes_per_day", f"is used up: {used} bytes in the last 24 hours")

    def check_kv(self, agent: Agent, own_total: int) -> str | None:
        """Why a kv write that leaves ``agent`` holding ``own_total`` bytes passes its tenant's kv_bytes, if it does."""
        tenant = agent.config.tenant
        t = self.by_name.get(tenant)
        if t is None or t.quotas.kv_bytes is None:
            return None
        others = [a.id for a in self.agents_of(tenant) if a is not agent]
        total = self.store.kv_bytes(others) + own_total
        if total <= t.quotas.kv_bytes:
            return None
        return str(self._exceeded(tenant, "kv_bytes", f"would be passed: {total} bytes in all"))

    def may_route(self, sender: str, target: str) -> bool:
        """Agents of two tenants exchange messages only if each tenant lists the other in its routes; the
        operator's agents and a tenant's, only if the tenant lists ``operator``."""
        if sender == target:
            return True
        a, b = self.by_name.get(sender), self.by_name.get(target)
        if OPERATOR in (sender, target):
            tenant = b if sender == OPERATOR else a
            return tenant is not None and OPERATOR in tenant.routes
        return a is not None and b is not None and target in a.routes and sender in b.routes

    # --- what was used ---------------------------------------------------------------------

    def committed(self, agent: Agent, size: int, fuel: int) -> None:
        account = self.accounts.get(agent.config.tenant)
        if account is None:
            return
        account.add_record_bytes(time.time_ns(), size)
        if account.fuel is not None and fuel:
            account.fuel.take(fuel)

    def denials(self, tenant: str) -> int:
        account = self.accounts.get(tenant)
        return account.denials if account is not None else 0

