"""Trust policies and exchanged tokens in the store: every case runs against SQLite and PostgreSQL."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gateway.models import Role, TrustPolicy
from gateway.store import Conflict, KeyStore

T0 = datetime(2026, 11, 22, 12, 0, 0, 500000, tzinfo=UTC)
GITHUB = "https://token.actions.githubusercontent.com"


def a_policy(name: str = "shop-deploy", **changes: object) -> TrustPolicy:
    policy = TrustPolicy(
        name=name, issuer=GITHUB, audience="https://keygate.example",
        conditions=(("environment", "prod"), ("ref", "refs/heads/*"), ("repository", "acme/shop")),
        org="acme", role="admin", operations=("deploy", "servers:read"), servers=("prod-1", "prod-2"),
        ip_allowlist=("10.0.0.0/8", "2001:db8::/32"), rate_limit="100/minute", lifetime=900,
        jwks_file="/etc/keygate/jwks.json", created_by="test", created_at=T0, updated_at=T0,
    )
    return replace(policy, **changes)  # type: ignore[arg-type]


async def test_policy_round_trips_every_field(store: KeyStore) -> None:
    """A stored policy comes back equal: conditions sorted by claim, times timezone-aware."""
    policy = a_policy()
    async with store.transaction() as tx:
        await tx.put_trust_policy(policy)
    async with store.read() as tx:
        loaded = await tx.get_trust_policy("shop-deploy")
    assert loaded == policy
    assert loaded is not None and loaded.created_at.tzinfo is not None


async def test_policy_without_role_or_file_round_trips(store: KeyStore) -> None:
    """No role, no JWKS file, no rate limit and no allowlist are stored as such."""
    policy = a_policy(role=None, jwks_file=None, rate_limit=None, ip_allowlist=(), servers=("*",),
                      conditions=(("sub", "system:serviceaccount:ci:*"),))
    async with store.transaction() as tx:
        await tx.put_trust_policy(policy)
        assert await tx.get_trust_policy(policy.name) == policy


async def test_unknown_policy_is_none(store: KeyStore) -> None:
    """Looking up a policy that was never stored gives None."""
    async with store.read() as tx:
        assert await tx.get_trust_policy("nope") is None


async def test_put_replaces_settings_and_keeps_creation(store: KeyStore) -> None:
    """Putting a policy of the same name replaces its settings; who made it and when stay."""
    async with store.transaction() as tx:
        await tx.put_trust_policy(a_policy())
    later = T0 + timedelta(hours=1)
    changed = a_policy(issuer="https://other.example/", audience="other", conditions=(("sub", "x"),),
                       org="beta", role=None, operations=("read",), servers=("*",), ip_allowlist=(),
                       rate_limit=None, lifetime=60, jwks_file=None, created_by="someone else",
                       created_at=later, updated_at=later)
    async with store.transaction() as tx:
        await tx.put_trust_policy(changed)
        loaded = await tx.get_trust_policy("shop-deploy")
    assert loaded == replace(changed, created_by="test", created_at=T0)


async def test_list_by_name_and_by_issuer(store: KeyStore) -> None:
    """Policies are listed by name; an issuer filter compares the URL exactly (a trailing '/' counts)."""
    async with store.transaction() as tx:
        await tx.put_trust_policy(a_policy("zeta"))
        await tx.put_trust_policy(a_policy("alpha", issuer="https://k8s.example"))
        await tx.put_trust_policy(a_policy("mid"))
        await tx.put_trust_policy(a_policy("slash", issuer=GITHUB + "/"))
    async with store.read() as tx:
        everything = await tx.list_trust_policies()
        github = await tx.list_trust_policies(issuer=GITHUB)
        nobody = await tx.list_trust_policies(issuer="https://nobody.example")
    assert [p.name for p in everything] == ["alpha", "mid", "slash", "zeta"]
    assert [p.name for p in github] == ["mid", "zeta"]
    assert nobody == []


async def test_delete_policy(store: KeyStore) -> None:
    """A deleted policy is gone; the others stay."""
    async with store.transaction() as tx:
        await tx.put_trust_policy(a_policy("one"))
        await tx.put_trust_policy(a_policy("two"))
        await tx.delete_trust_policy("one")
    async with store.read() as tx:
        assert [p.name for p in await tx.list_trust_policies()] == ["two"]


async def test_role_users_counts_trust_policies(store: KeyStore) -> None:
    """A role named by a policy is in use: the third count is the policies naming it."""
    async with store.transaction() as tx:
        await tx.put_role(Role("ci", ("deploy",), T0, T0))
        await tx.put_trust_policy(a_policy("one", role="ci"))
        await tx.put_trust_policy(a_policy("two", role="ci"))
        await tx.put_trust_policy(a_policy("three", role=None))
        assert await tx.role_users("ci") == (0, 0, 2)


async def test_a_policy_cannot_name_a_missing_role(store: KeyStore) -> None:
    """The store itself refuses a policy whose role does not exist, and a role's deletion under a policy."""
    with pytest.raises(Conflict):
        async with store.transaction() as tx:
            await tx.put_trust_policy(a_policy(role="ghost"))
    async with store.transaction() as tx:
        await tx.put_role(Role("ci", ("deploy",), T0, T0))
        await tx.put_trust_policy(a_policy(role="ci"))
    with pytest.raises(Conflict):
        async with store.transaction() as tx:
            await tx.delete_role("ci")


