"""`keygate login` as a person runs it, against a real OpenID provider (panva's oidc-provider, device grant).

The CLI is started as a user starts it; the test reads the code it prints,
approves it at the provider as the person would (its own pages: the code,
sign-in and consent forms), sees the CLI finish, then uses `keygate token`
through the proxy. The provider is tests/oidc_provider (installed by
scripts/test; under CI=true it fails, never skips, when it cannot run).
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import upstream  # noqa: F401  (the module-scoped upstream fixture)
from tests.e2e.harness import KEYGATE, Keygate, Upstream, clean_env
from tests.oidc_provider import ALICE, BOB, MALLORY, DeviceProvider

CODE_LINE = re.compile(r"open (\S+)\s+and check that it shows the code (\S+)")


@pytest.fixture(scope="module")
def idp() -> Iterator[DeviceProvider]:
    with DeviceProvider(interval=1) as provider:
        yield provider


@pytest.fixture(scope="module")
def gateway(idp: DeviceProvider, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    keygate = Keygate(tmp_path_factory.mktemp("login"), upstream.url,
                      config=f'[login]\nissuer = "{idp.issuer}"\nclient_id = "{idp.client_id}"\n').start()
    for args in (["roles", "set", "dev", "--grant", "read"], ["members", "set", "acme", ALICE, "dev"],
                 ["members", "set", "acme", BOB, "dev"]):
        cli(keygate, {}, *args)
    yield keygate
    keygate.stop()


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """A person's environment: their own config folder."""
    return {"XDG_CONFIG_HOME": str(tmp_path / "config"), "HOME": str(tmp_path)}


def cli(keygate: Keygate, env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KEYGATE, "--config", str(keygate.config_path), *args], env=clean_env(**env),
                          capture_output=True, text=True, timeout=60, check=check)


