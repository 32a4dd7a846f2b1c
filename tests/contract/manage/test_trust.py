"""Trust policies and the token exchange through the service layer, against both stores."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.config.schema import Settings
from gateway.keys import KeyParser
from gateway.manage.audit import TOKEN_GRACE, AuditPruner
from gateway.manage.service import ConflictError, FieldProblem, InvalidInput, KeyService, NotFound, Replayed
from gateway.models import AuditEvent, KeyStatus, TrustPolicy
from gateway.store import KeyStore

from ...clocks import FakeClock

GITHUB = "https://token.actions.githubusercontent.com"
NAME_RULE = "use 1-128 letters, digits and '._@:+-', starting with a letter or digit"
PARSER = KeyParser(["kg_", "kga_"])
SUBJECT_RULE = ("conditions: at least one condition on sub or repository is required that begins with literal text, "
                "not '*' or '?' (for a GitHub repository: the whole owner, as in acme/* or repo:acme/*), so that a "
                "policy never trusts every token of its issuer")
# The claims of a GitHub Actions ID token, as GitHub documents them.
GITHUB_CLAIMS: dict[str, Any] = {
    "iss": GITHUB, "aud": "https://keygate.example", "sub": "repo:acme/shop:environment:prod",
    "jti": "example-id", "nbf": 1700000000, "iat": 1700000000, "exp": 1700000300,
    "ref": "refs/heads/main", "sha": "e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0", "repository": "acme/shop",
    "repository_owner": "acme", "repository_owner_id": "42", "repository_id": "4242",
    "repository_visibility": "private", "run_id": "1234", "run_number": "7", "run_attempt": "1",
    "actor": "octocat", "actor_id": "1", "workflow": "deploy", "workflow_ref":
    "acme/shop/.github/workflows/deploy.yml@refs/heads/main", "job_workflow_ref":
    "acme/shop/.github/workflows/deploy.yml@refs/heads/main", "event_name": "push", "ref_type": "branch",
    "environment": "prod", "runner_environment": "github-hosted",
}
# A projected Kubernetes service-account token: no jti, the pod's identity under kubernetes.io.
KUBERNETES_CLAIMS: dict[str, Any] = {
    "iss": "https://kubernetes.default.svc.cluster.local", "sub": "system:serviceaccount:ci:builder",
    "aud": ["keygate"], "exp": 1700000300, "iat": 1700000000, "nbf": 1700000000,
    "kubernetes.io": {"namespace": "ci", "serviceaccount": {"name": "builder", "uid": "u-1"},
                      "pod": {"name": "builder-7f9", "uid": "u-2"}},
}


def policy_args(**changes: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        issuer=GITHUB, audience="https://keygate.example",
        conditions={"repository": "acme/shop", "ref": "refs/heads/*"}, org="acme", role="admin",
        operations=["deploy"], servers=["prod-1"], ip_allowlist=["10.1.2.3/8"], rate_limit="10/second",
        lifetime="15m",
    )
    args.update(changes)
    return args


async def events(store: KeyStore, **filters: Any) -> list[AuditEvent]:
    async with store.read() as tx:
        return await tx.list_audit(**filters)


async def feed(store: KeyStore) -> list[tuple[str, str]]:
    return [(entity, target) for _, entity, target, _at in await store.changes_since(0)]


def jwks(tmp_path: Path, text: str, name: str = "jwks.json") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


SIGNING_KEY = {"kty": "EC", "crv": "P-256", "kid": "k1", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
               "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}


# -- policies ----------------------------------------------------------------------------------
async def test_put_get_list_and_audit(service: KeyService, store: KeyStore, tmp_path: Path) -> None:
    """A new policy is stored normalised, audited as trust.set with its settings and fed to gateways."""
    key_file = jwks(tmp_path, json.dumps({"keys": [SIGNING_KEY]}))
    policy = await service.put_trust_policy("shop-deploy", **policy_args(jwks_file=key_file))
    assert policy == TrustPolicy(
        name="shop-deploy", issuer=GITHUB, audience="https://keygate.example",
        conditions=(("ref", "refs/heads/*"), ("repository", "acme/shop")), org="acme", role="admin",
        operations=("deploy",), servers=("prod-1",), ip_allowlist=("10.0.0.0/8",), rate_limit="10/second",
        lifetime=900, jwks_file=key_file, created_by="test:alice", created_at=service.clock(),
        updated_at=service.clock(),
    )
    assert await service.get_trust_policy("shop-deploy") == policy
    assert await service.list_trust_policies() == [policy]
    [event] = await events(store, action="trust.set")
    assert (event.actor, event.target) == ("test:alice", "shop-deploy")
    assert event.details == {
        "issuer": GITHUB, "audience": "https://keygate.example",
        "conditions": {"ref": "refs/heads/*", "repository": "acme/shop"}, "org": "acme", "role": "admin",
        "operations": ["deploy"], "servers": ["prod-1"], "ip_allowlist": ["10.0.0.0/8"],
        "rate_limit": "10/second", "lifetime": 900, "jwks_file": key_file, "before": None,
    }
    assert await feed(store) == [("trust", "shop-deploy")]


async def test_defaults(service: KeyService) -> None:
    """Servers default to every upstream and the lifetime to 15 minutes; the issuer is kept as given."""
    policy = await service.put_trust_policy("k8s", issuer="http://127.0.0.1:8443/", audience="keygate",
                                            conditions={"sub": "system:serviceaccount:ci:*"}, org="acme",
                                            operations=["read"])
    assert (policy.servers, policy.lifetime, policy.issuer, policy.role) == (("*",), 900, "http://127.0.0.1:8443/", None)


async def test_names_are_listed_in_order(service: KeyService) -> None:
    """Policies are listed by name."""
    for name in ("zeta", "alpha", "mid"):
        await service.put_trust_policy(name, **policy_args())
    assert [p.name for p in await service.list_trust_policies()] == ["alpha", "mid", "zeta"]


async def test_an_existing_policy_is_only_replaced_when_asked(
    service: KeyService, store: KeyStore, clock: FakeClock[datetime],
) -> None:
    """A second put without replace is a conflict that writes nothing; with it, the settings are replaced
    and the audit event holds the settings before."""
    first = await service.put_trust_policy("shop-deploy", **policy_args())
    with pytest.raises(ConflictError, match="'shop-deploy' already exists"):
        await service.put_trust_policy("shop-deploy", **policy_args(org="other"))
    assert await service.get_trust_policy("shop-deploy") == first
    clock.advance(minutes=5)
    second = await service.put_trust_policy("shop-deploy", **policy_args(lifetime=60, role=None), replace=True)
    assert (second.lifetime, second.role, second.created_at, second.updated_at) == (60, None, first.created_at,
                                                                                    clock())
    assert await service.get_trust_policy("shop-deploy") == second
    latest, earliest = await events(store, action="trust.set")
    assert earliest.details["before"] is None
    assert latest.details["before"]["lifetime"] == 900 and latest.details["lifetime"] == 60
    assert latest.details["before"]["role"] == "admin" and latest.details["role"] is None
    assert await feed(store) == [("trust", "shop-deploy"), ("trust", "shop-deploy")]


async def test_remove(service: KeyService, store: KeyStore) -> None:
    """A removed policy is gone, audited as trust.remove with its settings and fed to gateways."""
    await service.put_trust_policy("shop-deploy", **policy_args())
    await service.remove_trust_policy("shop-deploy")
    assert await service.list_trust_policies() == []
    [event] = await events(store, action="trust.remove")
    assert event.target == "shop-deploy" and event.details["before"]["issuer"] == GITHUB
    assert await feed(store) == [("trust", "shop-deploy"), ("trust", "shop-deploy")]


async def test_unknown_policy_is_not_found(service: KeyService, store: KeyStore) -> None:
    """Showing or removing a policy that does not exist says so and writes nothing."""
    with pytest.raises(NotFound, match="no trust policy named 'nope'"):
        await service.get_trust_policy("nope")
    with pytest.raises(NotFound, match="no trust policy named 'nope'"):
        await service.remove_trust_policy("nope")
    assert await events(store, action="trust.remove") == []


async def test_a_role_in_use_by_a_policy_cannot_be_deleted(service: KeyService) -> None:
    """Deleting a role a policy yields is refused, naming the policies; once it is unused it can go."""
    await service.put_role("ci", ["deploy"])
    await service.put_trust_policy("shop-deploy", **policy_args(role="ci"))
    with pytest.raises(ConflictError) as refused:
        await service.delete_role("ci")
    assert str(refused.value) == ("role 'ci' is in use by 0 key(s), 0 member(s) and 1 trust policy(ies); "
                                  "reassign them first")
    await service.remove_trust_policy("shop-deploy")
    await service.delete_role("ci")


VALID_JWKS = json.dumps({"keys": [SIGNING_KEY]})


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"name": "bad name"}, ("name", f"trust policy 'bad name': {NAME_RULE}")),
        ({"name": ""}, ("name", f"trust policy '': {NAME_RULE}")),
        ({"issuer": "token.actions.githubusercontent.com"},
         ("issuer", "issuer 'token.actions.githubusercontent.com': use an https:// URL (http:// only for a "
                    "loopback host: 127.0.0.0/8, ::1, localhost)")),
        ({"issuer": "http://issuer.example"},
         ("issuer", "issuer 'http://issuer.example': http:// only for a loopback host (127.0.0.0/8, ::1, "
                    "localhost); use https://")),
        ({"issuer": "https://issuer.example/?tenant=1"},
         ("issuer", "issuer 'https://issuer.example/?tenant=1': no query or fragment (an issuer is a base URL)")),
        ({"issuer": "https://issuer.example#x"},
         ("issuer", "issuer 'https://issuer.example#x': no query or fragment (an issuer is a base URL)")),
        ({"issuer": "https://user@issuer.example"},
         ("issuer", "issuer 'https://user@issuer.example': no user:password@ in an issuer URL")),
        ({"audience": ""}, ("audience", "audience '': use 1-512 printable characters, without surrounding spaces")),
        ({"audience": " keygate"},
         ("audience", "audience ' keygate': use 1-512 printable characters, without surrounding spaces")),
        ({"conditions": {"ref": "refs/heads/main"}}, ("conditions", SUBJECT_RULE)),
        ({"conditions": {}}, ("conditions", SUBJECT_RULE)),
        ({"conditions": {"repository": "*"}}, ("conditions", SUBJECT_RULE)),
        ({"conditions": {"repository": "acme*"}}, ("conditions", SUBJECT_RULE)),
        ({"conditions": {"repository": "acme/shop", "": "x"}},
         ("conditions.", "claim '': use a claim name of 1-128 printable characters without spaces")),
        ({"conditions": {"repository": "acme/shop", "ref": ""}},
         ("conditions.ref", "claim ref: pattern '': use 1-1024 printable characters ('*' and '?' are wildcards)")),
        ({"org": "bad org"}, ("org", f"org 'bad org': {NAME_RULE}")),
        ({"role": "bad role"}, ("role", f"role 'bad role': {NAME_RULE}")),
        ({"operations": ["deploy", "Bad!"]},
         ("operations.1", "operation 'Bad!': use lowercase letters, digits and ':_.-', with '*' as a wildcard "
                          "(e.g. deploy, servers:read, servers:*, *:read, *)")),
        ({"servers": ["bad!"]}, ("servers.0", "server 'bad!': use '*' or a name of letters, digits and '._-'")),
        ({"ip_allowlist": ["10.0.0.0/33"]},
         ("ip_allowlist.0", "allow-ip '10.0.0.0/33': use an IPv4 or IPv6 address or CIDR (e.g. 10.0.0.0/8, "
                            "2001:db8::/32)")),
        ({"rate_limit": "lots"},
         ("rate_limit", "rate-limit: invalid rate limit 'lots': use \"N/second\", \"N/minute\", \"N/hour\" or "
                        "\"N/day\" with N >= 1, optionally \"; burst=M\" with M >= N")),
        ({"lifetime": "30s"}, ("lifetime", "lifetime '30s': use whole seconds from 1m to 1h (e.g. 15m, 1h, 900)")),
        ({"lifetime": "2h"}, ("lifetime", "lifetime '2h': use whole seconds from 1m to 1h (e.g. 15m, 1h, 900)")),
        ({"lifetime": 3601}, ("lifetime", "lifetime 3601: use whole seconds from 1m to 1h (e.g. 15m, 1h, 900)")),
        ({"lifetime": "soon"}, ("lifetime", "lifetime 'soon': use whole seconds from 1m to 1h (e.g. 15m, 1h, 900)")),
        ({"role": None, "operations": []},
         (None, "a trust policy needs a role (--role) or at least one operation (--operation)")),
        ({"role": "ghost"}, (None, "role 'ghost': no such role (see `keygate roles list`)")),
        ({"jwks_file": "jwks.json"}, ("jwks_file", "jwks-file 'jwks.json': use an absolute path")),
        ({"jwks_file": "{tmp}/missing.json"},
         ("jwks_file", "jwks-file '{tmp}/missing.json': cannot read it: No such file or directory")),
        ({"jwks_file": "{tmp}"}, ("jwks_file", "jwks-file '{tmp}': not a regular file")),
        ({"jwks_file": "{tmp}/not-json.json"}, ("jwks_file", "jwks-file '{tmp}/not-json.json': not JSON")),
        ({"jwks_file": "{tmp}/no-keys.json"},
         ("jwks_file", "jwks-file '{tmp}/no-keys.json': not a JSON Web Key Set (an object with a non-empty "
                       "\"keys\" array)")),
        ({"jwks_file": "{tmp}/empty-keys.json"},
         ("jwks_file", "jwks-file '{tmp}/empty-keys.json': not a JSON Web Key Set (an object with a non-empty "
                       "\"keys\" array)")),
    ],
)
async def test_every_bad_field_is_refused_and_nothing_is_written(
    service: KeyService, store: KeyStore, tmp_path: Path, changes: dict[str, Any],
    problem: tuple[str | None, str],
) -> None:
    """Each bad value is refused with the problem naming its field, and no policy, audit event or change is written."""
    jwks(tmp_path, "{not json", "not-json.json")
    jwks(tmp_path, json.dumps({"kid": "k1"}), "no-keys.json")
    jwks(tmp_path, json.dumps({"keys": []}), "empty-keys.json")
    args = policy_args(**{k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v
                          for k, v in changes.items()})
    name = args.pop("name", "shop-deploy")
    with pytest.raises(InvalidInput) as refused:
        await service.put_trust_policy(name, **args)
    expected = FieldProblem(problem[0], problem[1].replace("{tmp}", str(tmp_path)))
    assert refused.value.problems == (expected,)
    assert str(refused.value) == expected.message
    assert await service.list_trust_policies() == []
    assert [e for e in await events(store) if e.action != "role.set"] == []
    assert await feed(store) == []


# -- the exchange ------------------------------------------------------------------------------
@pytest.fixture
async def policy(service: KeyService) -> TrustPolicy:
    return await service.put_trust_policy("shop-deploy", **policy_args())


def exchanger(store: KeyStore, settings: Settings, clock: FakeClock[datetime], policy: str) -> KeyService:
    """The service as the exchange endpoint runs it: acting as the policy."""
    return KeyService(store, settings, actor=f"exchange:{policy}", clock=clock)


@pytest.fixture
def exchange(store: KeyStore, settings: Settings, clock: FakeClock[datetime]) -> KeyService:
    return exchanger(store, settings, clock, "shop-deploy")


async def test_exchange_mints_an_automation_key_with_the_policys_settings(
    exchange: KeyService, store: KeyStore, policy: TrustPolicy, clock: FakeClock[datetime],
) -> None:
    """The key is an automation key of the policy's org and scope, expiring a lifetime from now."""
    clock.advance(minutes=1)
    record, full = await exchange.exchange_token(policy, GITHUB_CLAIMS, token_id="t1",
                                                 token_expires_at=clock() + timedelta(minutes=5),
                                                 client_ip="203.0.113.9")
    parsed = PARSER.parse(full)
    assert parsed.key_id == record.id and record.id.startswith("kga_")
    assert (record.kind, record.org, record.user, record.role, record.operations, record.servers,
            record.ip_allowlist, record.rate_limit, record.agent) == (
        "automation", "acme", "", "admin", ("deploy",), ("prod-1",), ("10.0.0.0/8",), "10/second", False)
    assert (record.created_at, record.expires_at) == (clock(), clock() + timedelta(seconds=900))
    assert record.created_by == "exchange:shop-deploy"
    stored = await store.get_key(record.id)
    assert stored == record and exchange.hasher.verify(stored.secret_hash, parsed.secret)
    assert stored.status(clock() + timedelta(seconds=899)) is KeyStatus.ACTIVE
    assert stored.status(clock() + timedelta(seconds=900)) is KeyStatus.EXPIRED


