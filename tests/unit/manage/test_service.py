"""The service's input checks: every action checks its values before it touches the store,
and reports every problem, each naming the parameter it is about."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, NoReturn

import pytest

from gateway.config.schema import Settings
from gateway.manage.service import UNSET, FieldProblem, InvalidInput, KeyService

from ...clocks import FakeClock

OPERATION = ("operation 'Bad!': use lowercase letters, digits and ':_.-', with '*' as a wildcard "
             "(e.g. deploy, servers:read, servers:*, *:read, *)")
NAME_RULE = "use 1-128 letters, digits and '._@:+-', starting with a letter or digit"


class Untouchable:
    """A store no check may reach: input refused on its face is refused before the store is opened."""

    def transaction(self) -> NoReturn:
        raise AssertionError("the store was used before the input was checked")

    read = transaction


@pytest.fixture
def service(settings: Settings, clock: FakeClock[datetime]) -> KeyService:
    return KeyService(Untouchable(), settings, actor="test:alice", clock=clock)


async def refused(action: Awaitable[Any]) -> tuple[str, tuple[FieldProblem, ...]]:
    with pytest.raises(InvalidInput) as caught:
        await action
    return str(caught.value), caught.value.problems


@pytest.mark.parametrize(
    ("call", "problems"),
    [
        (lambda s: s.create_key(name=" ", operations=["read"]),
         [("name", "name ' ': use 1-200 printable characters")]),
        (lambda s: s.create_key(name="ci", org="bad org", user="bad user", role="bad role"),
         [("org", f"org 'bad org': {NAME_RULE}"), ("user", f"user 'bad user': {NAME_RULE}"),
          ("role", f"role 'bad role': {NAME_RULE}")]),
        (lambda s: s.create_key(name="ci", operations=["read", "Bad!"], servers=["bad!"], ip_allowlist=["nope"]),
         [("operations.1", OPERATION), ("servers.0", "server 'bad!': use '*' or a name of letters, digits and '._-'"),
          ("ip_allowlist.0", "allow-ip 'nope': use an IPv4 or IPv6 address or CIDR (e.g. 10.0.0.0/8, 2001:db8::/32)")]),
        (lambda s: s.create_key(name="ci", role="", operations=["read"]), [("role", f"role '': {NAME_RULE}")]),
        # Checked against the configuration and the clock: about the input as a whole, the kind's first.
        (lambda s: s.create_key(name="ci", kind="ghost", operations=["Bad!"], expires="soon"),
         [(None, "kind 'ghost': unknown; configured kinds are automation, integration"), ("operations.0", OPERATION),
          (None, 'expires \'soon\': use "7d", "30d", "90d", "1y" (any N followed by h, d, w or y), "never", '
                 "or an ISO 8601 date or date-time")]),
        (lambda s: s.create_key(name="ci"),
         [(None, "a key needs a role (--role) or at least one operation (--operation)")]),
        (lambda s: s.update_key("kg_AAAAAAAAAAAA", name="", rate_limit="lots"),
         [("name", "name '': use 1-200 printable characters"),
          ("rate_limit", "rate-limit: invalid rate limit 'lots': use \"N/second\", \"N/minute\", \"N/hour\" or "
                         "\"N/day\" with N >= 1, optionally \"; burst=M\" with M >= N")]),
        (lambda s: s.update_key("kg_AAAAAAAAAAAA", role=""), [("role", f"role '': {NAME_RULE}")]),
        (lambda s: s.update_key("kg_AAAAAAAAAAAA"), [(None, "nothing to change: give at least one setting")]),
        (lambda s: s.rotate_key("kg_AAAAAAAAAAAA", grace="-1h"), None),
        (lambda s: s.set_role("kg_AAAAAAAAAAAA", "bad role"), [("role", f"role 'bad role': {NAME_RULE}")]),
        (lambda s: s.issue_agent_key("bad org", "bad user"),
         [("org", f"org 'bad org': {NAME_RULE}"), ("user", f"user 'bad user': {NAME_RULE}")]),
        (lambda s: s.put_role("bad name", ["read", "Bad!"]),
         [("name", f"role 'bad name': {NAME_RULE}"), ("grants.1", OPERATION)]),
        # Input first, then the state: even the built-in role's change is refused for its input.
        (lambda s: s.put_role("admin", []), [("grants", "a role needs at least one grant (--grant)")]),
        (lambda s: s.set_member("acme", "bob", "bad role"), [("role", f"role 'bad role': {NAME_RULE}")]),
    ],
)
async def test_bad_input_is_refused_with_every_problem_before_the_store(
    service: KeyService, call: Callable[[KeyService], Awaitable[Any]], problems: list[tuple[str | None, str]] | None,
) -> None:
    """Each problem names its parameter (a list's item by its place); the message is the first problem's."""
    message, found = await refused(call(service))
    if problems is not None:
        assert found == tuple(FieldProblem(*p) for p in problems)
    assert message == found[0].message


async def test_no_role_is_a_change_not_a_bad_value(service: KeyService) -> None:
    """An update's role None removes the role: it passes the checks and goes on to the store."""
    with pytest.raises(AssertionError, match="store was used"):
        await service.update_key("kg_AAAAAAAAAAAA", role=None, rate_limit=UNSET)