async def login(idp: DeviceProvider, gateway: Keygate, env: dict[str, str], *, user: str = ALICE,
                consent: bool = True, org: str | None = None, approve: bool = True) -> tuple[int, str, str]:
    """Run `keygate login` as the person would, approving (or denying) at the provider; (exit status, out, err)."""
    process = await asyncio.create_subprocess_exec(
        KEYGATE, "login", "--gateway", gateway.proxy_url, *(["--org", org] if org else []),
        env=clean_env(**env), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    shown = ""
    while (match := CODE_LINE.search(shown)) is None:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        if not line:
            break
        shown += line.decode()
    if match is not None and approve:
        uri, code = match.groups()
        assert code in uri  # verification_uri_complete carries the code the person is told to check
        await idp.approve_uri(uri, user=user, consent=consent)
    out, err = await asyncio.wait_for(process.communicate(), 90)
    return process.returncode or 0, shown + out.decode(), err.decode()


async def status_through_proxy(gateway: Keygate, key: str) -> int:
    async with aiohttp.ClientSession() as http, \
            http.get(gateway.proxy_url + "/items", headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status


async def test_a_person_signs_in_and_their_key_works_through_the_proxy(
    idp: DeviceProvider, gateway: Keygate, home: dict[str, str],
) -> None:
    status, out, err = await login(idp, gateway, home)
    assert status == 0, err
    assert f"Signed in to {gateway.proxy_url} as {ALICE} in org acme" in out
    path = Path(home["XDG_CONFIG_HOME"]) / "keygate" / "credentials.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = cli(gateway, home, "token").stdout.strip()
    assert key and key in path.read_text()
    assert await status_through_proxy(gateway, key) == 200
    whoami = cli(gateway, home, "whoami").stdout
    assert ALICE in whoami and "acme" in whoami
    assert key not in out + err + whoami  # only `keygate token` prints the key

    # Signing in again rotates the key: the old one is refused within a second.
    status, _, err = await login(idp, gateway, home)
    assert status == 0, err
    again = cli(gateway, home, "token").stdout.strip()
    assert again != key and await status_through_proxy(gateway, again) == 200
    for _ in range(10):
        if await status_through_proxy(gateway, key) == 401:
            break
        await asyncio.sleep(0.1)
    assert await status_through_proxy(gateway, key) == 401

    # logout revokes it through the gateway and forgets it.
    done = cli(gateway, home, "logout")
    assert "Revoked" in done.stdout and again not in done.stdout + done.stderr
    assert await status_through_proxy(gateway, again) == 401
    gone = cli(gateway, home, "token", check=False)
    assert gone.returncode == 2 and "not signed in" in gone.stderr


async def test_keygate_token_from_the_environment_wins(
    idp: DeviceProvider, gateway: Keygate, home: dict[str, str],
) -> None:
    assert cli(gateway, {**home, "KEYGATE_TOKEN": "kg_from_the_environment"}, "token").stdout.strip() == \
        "kg_from_the_environment"


async def test_removing_the_member_kills_their_key(
    idp: DeviceProvider, gateway: Keygate, home: dict[str, str],
) -> None:
    status, _, err = await login(idp, gateway, home, user=BOB)
    assert status == 0, err
    key = cli(gateway, home, "token").stdout.strip()
    assert await status_through_proxy(gateway, key) == 200
    cli(gateway, {}, "members", "remove", "acme", BOB, "--yes")
    for _ in range(40):
        if await status_through_proxy(gateway, key) != 200:
            break
        await asyncio.sleep(0.1)
    assert await status_through_proxy(gateway, key) in (401, 403)
    cli(gateway, {}, "members", "set", "acme", BOB, "dev")


@pytest.mark.parametrize(("case", "user", "consent", "says"), [
    ("not a member", MALLORY, True, f"{MALLORY} is not a member of any org"),
    ("consent denied", ALICE, False, "sign-in was denied at the provider"),
], ids=lambda v: v if isinstance(v, str) and " " in v else None)
async def test_a_refused_sign_in_is_one_clear_line_exit_1_and_no_key(
    idp: DeviceProvider, gateway: Keygate, home: dict[str, str], case: str, user: str, consent: bool, says: str,
) -> None:
    status, _, err = await login(idp, gateway, home, user=user, consent=consent)
    assert status == 1
    assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (Path(home["XDG_CONFIG_HOME"]) / "keygate" / "credentials.toml").exists()


async def test_an_expired_code_says_so(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory, home: dict[str, str],
) -> None:
    async with DeviceProvider(device_code_ttl=3, interval=1) as brief:
        keygate = Keygate(tmp_path_factory.mktemp("login-expired"), upstream.url,
                          config=f'[login]\nissuer = "{brief.issuer}"\nclient_id = "{brief.client_id}"\n').start()
        try:
            status, _, err = await login(brief, keygate, home, approve=False)
        finally:
            keygate.stop()
    assert status == 1
    assert "the code expired before it was approved" in err


async def test_a_gateway_without_sign_in_says_so(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory,
                                                 home: dict[str, str]) -> None:
    keygate = Keygate(tmp_path_factory.mktemp("no-login"), upstream.url).start()
    try:
        done = subprocess.run([KEYGATE, "login", "--gateway", keygate.proxy_url], env=clean_env(**home),
                              capture_output=True, text=True, timeout=60)
    finally:
        keygate.stop()
    assert done.returncode == 1 and "does not offer sign-in" in done.stderr


def test_the_credentials_file_is_private_even_with_a_lax_umask(home: dict[str, str]) -> None:
    """Covered in tests/unit/identity/test_credentials.py; here only that the CLI refuses a readable file."""
    path = Path(home["XDG_CONFIG_HOME"]) / "keygate" / "credentials.toml"
    path.parent.mkdir(parents=True)
    path.write_text("")
    os.chmod(path, 0o644)
    done = subprocess.run([KEYGATE, "token"], env=clean_env(**home), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "chmod 600" in done.stderr


async def test_the_client_slows_down_when_the_provider_says_so(idp: DeviceProvider, gateway: Keygate) -> None:
    """RFC 8628 section 3.5: after slow_down the client waits 5 s more on every later poll.

    The client's sleep is the one thing replaced: its first two waits are skipped, so its second poll
    comes sooner than the provider's interval after the first and the provider answers slow_down.
    """
    from gateway.identity.device import DeviceLogin

    asked: list[float] = []

    async def sleep(seconds: float) -> None:
        asked.append(seconds)
        if len(asked) == 3:
            await idp.approve(code.user_code, user=ALICE)  # approved while the client waits
            await asyncio.sleep(seconds)  # the provider holds it to the slower pace too

    async with aiohttp.ClientSession() as session:
        device = DeviceLogin(session, sleep=sleep)
        info = await device.gateway_info(gateway.proxy_url)
        code, token_endpoint = await device.start(info)
        id_token = await asyncio.wait_for(device.wait(info, code, token_endpoint), 60)
    assert id_token.count(".") == 2
    assert asked[:2] == [code.interval, code.interval] == [1, 1]
    assert asked[2] == code.interval + 5  # slowed down after the provider's slow_down