async def test_key_exchanged_audit_event(
    exchange: KeyService, store: KeyStore, policy: TrustPolicy, clock: FakeClock[datetime],
) -> None:
    """key.exchanged names the policy, issuer, subject, client and the workload's claims, and the key's settings."""
    record, _ = await exchange.exchange_token(policy, GITHUB_CLAIMS, token_id="t1",
                                              token_expires_at=clock() + timedelta(minutes=5),
                                              client_ip="203.0.113.9")
    [event] = await events(store, key=record.id)
    assert (event.action, event.actor, event.target) == ("key.exchanged", "exchange:shop-deploy", record.id)
    assert event.details == {
        "policy": "shop-deploy", "issuer": GITHUB, "subject": "repo:acme/shop:environment:prod",
        "client_ip": "203.0.113.9", "token_id": "t1",
        "claims": {"repository": "acme/shop", "repository_owner": "acme", "ref": "refs/heads/main",
                   "sha": "e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0", "run_id": "1234", "run_attempt": "1",
                   "workflow": "deploy", "job_workflow_ref": "acme/shop/.github/workflows/deploy.yml@refs/heads/main",
                   "environment": "prod", "actor": "octocat", "event_name": "push"},
        "kind": "automation", "name": "gh acme/shop@refs/heads/main run 1234", "org": "acme", "user": "",
        "role": "admin", "operations": ["deploy"], "servers": ["prod-1"], "ip_allowlist": ["10.0.0.0/8"],
        "rate_limit": "10/second", "expires_at": (clock() + timedelta(seconds=900)).isoformat(),
    }


