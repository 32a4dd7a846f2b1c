"""Reporting a leaked key through the service (`keys report-leak`, the admin API, GitHub's reports), both stores."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime

import pytest

from gateway.config.schema import Settings
from gateway.keys import generate
from gateway.manage.service import InvalidInput, KeyService, NotFound
from gateway.models import KeyStatus
from gateway.store import KeyStore

from ...clocks import FakeClock

HOOK = "https://hooks.example/leaks"
URL = "https://github.com/acme/shop/blob/0123abc/.env"


def _settings(on_leak: str = "revoke") -> Settings:
    return Settings.model_validate({
        "keys": {"argon2": {"memory_cost": 1024}, "kinds": {"integration": {"prefix": "kg_", "on_leak": on_leak}}},
        "webhooks": [{"url": HOOK, "secret": "s" * 16, "events": ["key.leaked", "key.revoked"]}],
    })


@pytest.fixture
def reporting(store: KeyStore, clock: FakeClock[datetime]) -> KeyService:
    return KeyService(store, _settings(), actor="cli:alice", clock=clock)


@pytest.fixture
def flagging(store: KeyStore, clock: FakeClock[datetime]) -> KeyService:
    return KeyService(store, _settings("flag"), actor="cli:alice", clock=clock)


async def events(store: KeyStore, key_id: str) -> list[tuple[str, dict]]:
    async with store.read() as tx:
        return [(e.action, e.details) for e in reversed(await tx.list_audit(key=key_id))]


async def queued(store: KeyStore) -> list[tuple[str, dict]]:
    async with store.read() as tx:
        return [(d.event, json.loads(d.body)) for d in reversed(await tx.list_webhooks())]


async def changes(store: KeyStore) -> list[tuple[str, str]]:
    async with store.read() as tx:
        return [(entity, target) for _, entity, target, _at in await tx.changes_since(0)]


async def test_a_leaked_key_is_revoked_audited_announced_and_dropped_everywhere(
    reporting: KeyService, store: KeyStore, clock: FakeClock[datetime],
) -> None:
    """on_leak = revoke: revoked and leaked now, key.leaked audited with url and source, both webhooks, a change."""
    record, full = await reporting.create_key(name="ci", role="admin")
    before = len(await changes(store))
    report = await reporting.report_leak(full, url=URL, source="commit")  # a pasted full key names its key
    assert (report.result, report.first) == ("revoked", True)
    stored = await store.get_key(record.id)
    assert stored is not None and stored.revoked_at == clock() and stored.leaked_at == clock()
    assert stored.status(clock()) is KeyStatus.REVOKED
    action, details = (await events(store, record.id))[-1]
    assert action == "key.leaked"
    assert details == {"url": URL, "source": "commit", "via": "manual", "result": "revoked", "first_report": True}
    assert [event for event, _ in await queued(store)] == ["key.leaked", "key.revoked"]
    leaked = (await queued(store))[0][1]
    assert leaked["details"] == {"actor": "cli:alice", "url": URL, "source": "commit", "via": "manual",
                                 "result": "revoked"}
    assert leaked["key"]["leaked_at"] is not None and leaked["key"]["status"] == "revoked"
    assert (await changes(store))[before:] == [("key", record.id)]
    assert full not in json.dumps(await events(store, record.id)) + json.dumps(await queued(store))


async def test_on_leak_flag_keeps_the_key_working_but_marks_it(
    flagging: KeyService, store: KeyStore, clock: FakeClock[datetime],
) -> None:
    """on_leak = flag: leaked_at set, still active, key.leaked only (no key.revoked)."""
    record, _ = await flagging.create_key(name="ci", role="admin")
    report = await flagging.report_leak(record.id, url=URL, via="github")
    assert (report.result, report.first) == ("flagged", True)
    stored = await store.get_key(record.id)
    assert stored is not None and stored.status(clock()) is KeyStatus.ACTIVE and stored.leaked_at == clock()
    assert [event for event, _ in await queued(store)] == ["key.leaked"]
    assert (await events(store, record.id))[-1][1]["source"] is None


async def test_rotating_a_flagged_key_gives_a_key_that_never_leaked(flagging: KeyService) -> None:
    """Rotation is how a flagged leak is fixed: the new key carries no leaked_at; the old one keeps its mark."""
    record, _ = await flagging.create_key(name="ci", role="admin")
    await flagging.report_leak(record.id, url=URL)
    new, _, old = await flagging.rotate_key(record.id)
    assert new.leaked_at is None and old.leaked_at is not None
    assert (await flagging.get_key(new.id)).leaked_at is None


async def test_a_second_report_is_audited_but_changes_nothing(
    reporting: KeyService, store: KeyStore, clock: FakeClock[datetime],
) -> None:
    """Reported again (GitHub retries, another sighting): audited with its URL; no second revocation, webhook or change."""
    record, _ = await reporting.create_key(name="ci", role="admin")
    first = await reporting.report_leak(record.id, url=URL)
    queued_before, changes_before = await queued(store), await changes(store)
    clock.advance(minutes=5)
    again = await reporting.report_leak(record.id, url="https://gist.github.com/x", source="gist_content")
    assert (again.result, again.first) == ("already_revoked", False)
    assert again.record.revoked_at == again.record.leaked_at == first.record.revoked_at
    assert await queued(store) == queued_before and await changes(store) == changes_before
    assert [(a, d["url"], d["first_report"]) for a, d in await events(store, record.id) if a == "key.leaked"] == [
        ("key.leaked", URL, True), ("key.leaked", "https://gist.github.com/x", False)]


async def test_a_key_revoked_before_its_leak_is_marked_leaked_not_revoked_again(
    reporting: KeyService, store: KeyStore, clock: FakeClock[datetime],
) -> None:
    """A revoked key's first leak report sets leaked_at and sends key.leaked; revoked_at stays."""
    record, _ = await reporting.create_key(name="ci", role="admin")
    revoked = await reporting.revoke_key(record.id)
    clock.advance(hours=1)
    report = await reporting.report_leak(record.id, url=URL)
    assert (report.result, report.first) == ("already_revoked", True)
    assert report.record.revoked_at == revoked.revoked_at and report.record.leaked_at == clock()
    assert [event for event, _ in await queued(store)] == ["key.revoked", "key.leaked"]


