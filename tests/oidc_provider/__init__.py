"""A real OpenID provider with the device grant (RFC 8628) for the tests, on loopback.

``provider.mjs`` beside this file runs panva's ``oidc-provider`` (the release pinned in
``package.json`` / ``package-lock.json``) on the machine's Node.js; :class:`DeviceProvider`
starts it on a free port of 127.0.0.1 and stops it, and :meth:`DeviceProvider.approve` plays the
person at the other end: it opens the verification page, types the user code, signs in and
approves (or denies) on the provider's own pages, with plain HTTP form posts.

    async with DeviceProvider(device_code_ttl=5, interval=1) as idp:
        # the client under test: POST idp.device_authorization_endpoint with
        # client_id=idp.client_id&scope=openid email profile, then poll idp.token_endpoint
        await idp.approve(user_code, user=ALICE)           # or consent=False to deny
        # ID tokens: RS256, iss=idp.issuer, aud=the client id, keys at idp.jwks_uri

The npm packages are installed by ``scripts/test`` (``npm ci`` in this folder); when
``node_modules`` is missing or holds another oidc-provider release, the harness runs ``npm ci``
itself, once (a file lock keeps parallel runs from racing). Without node or npm, or when that
install fails, the tests skip on a developer's machine and fail under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "provider.mjs"
USERS_FILE = HERE / "users.json"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CLIENT_ID = "keygate-cli"
OTHER_CLIENT_ID = "another-cli"
SCOPE = "openid email profile"
ALICE = "alice@example.com"
BOB = "bob@example.com"
MALLORY = "mallory@example.com"
EVE = "eve@example.com"  # email_verified false
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class TestUser:
    """A person the provider knows; ``sub``, ``email``, ``email_verified`` and ``name`` are their claims."""

    __test__ = False  # not a pytest test class

    sub: str
    email: str
    email_verified: bool
    name: str
    password: str


def default_users() -> dict[str, TestUser]:
    """The users of ``users.json``, by email: alice, bob, mallory (verified) and eve (unverified)."""
    return {u["email"]: TestUser(**u) for u in json.loads(USERS_FILE.read_text())}


USERS = default_users()


class ApprovalError(AssertionError):
    """The provider's pages did not go as a person approving (or denying) a code expects."""


# -- installing ---------------------------------------------------------------------------------
def unavailable(message: str, environ: Mapping[str, str] = os.environ) -> None:
    """Fail under CI=true, skip elsewhere: never a silent pass."""
    if environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def tool(name: str, environ: Mapping[str, str] = os.environ) -> str:
    """``name`` (node or npm) from PATH; skip without it, fail under CI=true."""
    found = shutil.which(name, path=environ.get("PATH"))
    if found is None:
        package = "nodejs" if name == "node" else "npm"
        unavailable(f"{name} is not installed: scripts/test installs it (as root: apt-get install {package})", environ)
    assert found is not None
    return found


def pinned_version(folder: Path = HERE) -> str:
    return json.loads((folder / "package-lock.json").read_text())["packages"]["node_modules/oidc-provider"]["version"]


