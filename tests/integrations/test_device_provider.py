"""The device-grant provider harness (tests/oidc_provider) against the real protocol, from Python.

These prove the harness that ``keygate login``'s tests (issue 16) stand on: panva's oidc-provider
answers RFC 8628 as a client sees it (device authorization, ``authorization_pending``,
``slow_down``, ``access_denied``, ``expired_token``, the token response) and
:meth:`DeviceProvider.approve` gets a person through its real pages. Under ``CI=true`` a missing
node or npm, or a failed ``npm ci``, fails these tests; elsewhere it skips them.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from ..oidc_provider import (ALICE, BOB, CLIENT_ID, DEVICE_GRANT, EVE, HERE, OTHER_CLIENT_ID, SCOPE, USERS,
                             ApprovalError, DeviceProvider, ensure_installed, installed_version, pinned_version, tool)


# -- a device client, as RFC 8628 has it ------------------------------------------------------------
async def authorize(idp: DeviceProvider, client_id: str = CLIENT_ID, scope: str = SCOPE) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(idp.device_authorization_endpoint, data={"client_id": client_id, "scope": scope}) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Cache-Control"] == "no-store"
            return dict(await r.json())


async def poll(idp: DeviceProvider, device_code: str, client_id: str = CLIENT_ID) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        data = {"grant_type": DEVICE_GRANT, "device_code": device_code, "client_id": client_id}
        async with http.post(idp.token_endpoint, data=data) as r:
            return r.status, dict(await r.json())


async def verified_claims(idp: DeviceProvider, id_token: str, audience: str = CLIENT_ID) -> dict[str, Any]:
    """The ID token's claims once its signature checks against the provider's published JWKS."""
    async with aiohttp.ClientSession() as http:
        async with http.get(idp.jwks_uri) as r:
            assert r.status == 200
            jwks = jwt.PyJWKSet.from_dict(await r.json())
    header = jwt.get_unverified_header(id_token)
    assert header["alg"] == "RS256"
    (key,) = [k for k in jwks.keys if k.key_id == header["kid"]]
    return dict(jwt.decode(id_token, key.key, algorithms=["RS256"], audience=audience, issuer=idp.issuer,
                           options={"require": ["iss", "aud", "exp", "iat", "sub"]}))


async def wait_for_token(idp: DeviceProvider, grant: dict[str, Any], client_id: str = CLIENT_ID) -> dict[str, Any]:
    for _ in range(10):
        await asyncio.sleep(grant["interval"])
        status, body = await poll(idp, grant["device_code"], client_id)
        if body.get("error") != "authorization_pending":
            assert status == 200, body
            return body
    raise AssertionError("still pending after 10 polls")


# -- the flow ------------------------------------------------------------------------------------------
async def test_discovery_names_the_device_grant_and_rs256() -> None:
    async with DeviceProvider() as idp:
        d = idp.discovery
        assert idp.issuer.startswith("http://127.0.0.1:") and d["issuer"] == idp.issuer
        assert d["device_authorization_endpoint"] == f"{idp.issuer}/device/auth"
        assert DEVICE_GRANT in d["grant_types_supported"]
        assert "RS256" in d["id_token_signing_alg_values_supported"]
        assert "none" in d["token_endpoint_auth_methods_supported"]
        assert {"openid", "email", "profile"} <= set(d["scopes_supported"])
        assert {"email", "email_verified", "name"} <= set(d["claims_supported"])
        assert (idp.client_id, idp.other_client_id) == ("keygate-cli", "another-cli")


async def test_pending_then_approved_gives_an_id_token_that_verifies_against_the_jwks() -> None:
    async with DeviceProvider(interval=1) as idp:
        grant = await authorize(idp)
        assert grant["verification_uri"] == idp.verification_uri
        assert grant["verification_uri_complete"] == f"{idp.verification_uri}?user_code={grant['user_code']}"
        assert grant["interval"] == 1 and grant["expires_in"] == 600
        assert len(grant["user_code"]) == 9 and grant["user_code"][4] == "-"

        status, body = await poll(idp, grant["device_code"])
        assert (status, body["error"]) == (400, "authorization_pending")

        await idp.approve(grant["user_code"], user=ALICE)
        tokens = await wait_for_token(idp, grant)
        assert tokens["token_type"] == "Bearer" and tokens["access_token"]
        claims = await verified_claims(idp, tokens["id_token"])
        alice = USERS[ALICE]
        assert claims["iss"] == idp.issuer and claims["aud"] == CLIENT_ID
        assert (claims["sub"], claims["email"], claims["email_verified"], claims["name"]) == (
            alice.sub, ALICE, True, alice.name)

        # A device code is good for one token response; the second answer revokes the grant.
        status, body = await poll(idp, grant["device_code"])
        assert (status, body["error"]) == (400, "invalid_grant")


async def test_verification_uri_complete_approves_with_the_code_in_it() -> None:
    async with DeviceProvider() as idp:
        grant = await authorize(idp)
        await idp.approve_uri(grant["verification_uri_complete"], user=BOB)
        claims = await verified_claims(idp, (await wait_for_token(idp, grant))["id_token"])
        assert (claims["email"], claims["sub"]) == (BOB, USERS[BOB].sub)


async def test_the_other_client_gets_tokens_for_itself_only() -> None:
    async with DeviceProvider() as idp:
        grant = await authorize(idp, client_id=OTHER_CLIENT_ID)
        await idp.approve(grant["user_code"])
        status, body = await poll(idp, grant["device_code"], client_id=CLIENT_ID)
        assert (status, body["error"]) == (400, "invalid_grant")
        tokens = await wait_for_token(idp, grant, client_id=OTHER_CLIENT_ID)
        claims = await verified_claims(idp, tokens["id_token"], audience=OTHER_CLIENT_ID)
        assert claims["aud"] == OTHER_CLIENT_ID and claims["email"] == ALICE
        with pytest.raises(jwt.InvalidAudienceError):
            await verified_claims(idp, tokens["id_token"], audience=CLIENT_ID)


async def test_an_unverified_email_is_said_so_in_the_id_token() -> None:
    async with DeviceProvider() as idp:
        grant = await authorize(idp)
        await idp.approve(grant["user_code"], user=EVE)
        claims = await verified_claims(idp, (await wait_for_token(idp, grant))["id_token"])
        assert (claims["email"], claims["email_verified"]) == (EVE, False)


async def test_polling_faster_than_the_interval_gets_slow_down_and_five_more_seconds() -> None:
    async with DeviceProvider(interval=1) as idp:
        grant = await authorize(idp)
        assert (await poll(idp, grant["device_code"]))[1]["error"] == "authorization_pending"
        status, body = await poll(idp, grant["device_code"])
        assert (status, body["error"]) == (400, "slow_down")
        assert "6 seconds" in body["error_description"]
        # From then on the pace is interval + 5 s: 1.1 s later is still too fast.
        await asyncio.sleep(1.1)
        assert (await poll(idp, grant["device_code"]))[1]["error"] == "slow_down"


async def test_polling_at_the_interval_never_gets_slow_down() -> None:
    async with DeviceProvider(interval=1) as idp:
        grant = await authorize(idp)
        for _ in range(3):
            assert (await poll(idp, grant["device_code"]))[1]["error"] == "authorization_pending"
            await asyncio.sleep(1.0)


async def test_slow_down_can_be_turned_off_and_interval_left_to_the_provider() -> None:
    async with DeviceProvider(interval=None, slow_down=False) as idp:
        grant = await authorize(idp)
        assert "interval" not in grant  # oidc-provider's own answer: clients fall back to 5 s
        for _ in range(3):
            assert (await poll(idp, grant["device_code"]))[1]["error"] == "authorization_pending"


async def test_denied_consent_gives_access_denied() -> None:
    async with DeviceProvider() as idp:
        grant = await authorize(idp)
        await idp.approve(grant["user_code"], user=BOB, consent=False)
        await asyncio.sleep(grant["interval"])
        status, body = await poll(idp, grant["device_code"])
        assert (status, body["error"]) == (400, "access_denied")


async def test_an_expired_code_gives_expired_token_and_cannot_be_approved() -> None:
    async with DeviceProvider(device_code_ttl=2) as idp:
        grant = await authorize(idp)
        assert grant["expires_in"] == 2
        assert (await poll(idp, grant["device_code"]))[1]["error"] == "authorization_pending"
        await asyncio.sleep(2.2)
        status, body = await poll(idp, grant["device_code"])
        assert (status, body["error"]) == (400, "expired_token")
        with pytest.raises(ApprovalError, match="code was not accepted"):
            await idp.approve(grant["user_code"])


async def test_a_wrong_password_or_code_is_refused_and_the_code_stays_pending() -> None:
    async with DeviceProvider() as idp:
        grant = await authorize(idp)
        with pytest.raises(ApprovalError, match="sign-in refused"):
            await idp.approve(grant["user_code"], password="not-the-password")
        with pytest.raises(ApprovalError, match="code was not accepted"):
            await idp.approve("BCDF-GHJK")
        await asyncio.sleep(grant["interval"])
        assert (await poll(idp, grant["device_code"]))[1]["error"] == "authorization_pending"


async def test_the_provider_stops_with_its_context() -> None:
    async with DeviceProvider() as idp:
        process = idp.process
        assert process is not None
        url = f"{idp.issuer}/.well-known/openid-configuration"
    assert process.returncode == 0
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(url):
                pass


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited, whoever reaps it


def test_the_provider_does_not_outlive_a_killed_test_process(tmp_path: Path) -> None:
    starter = tmp_path / "starter.py"
    starter.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(HERE.parents[1])!r})\n"
        "from tests.oidc_provider import DeviceProvider\n"
        "idp = DeviceProvider().start()\n"
        "print(idp.process.pid, flush=True)\n"
        "time.sleep(120)\n")
    test_process = subprocess.Popen([sys.executable, str(starter)], stdout=subprocess.PIPE, text=True)
    try:
        assert test_process.stdout is not None
        node_pid = int(test_process.stdout.readline())
        assert alive(node_pid)
    finally:
        test_process.kill()
        test_process.wait(10)
    deadline = time.monotonic() + 10
    while alive(node_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(node_pid), f"node {node_pid} outlived the process that started it"


# -- installation: a failure under CI=true, a skip elsewhere -------------------------------------------------
@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)],
                         ids=["ci", "local"])
def test_missing_node_or_npm_fails_in_ci_and_skips_elsewhere(ci: str, outcome: type[BaseException]) -> None:
    for name in ("node", "npm"):
        # BaseException: a skip where a failure is due must fail this test, not skip it.
        with pytest.raises(BaseException, match=f"{name} is not installed") as raised:
            tool(name, environ={"CI": ci, "PATH": "/nonexistent"})
        assert raised.type is outcome


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)],
                         ids=["ci", "local"])
def test_a_failed_npm_ci_fails_in_ci_and_skips_elsewhere(ci: str, outcome: type[BaseException],
                                                         tmp_path: Path) -> None:
    """A folder whose lock pins oidc-provider but whose package.json npm cannot read: npm ci fails at once."""
    shutil.copy(HERE / "package-lock.json", tmp_path / "package-lock.json")
    (tmp_path / "package.json").write_text("{ not json")
    npm = tool("npm")
    with pytest.raises(BaseException, match="npm ci.*failed") as raised:
        ensure_installed(tmp_path, environ={"CI": ci, "PATH": str(Path(npm).parent)})
    assert raised.type is outcome


def test_the_lock_pins_one_oidc_provider_release_that_runs_on_node_20() -> None:
    """package.json pins the release exactly, and the lock agrees: 8.x, the last major for Node.js 20 and 18
    (9.0.0 dropped both)."""
    package = json.loads((HERE / "package.json").read_text())
    assert package["dependencies"] == {"oidc-provider": pinned_version()}
    assert pinned_version().startswith("8.")


def test_the_default_users() -> None:
    assert sorted(USERS) == ["alice@example.com", "bob@example.com", "eve@example.com", "mallory@example.com"]
    assert [u.email for u in USERS.values() if not u.email_verified] == [EVE]
    assert len({u.sub for u in USERS.values()}) == len({u.password for u in USERS.values()}) == 4


def test_a_folder_without_node_modules_gets_the_pinned_release(tmp_path: Path) -> None:
    """What DeviceProvider does before starting when scripts/test has not run: npm ci, once."""
    for name in ("package.json", "package-lock.json"):
        shutil.copy(HERE / name, tmp_path / name)
    assert installed_version(tmp_path) is None
    ensure_installed(tmp_path)
    assert installed_version(tmp_path) == pinned_version(tmp_path) == pinned_version()
    stamp = (tmp_path / "node_modules" / "oidc-provider" / "package.json").stat().st_mtime_ns
    ensure_installed(tmp_path)  # already there: no second install
    assert (tmp_path / "node_modules" / "oidc-provider" / "package.json").stat().st_mtime_ns == stamp
