"""Steps the browser tests share: signing in, and asking the proxy what it thinks of a key."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from tests.e2e.harness import Keygate

from .browser import Browser
from .conftest import AdminKey

# The promise under test: a change takes effect on every worker within a second.
PROPAGATION = 1.0


def proxy_status(gateway: Keygate, key: str, method: str = "GET") -> int:
    """The proxy's status for one request with ``key`` (GET is the read operation, POST write)."""
    request = urllib.request.Request(gateway.proxy_url + "/echo", method=method,
                                     data=b"{}" if method == "POST" else None,
                                     headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as refused:
        return refused.code


def proxy_status_after(gateway: Keygate, key: str, changed_at: float, method: str = "GET") -> int:
    """The proxy's answer once the propagation window after ``changed_at`` (monotonic) has passed."""
    time.sleep(max(0.0, changed_at + PROPAGATION - time.monotonic()))
    return proxy_status(gateway, key, method)


def sign_in(browser: Browser, admin_key: AdminKey) -> None:
    browser.open("/ui/")
    browser.view("signin")
    browser.fill("#signin-key", admin_key.key)
    browser.click("#signin-submit")
    browser.view("keys")


def fill_create_form(browser: Browser, admin_key: AdminKey, name: str, operations: str = "read") -> None:
    """Signed in, on the create form, with a name and operations filled in."""
    sign_in(browser, admin_key)
    browser.open("/ui/#/new")
    browser.view("new")
    browser.fill("#create-name", name)
    browser.fill("#create-operations", operations)


def key_id_of(key: str) -> str:
    """A full key's public id: its prefix (here always kg_) and 12 id characters."""
    return key[: len("kg_") + 12]


def take_shown_key(browser: Browser, button: str) -> str:
    """Presses ``button``, confirms, and reads the full key from its shown-once dialog before closing it."""
    browser.click(button)
    browser.click("#confirm-ok")
    key = browser.find("#new-key").text
    browser.click("#key-once-done")
    # The page re-renders with a notice naming the new key's id.
    browser.wait_text("#flash", key_id_of(key))
    return key