def installed_version(folder: Path = HERE) -> str | None:
    try:
        return json.loads((folder / "node_modules" / "oidc-provider" / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def ensure_installed(folder: Path = HERE, environ: Mapping[str, str] = os.environ) -> None:
    """``npm ci`` in ``folder`` unless its node_modules already holds the pinned oidc-provider."""
    if installed_version(folder) == pinned_version(folder):
        return
    npm = tool("npm", environ)
    lock_path = Path(tempfile.gettempdir()) / "keygate-oidc-provider-npm-ci.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed_version(folder) == pinned_version(folder):
            return
        try:
            done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=folder, env=dict(environ),
                                  capture_output=True, text=True, timeout=600)
            failure = None if done.returncode == 0 else f"exit {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            failure = str(exc)
        if failure is None and installed_version(folder) != pinned_version(folder):
            failure = f"node_modules has oidc-provider {installed_version(folder)}, the lock pins {pinned_version(folder)}"
        if failure is not None:
            unavailable(f"`npm ci` in {folder} failed (scripts/test runs it): {failure}", environ)


# -- the provider's pages, read as a browser would -------------------------------------------------
@dataclass
class Form:
    id: str | None
    action: str
    method: str
    fields: list[tuple[str, str]] = field(default_factory=list)
    buttons: list[tuple[str, str]] = field(default_factory=list)


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[Form] = []
        self.title = ""
        self.text: list[str] = []
        self._open: Form | None = None
        self._in_title = False
        self._skip = 0

    def _owner(self, attrs: dict[str, str | None]) -> Form | None:
        if attrs.get("form"):
            return next((f for f in self.forms if f.id == attrs["form"]), None)
        return self._open

    def handle_starttag(self, tag: str, attrs_list: list[tuple[str, str | None]]) -> None:
        attrs = dict(attrs_list)
        if tag == "form":
            self._open = Form(attrs.get("id"), attrs.get("action") or "", (attrs.get("method") or "get").lower())
            self.forms.append(self._open)
        elif tag == "input":
            owner = self._owner(attrs)
            kind = (attrs.get("type") or "text").lower()
            if owner is not None and attrs.get("name") and kind not in ("submit", "button", "image", "reset"):
                owner.fields.append((attrs["name"] or "", attrs.get("value") or ""))
        elif tag == "button":
            owner = self._owner(attrs)
            if owner is not None:
                owner.buttons.append((attrs.get("name") or "", attrs.get("value") or ""))
        elif tag == "title":
            self._in_title = True
        elif tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._open = None
        elif tag == "title":
            self._in_title = False
        elif tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif not self._skip and data.strip():
            self.text.append(" ".join(data.split()))


@dataclass
class Page:
    url: URL
    status: int
    title: str
    text: str
    forms: list[Form]

    def form(self, form_id: str | None = None) -> Form | None:
        if form_id is None:
            return self.forms[0] if self.forms else None
        return next((f for f in self.forms if f.id == form_id), None)

    def describe(self) -> str:
        return f"{self.status} {self.url} {self.title!r}: {self.text[:500]}"


async def _page(response: aiohttp.ClientResponse) -> Page:
    parser = _FormParser()
    parser.feed(await response.text())
    parser.close()
    return Page(response.url, response.status, parser.title.strip(), " ".join(parser.text), parser.forms)


# -- the provider -------------------------------------------------------------------------------
class DeviceProvider:
    """panva's oidc-provider on 127.0.0.1 with the device grant, two public clients and the test users.

    ``device_code_ttl``: seconds a device code lives (the provider's ``ttl.DeviceCode``).
    ``interval``: the ``interval`` its device authorization responses carry, and the pace below which
    it answers ``slow_down``; ``None`` sends none, as oidc-provider itself does (clients then poll
    every 5 s). ``slow_down=False`` never answers ``slow_down``. ``users`` replaces ``users.json``.
    """

    client_id = CLIENT_ID
    other_client_id = OTHER_CLIENT_ID

    def __init__(self, *, device_code_ttl: int = 600, interval: int | None = 1, slow_down: bool = True,
                 users: Sequence[TestUser] | None = None, environ: Mapping[str, str] = os.environ) -> None:
        self.device_code_ttl = device_code_ttl
        self.interval = interval
        self.slow_down = slow_down
        self.users = {u.email: u for u in users} if users is not None else dict(USERS)
        self.environ = environ
        self.issuer = ""
        self.discovery: dict[str, Any] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self.log_path: Path | None = None

    # endpoints, from the provider's discovery document
    @property
    def device_authorization_endpoint(self) -> str:
        return str(self.discovery["device_authorization_endpoint"])

    @property
    def token_endpoint(self) -> str:
        return str(self.discovery["token_endpoint"])

    @property
    def jwks_uri(self) -> str:
        return str(self.discovery["jwks_uri"])

    @property
    def verification_uri(self) -> str:
        """Where a person types a user code (oidc-provider's ``code_verification`` route)."""
        return f"{self.issuer}/device"

    # lifecycle
    def start(self) -> "DeviceProvider":
        node = tool("node", self.environ)
        ensure_installed(HERE, self.environ)
        self._folder = tempfile.TemporaryDirectory(prefix="keygate-idp-")
        folder = Path(self._folder.name)
        self.log_path = folder / "provider.log"
        env = {k: v for k, v in self.environ.items() if not k.startswith("KEYGATE_")}
        env.update(PORT="0", DEVICE_CODE_TTL=str(self.device_code_ttl), SLOW_DOWN="1" if self.slow_down else "0",
                   CLIENT_IDS=f"{self.client_id},{self.other_client_id}", STOP_ON_STDIN_CLOSE="1")
        env.pop("INTERVAL", None)
        if self.interval is not None:
            env["INTERVAL"] = str(self.interval)
        users_file = folder / "users.json"
        users_file.write_text(json.dumps([asdict(u) for u in self.users.values()]))
        env["USERS_FILE"] = str(users_file)
        with self.log_path.open("ab") as log:
            # stdin: a pipe only this process holds; node exits when it closes, even if this one is killed.
            self.process = subprocess.Popen([node, str(SCRIPT)], cwd=HERE, env=env, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log)
        try:
            self.issuer = self._read_issuer()
            self.discovery = self._wait_discovery()
        except BaseException as exc:
            tail = self.log_tail()
            self.stop()
            raise AssertionError(f"oidc-provider did not start: {exc}\nlog tail:\n{tail}") from None
        return self

    def _read_issuer(self) -> str:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no issuer line within {START_TIMEOUT:.0f} s")
            ready, _, _ = select.select([self.process.stdout], [], [], remaining)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(f"node exited with {self.process.wait(5)} before listening")
                line += chunk
        return str(json.loads(line.split(b"\n", 1)[0])["issuer"])

    def _wait_discovery(self) -> dict[str, Any]:
        url = f"{self.issuer}/.well-known/openid-configuration"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    document = json.load(response)
                assert document["issuer"] == self.issuer, document
                return dict(document)
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(10)
            for pipe in (self.process.stdin, self.process.stdout):
                if pipe is not None:
                    pipe.close()
            self.process = None
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def log_tail(self, lines: int = 40) -> str:
        """The provider's last stderr lines: one per request (method, path, status, OAuth error)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:]) if self.log_path else ""
        except OSError:
            return ""

    def __enter__(self) -> "DeviceProvider":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> "DeviceProvider":
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    # the person
    async def approve(self, user_code: str, *, user: str = ALICE, password: str | None = None,
                      consent: bool = True) -> None:
        """Type ``user_code`` at the verification page, sign in as ``user`` and approve, or deny when
        ``consent`` is false; returns once the provider shows its last page. ``password`` defaults to
        the user's own. Raises :class:`ApprovalError` when a page is not the expected one (unknown,
        used or expired code; refused sign-in)."""
        async with self._browser() as http:
            page = await self._get(http, self.verification_uri)
            form = self._expect_form(page, "op.deviceInputForm", "the user code form")
            page = await self._submit(http, page, form, overrides={"user_code": user_code})
            await self._confirm_sign_in_consent(http, page, user, password, consent)

    async def approve_uri(self, verification_uri_complete: str, *, user: str = ALICE, password: str | None = None,
                          consent: bool = True) -> None:
        """As :meth:`approve`, opening ``verification_uri_complete`` (the code already in it) instead."""
        async with self._browser() as http:
            page = await self._get(http, verification_uri_complete)
            # oidc-provider answers with a page that posts the code back to itself on load.
            form = self._expect_form(page, None, "the self-submitting code form")
            page = await self._submit(http, page, form)
            await self._confirm_sign_in_consent(http, page, user, password, consent)

    def _browser(self) -> aiohttp.ClientSession:
        # A fresh cookie jar per person; unsafe=True: aiohttp keeps no cookies of an IP address otherwise.
        return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     timeout=aiohttp.ClientTimeout(total=30))

    async def _confirm_sign_in_consent(self, http: aiohttp.ClientSession, page: Page, user: str,
                                       password: str | None, consent: bool) -> None:
        form = self._expect_form(page, "op.deviceConfirmForm", "the device confirmation (the code was not accepted)")
        page = await self._submit(http, page, form)  # "Continue"
        form = self._expect_form(page, "login", "the sign-in form")
        if password is None:
            if user not in self.users:
                raise ValueError(f"{user} is not a test user: give a password")
            password = self.users[user].password
        page = await self._submit(http, page, form, overrides={"username": user, "password": password})
        if page.status == 401:
            raise ApprovalError(f"sign-in refused for {user}: {page.describe()}")
        form = self._expect_form(page, "consent", "the consent form")
        page = await self._submit(http, page, form, button=("decision", "approve" if consent else "deny"))
        if page.status != 200:
            raise ApprovalError(f"the provider's last page: {page.describe()}\n{self.log_tail()}")
        if consent and page.title != "Sign-in success":
            raise ApprovalError(f"expected the success page after approving: {page.describe()}")
        if not consent and "interrupted" not in page.text:
            raise ApprovalError(f"expected the interrupted-sign-in page after denying: {page.describe()}")

    def _expect_form(self, page: Page, form_id: str | None, what: str) -> Form:
        form = page.form(form_id)
        if form is None:
            raise ApprovalError(f"expected {what}, got {page.describe()}\nprovider log:\n{self.log_tail()}")
        return form

    async def _get(self, http: aiohttp.ClientSession, url: str) -> Page:
        async with http.get(url) as response:
            return await _page(response)

    async def _submit(self, http: aiohttp.ClientSession, page: Page, form: Form, *,
                      overrides: Mapping[str, str] | None = None, button: tuple[str, str] | None = None) -> Page:
        """Submit ``form`` as a browser would: its fields (``overrides`` typed in), plus the pressed button."""
        data = [(name, (overrides or {}).get(name, value)) for name, value in form.fields]
        missing = set(overrides or {}) - {name for name, _ in form.fields}
        if missing:
            raise ApprovalError(f"form {form.id!r} has no field {sorted(missing)}: {page.describe()}")
        if button is not None:
            if button not in form.buttons:
                raise ApprovalError(f"form {form.id!r} has no button {button}: {form.buttons}")
            data.append(button)
        action = page.url.join(URL(form.action)) if form.action else page.url
        if form.method == "post":
            request = http.post(action, data=data)
        else:
            request = http.get(action.update_query(data))
        async with request as response:
            return await _page(response)