async def test_kubernetes_claims_in_the_audit_event(
    service: KeyService, store: KeyStore, settings: Settings, clock: FakeClock[datetime],
) -> None:
    """A service-account token's namespace and account name are kept; its pod and uids are not."""
    policy = await service.put_trust_policy(
        "k8s", issuer="https://kubernetes.default.svc.cluster.local", audience="keygate",
        conditions={"sub": "system:serviceaccount:ci:*"}, org="acme", operations=["read"])
    record, _ = await exchanger(store, settings, clock, "k8s").exchange_token(
        policy, KUBERNETES_CLAIMS, token_id="t1", token_expires_at=clock(), client_ip=None)
    [event] = await events(store, action="key.exchanged")
    assert event.details["claims"] == {"kubernetes.io": {"namespace": "ci", "serviceaccount": {"name": "builder"}}}
    assert (event.details["subject"], event.details["client_ip"]) == ("system:serviceaccount:ci:builder", None)
    assert record.name == "oidc system:serviceaccount:ci:builder"


@pytest.mark.parametrize(
    ("claim", "value", "audited"),
    [
        ("workflow", "de\x00ploy", "de\ufffdploy"),
        ("workflow", "de\ud800ploy", "de?ploy"),
        ("run_id", float("nan"), None),
        ("run_id", float("inf"), None),
    ],
    ids=["NUL", "lone surrogate", "NaN", "Infinity"],
)
async def test_claims_no_store_can_hold_are_audited_as_they_can_be(
    exchange: KeyService, store: KeyStore, policy: TrustPolicy, clock: FakeClock[datetime],
    claim: str, value: Any, audited: Any,
) -> None:
    """A string claim with a NUL or a lone surrogate, or a NaN or infinite number, still mints (PostgreSQL's jsonb holds none of them)."""
    claims = {**GITHUB_CLAIMS, claim: value, "sub": f"repo:acme/shop:{value}"}
    record, _ = await exchange.exchange_token(policy, claims, token_id="t1", token_expires_at=clock(),
                                              client_ip=None)
    [event] = await events(store, key=record.id)
    assert event.details["claims"].get(claim) == audited
    assert event.details["subject"] == f"repo:acme/shop:{audited if audited is not None else value}"
    assert record.name.isprintable()


