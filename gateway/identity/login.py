"""``keygate login``, ``whoami``, ``token`` and ``logout``: a person's agent key, from sign-in to revocation.

The flows run here (the CLI only prints); what they say goes through ``say``
so the commands and the tests read the same lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from .credentials import ENV_TOKEN, Credential, credentials_path, find, load, put, update, without
from .device import DeviceLogin, LoginError, checked_url, read_at_most

TIMEOUT = aiohttp.ClientTimeout(total=30)


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=TIMEOUT, headers={"User-Agent": "keygate-cli"})


async def login(gateway: str, org: str | None, say: Callable[[str], None], *,
                environ: Mapping[str, str] = os.environ, flow: type[DeviceLogin] = DeviceLogin) -> Credential:
    """Sign in at the gateway's provider with the device grant and store the agent key it answers."""
    path = credentials_path(environ)
    load(path)  # a file others may read is refused before anyone signs in
    async with _session() as session:
        device = flow(session)
        info = await device.gateway_info(gateway)
        code, token_endpoint = await device.start(info)
        minutes = max(1, round(code.expires_in / 60))
        if code.verification_uri_complete:
            say(f"To sign in, open {code.verification_uri_complete}")
            say(f"and check that it shows the code {code.user_code} (it expires in {minutes} min).")
        else:
            say(f"To sign in, open {code.verification_uri} and enter the code {code.user_code} "
                f"(it expires in {minutes} min).")
        say("Waiting for you to approve ...")
        id_token = await device.wait(info, code, token_endpoint)
        answer = await device.exchange(info, id_token, org)
    credential = Credential(gateway=info.gateway, org=answer["org"], user=answer["user"], key_id=answer["key_id"],
                            key=answer["access_token"])
    update(path, lambda entries: put(entries, credential))
    say(f"Signed in to {credential.gateway} as {credential.user} in org {credential.org} "
        f"(agent key {credential.key_id}; any earlier one is revoked). Stored in {path}.")
    return credential


def current(gateway: str | None, org: str | None, environ: Mapping[str, str] = os.environ) -> Credential | None:
    """The stored credential for ``gateway``/``org``; None when ``KEYGATE_TOKEN`` is set (it wins)."""
    if environ.get(ENV_TOKEN):
        return None
    return find(load(credentials_path(environ)), gateway, org)


def token(gateway: str | None, org: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """The key to send: ``KEYGATE_TOKEN`` if set, else the stored one."""
    from_env = environ.get(ENV_TOKEN)
    if from_env:
        return from_env.strip()
    return find(load(credentials_path(environ)), gateway, org).key


async def whoami(gateway: str | None, org: str | None, *, environ: Mapping[str, str] = os.environ,
                 ) -> dict[str, Any]:
    """Who the key is, as the gateway sees it now (a revoked or expired key is said to be so)."""
    stored = current(gateway, org, environ)
    if stored is None and not gateway:
        raise LoginError(f"{ENV_TOKEN} is set: name its gateway with --gateway URL")
    base = checked_url(gateway or stored.gateway, "gateway")  # type: ignore[union-attr]
    key = token(gateway, org, environ)
    async with _session() as session:
        status, answer = await _call(session, "GET", base + "/.well-known/keygate/whoami", key)
    if status == 401:
        raise LoginError(f"the key is no longer valid at {base} (expired or revoked): run `keygate login`")
    if status != 200:
        raise LoginError(f"{base} answered {status}: {answer.get('error_description') or answer.get('error')}")
    return {"gateway": base, **answer}


async def logout(gateway: str | None, org: str | None, say: Callable[[str], None], *,
                 environ: Mapping[str, str] = os.environ) -> Credential:
    """Revoke the stored key through the gateway and remove it from the file."""
    path = credentials_path(environ)
    entries = load(path)
    stored = find(entries, gateway, org)
    async with _session() as session:
        status, answer = await _call(session, "POST", stored.gateway + "/.well-known/keygate/revoke", stored.key)
    # SECURITY: the key leaves the file only when Keygate itself says it is dead: a 200 or 401 from whatever
    # else answers at that address (a captive portal, an ingress's sign-in wall) would drop a live key.
    if status == 401 and answer.get("error") == "invalid_token":
        say(f"The key {stored.key_id} was already expired or revoked.")
    elif status != 200 or answer.get("revoked") != stored.key_id:
        # Kept in the file: the person can try again, or revoke it as an operator would.
        raise LoginError(f"{stored.gateway} did not revoke the key ({status}: "
                         f"{answer.get('error_description') or answer.get('error')}); it is still stored")
    else:
        say(f"Revoked {stored.key_id} at {stored.gateway}.")
    update(path, lambda entries: without(entries, stored))
    say(f"Signed out of {stored.gateway} (org {stored.org}).")
    return stored


async def _call(session: aiohttp.ClientSession, method: str, url: str, key: str) -> tuple[int, dict[str, Any]]:
    try:
        async with session.request(method, url, headers={"Authorization": f"Bearer {key}"},
                                   allow_redirects=False) as r:
            raw = await read_at_most(r.content, 64 * 1024)
            status = r.status
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise LoginError(f"{url} could not be reached: {exc or type(exc).__name__}") from None
    try:
        answer = json.loads(raw) if raw else {}
    except ValueError:
        answer = {}
    return status, answer if isinstance(answer, dict) else {}


__all__ = ["current", "login", "logout", "token", "whoami"]
