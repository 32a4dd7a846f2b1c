"""``keygate apply`` and ``keygate export``: a store made to match a state file, and written as one.

The plan (:mod:`.plan`) is computed, shown and applied by the service in one transaction: every
change audited as the service audits it (``via: apply`` in its details), and all of them committed
or none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import AsyncIterator

from .declared import StateProblems, read_state, render_state
from .errors import FieldProblem, ServiceError
from .plan import VIA, Plan, plan_changes, read_current
from .service import KeyService
from ..models import KeyRecord
from ..store import Transaction


# -- applying ------------------------------------------------------------
class ApplyFailed(ServiceError):
    """A change was refused: the transaction was rolled back, so none of the plan was applied."""


@dataclass(frozen=True, slots=True)
class Applied:
    plan: Plan
    created: list[tuple[KeyRecord, str]]  # each new key and its full text, shown once
    dry_run: bool


class _Held:
    """A notifier that holds the changes until the one real transaction has committed."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, str]] = []
        self.at: datetime | None = None  # the first change's time in the change feed

    async def publish(self, changes: Sequence[tuple[str, str]], *, at: datetime | None = None) -> bool:
        self.changes += changes
        if self.at is None:
            self.at = at
        return True


class _Within:
    """The store as seen by a service whose every action runs in one open transaction."""

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        yield self._tx

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Transaction]:
        yield self._tx


async def apply_state(service: KeyService, text: str, *, prune: bool = False, dry_run: bool = False,
                      show: Callable[[str], None] = lambda line: None) -> Applied:
    """Make the store match the state file ``text``, as ``service``'s actor; ``show`` gets each line of the plan.

    The file is checked whole before the store is read (:class:`StateProblems`). The plan is
    computed and applied in one transaction, so it is applied against the state it was computed
    from and is committed whole or not at all (:class:`ApplyFailed`).
    """
    state = read_state(text, service.settings)
    held = _Held()
    opened = service.store.read() if dry_run else service.store.transaction()
    created: list[tuple[KeyRecord, str]] = []
    async with opened as tx:
        now = service.clock()
        plan = plan_changes(state, await read_current(tx, now), prune=prune, now=now)
        for line in plan.lines():
            show(line)
        if dry_run or not plan.changes:
            return Applied(plan, [], dry_run)
        within = KeyService(_Within(tx), service.settings, actor=service.actor, clock=service.clock,
                            hasher=service.hasher, notifier=held, acting=service.acting, via=VIA)
        for done, change in enumerate(plan.changes):
            try:
                result = await change.action(within)
            except ServiceError as exc:
                raise ApplyFailed(f"{change.line()}: {exc}; nothing was applied (change {done + 1} of "
                                  f"{len(plan.changes)} was refused, and the plan runs in one transaction)") from None
            if change.text.startswith("create key"):
                created.append(result)
    # Only after the commit: a gateway that hears of a change must read the new state.
    if held.changes and service.notifier is not None:
        await service.notifier.publish(held.changes, at=held.at)
    return Applied(plan, created, dry_run)


async def export_state(service: KeyService) -> str:
    """The store's roles, members, trust policies and named keys as a state file (no secrets, no hashes).

    :class:`StateProblems` when two live keys of an org share a name: a file names a key by its
    name in its org, so such a file could not be applied.
    """
    async with service.store.read() as tx:
        current = await read_current(tx, service.clock())
    keys = current.named_keys()
    seen: dict[tuple[str, str], list[str]] = {}
    for record in keys:
        seen.setdefault((record.org, record.name), []).append(record.id)
    problems = [FieldProblem(None, f"keys {', '.join(ids)} share the name {name!r} in org {org!r}: a state file "
                                   "names a key by its name within its org; rename or revoke all but one")
                for (org, name), ids in sorted(seen.items()) if len(ids) > 1]
    if problems:
        raise StateProblems(problems[0].message, problems=problems)
    members = [m for org in current.members.values() for m in org.values()]
    return render_state(list(current.roles.values()), members, list(current.policies.values()), keys)