@pytest.mark.parametrize(
    ("claims", "name"),
    [
        (GITHUB_CLAIMS, "gh acme/shop@refs/heads/main run 1234"),
        ({k: v for k, v in GITHUB_CLAIMS.items() if k != "run_id"}, "gh acme/shop@refs/heads/main"),
        ({**GITHUB_CLAIMS, "run_id": 98765}, "gh acme/shop@refs/heads/main run 98765"),
        ({"sub": "repo:acme/shop:ref:refs/heads/main", "repository": "acme/shop"},
         "oidc repo:acme/shop:ref:refs/heads/main"),
        (KUBERNETES_CLAIMS, "oidc system:serviceaccount:ci:builder"),
        ({"sub": "line\nbreak"}, "oidc line?break"),
        ({"aud": "x"}, "oidc via shop-deploy"),
        ({"repository": "acme/" + "x" * 300, "ref": "refs/heads/main"}, ("gh acme/" + "x" * 300)[:200]),
    ],
)
async def test_the_key_is_named_from_the_claims(
    exchange: KeyService, policy: TrustPolicy, clock: FakeClock[datetime], claims: dict[str, Any], name: str,
) -> None:
    """GitHub tokens name the repository, ref and run; any other token its subject; cut to 200 characters."""
    record, _ = await exchange.exchange_token(policy, claims, token_id="t1", token_expires_at=clock(),
                                              client_ip=None)
    assert record.name == name