async def test_a_token_is_claimed_once(store: KeyStore) -> None:
    """The first claim of a token id succeeds; any later one is a replay, even for another policy."""
    async with store.transaction() as tx:
        assert await tx.claim_token("t1", policy="p", at=T0, expires_at=T0 + timedelta(minutes=5)) is True
    async with store.transaction() as tx:
        assert await tx.claim_token("t1", policy="p", at=T0, expires_at=T0 + timedelta(minutes=5)) is False
        assert await tx.claim_token("t1", policy="q", at=T0, expires_at=T0 + timedelta(minutes=5)) is False
        assert await tx.claim_token("t2", policy="p", at=T0, expires_at=T0 + timedelta(minutes=5)) is True


async def test_a_rolled_back_claim_is_forgotten(store: KeyStore) -> None:
    """A claim made in a transaction that fails does not count: the token can be exchanged later."""
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            assert await tx.claim_token("t1", policy="p", at=T0, expires_at=T0 + timedelta(minutes=5))
            raise RuntimeError("the exchange failed")
    async with store.transaction() as tx:
        assert await tx.claim_token("t1", policy="p", at=T0, expires_at=T0 + timedelta(minutes=5)) is True


async def test_prune_exchanged_tokens_in_batches(store: KeyStore) -> None:
    """Tokens that expired before the cutoff go, at most ``batch`` at a time; the rest stay claimed."""
    async with store.transaction() as tx:
        for i in range(3):
            await tx.claim_token(f"old{i}", policy="p", at=T0, expires_at=T0 - timedelta(minutes=i + 1))
        await tx.claim_token("edge", policy="p", at=T0, expires_at=T0)
        await tx.claim_token("new", policy="p", at=T0, expires_at=T0 + timedelta(minutes=1))
    async with store.transaction() as tx:
        assert await tx.prune_exchanged_tokens(before=T0, batch=2) == 2
        assert await tx.prune_exchanged_tokens(before=T0, batch=2) == 1
        assert await tx.prune_exchanged_tokens(before=T0, batch=2) == 0
    async with store.transaction() as tx:
        assert await tx.claim_token("old0", policy="p", at=T0, expires_at=T0) is True
        assert await tx.claim_token("edge", policy="p", at=T0, expires_at=T0) is False
        assert await tx.claim_token("new", policy="p", at=T0, expires_at=T0) is False