async def test_a_flagged_key_is_revoked_by_a_later_report_once_its_kind_revokes(
    flagging: KeyService, store: KeyStore, clock: FakeClock[datetime],
) -> None:
    """on_leak changed from flag to revoke: the next report revokes (key.revoked), without a second key.leaked."""
    record, _ = await flagging.create_key(name="ci", role="admin")
    first_reported = (await flagging.report_leak(record.id, url=URL)).record.leaked_at
    clock.advance(minutes=1)
    now_revoking = KeyService(store, _settings("revoke"), actor="cli:alice", clock=clock)
    report = await now_revoking.report_leak(record.id, url=URL)
    assert (report.result, report.first) == ("revoked", False)
    assert report.record.revoked_at == clock() and report.record.leaked_at == first_reported
    assert [event for event, _ in await queued(store)] == ["key.leaked", "key.revoked"]


async def test_a_canary_key_is_only_flagged(reporting: KeyService, store: KeyStore, clock: FakeClock[datetime]) -> None:
    """A decoy stays a decoy, whatever its kind's on_leak: revoked, its next use would raise no alarm."""
    record, _ = await reporting.create_key(name="bait", role="admin")
    bait = replace(record, id=generate("kg_").key_id, canary=True)
    async with store.transaction() as tx:
        await tx.insert_key(bait)
    report = await reporting.report_leak(bait.id, url=URL)
    assert report.result == "flagged"
    stored = await store.get_key(bait.id)
    assert stored is not None and stored.revoked_at is None and stored.leaked_at == clock()


@pytest.mark.parametrize(
    ("key", "kwargs", "error", "message"),
    [
        ("kg_AAAAAAAAAAAA", {"url": URL}, NotFound, "no key with the id 'kg_AAAAAAAAAAAA'"),
        (None, {"url": ""}, InvalidInput, "url: say where the key was found"),
        (None, {"url": "   "}, InvalidInput, "url: say where the key was found"),
        (None, {"url": URL, "via": "email"}, InvalidInput, "via 'email'"),
    ],
)
async def test_bad_reports_change_nothing(
    reporting: KeyService, store: KeyStore, key: str | None, kwargs: dict, error: type, message: str,
) -> None:
    """An unknown key or a report without a place is refused, and nothing is written."""
    record, _ = await reporting.create_key(name="ci", role="admin")
    before = await events(store, record.id), await queued(store), await changes(store)
    with pytest.raises(error, match=message):
        await reporting.report_leak(key or record.id, **kwargs)
    assert (await events(store, record.id), await queued(store), await changes(store)) == before
    stored = await store.get_key(record.id)
    assert stored is not None and stored.leaked_at is None and stored.revoked_at is None


async def test_what_a_report_says_is_kept_as_printable_bounded_text(
    reporting: KeyService, store: KeyStore,
) -> None:
    """A URL with a NUL or a lone surrogate (anyone writes file names) is stored with those replaced, and cut short."""
    record, _ = await reporting.create_key(name="ci", role="admin")
    await reporting.report_leak(record.id, url="https://x.example/a\0b\ud800" + "c" * 5000, source="com\nmit",
                                via="github")
    details = (await events(store, record.id))[-1][1]
    assert details["url"].startswith("https://x.example/a\ufffdb\ufffdc") and len(details["url"]) == 2048
    assert details["source"] == "com\ufffdmit"