async def test_a_replayed_token_writes_nothing(
    exchange: KeyService, store: KeyStore, policy: TrustPolicy, clock: FakeClock[datetime],
) -> None:
    """The second exchange of a token id is refused as a replay: no second key, no audit event."""
    first, _ = await exchange.exchange_token(policy, GITHUB_CLAIMS, token_id="t1",
                                             token_expires_at=clock() + timedelta(minutes=5), client_ip=None)
    clock.advance(seconds=1)
    with pytest.raises(Replayed):
        await exchange.exchange_token(policy, GITHUB_CLAIMS, token_id="t1",
                                      token_expires_at=clock() + timedelta(minutes=5), client_ip=None)
    assert [k.id for k in await exchange.list_keys()] == [first.id]
    assert [e.target for e in await events(store, action="key.exchanged")] == [first.id]


async def test_a_token_pruned_after_expiry_can_be_claimed_again(
    exchange: KeyService, store: KeyStore, policy: TrustPolicy, clock: FakeClock[datetime],
) -> None:
    """The pruner forgets an exchanged token only past its expiry and the verifier's leeway;
    the verifier refuses the token itself by then, so the id being free again is harmless."""
    expires = clock() + timedelta(minutes=5)
    await exchange.exchange_token(policy, GITHUB_CLAIMS, token_id="t1", token_expires_at=expires, client_ip=None)
    pruner = AuditPruner(store, retention_days=0, interval=3600, clock=clock)
    clock.now = expires + timedelta(seconds=TOKEN_GRACE)
    assert await pruner.prune() == 0
    with pytest.raises(Replayed):
        await exchange.exchange_token(policy, GITHUB_CLAIMS, token_id="t1", token_expires_at=expires,
                                      client_ip=None)
    clock.advance(seconds=1)
    assert await pruner.prune() == 1
    second, _ = await exchange.exchange_token(policy, GITHUB_CLAIMS, token_id="t1", token_expires_at=expires,
                                              client_ip=None)
    assert len(await events(store, action="key.exchanged")) == 2 and second.created_at == clock()


async def test_a_failed_exchange_leaves_the_token_unused(
    store: KeyStore, policy: TrustPolicy, clock: FakeClock[datetime],
) -> None:
    """Without the automation kind configured nothing is minted, and the token can be exchanged later."""
    integration_only = Settings.model_validate({"keys": {
        "kinds": {"integration": {"prefix": "kg_"}}, "argon2": {"time_cost": 1, "memory_cost": 1024, "parallelism": 1},
    }})
    with pytest.raises(InvalidInput, match="kind 'automation': unknown"):
        await exchanger(store, integration_only, clock, "shop-deploy").exchange_token(
            policy, GITHUB_CLAIMS, token_id="t1", token_expires_at=clock(), client_ip=None)
    assert await events(store, action="key.exchanged") == []
    async with store.transaction() as tx:
        assert await tx.claim_token("t1", policy="shop-deploy", at=clock(), expires_at=clock())


@pytest.mark.parametrize("change", ["replaced", "removed"])
async def test_a_policy_changed_since_verification_mints_nothing(
    service: KeyService, exchange: KeyService, store: KeyStore, policy: TrustPolicy,
    clock: FakeClock[datetime], change: str,
) -> None:
    """A token checked against a policy that was removed or replaced meanwhile is not exchanged."""
    clock.advance(seconds=1)
    if change == "removed":
        await service.remove_trust_policy("shop-deploy")
    else:
        await service.put_trust_policy("shop-deploy", **policy_args(conditions={"repository": "acme/other"}),
                                       replace=True)
    with pytest.raises(InvalidInput, match="'shop-deploy' was removed or changed meanwhile"):
        await exchange.exchange_token(policy, GITHUB_CLAIMS, token_id="t1", token_expires_at=clock(),
                                      client_ip=None)
    assert await exchange.list_keys() == []
    assert await events(store, action="key.exchanged") == []


# -- revocation --------------------------------------------------------------------------------
@pytest.mark.parametrize(("reason", "details"), [("self", {"reason": "self"}), (None, {})])
async def test_revoke_reason_is_audited(
    exchange: KeyService, store: KeyStore, policy: TrustPolicy, clock: FakeClock[datetime], reason: str | None,
    details: dict[str, str],
) -> None:
    """A reason given to revoke_key is kept in the key.revoke event; none leaves the details empty."""
    record, _ = await exchange.exchange_token(policy, GITHUB_CLAIMS, token_id="t1", token_expires_at=clock(),
                                              client_ip=None)
    await exchange.revoke_key(record.id, reason=reason)
    [event] = await events(store, action="key.revoke")
    assert (event.target, event.details) == (record.id, details)
