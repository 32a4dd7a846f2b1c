"""A key created and revoked entirely from the web page, with the proxy honouring both."""

from __future__ import annotations

import time

from tests.e2e.harness import Keygate

from .browser import Browser
from .conftest import AdminKey
from .flows import key_id_of, proxy_status, proxy_status_after, sign_in


def key_row_status(browser: Browser, key_id: str) -> str:
    return browser.find(f'#keys-table tr[data-key-id="{key_id}"] td.status').text.lower()


def test_create_use_revoke_from_the_page(browser: Browser, gateway: Keygate, admin_key: AdminKey) -> None:
    """Sign in, create a key (shown once), use it (200), revoke it with confirmation, proxy says 401."""
    sign_in(browser, admin_key)
    assert browser.session_storage() == {"keygate.admin-key": admin_key.key}

    # Create: the full key appears once, in the dialog, with its warning.
    browser.click("#new-key-link")
    browser.view("new")
    browser.fill("#create-name", "ci deploy from the page")
    browser.fill("#create-operations", "read write")
    browser.select("#create-expires", "30d")
    browser.screenshot("create-form")
    browser.click("#create-submit")
    shown = browser.find("#new-key")
    key = shown.text
    assert key.startswith("kg_") and len(key) == len("kg_") + 12 + 32 + 6
    warning = browser.find("#key-once .notice.warning").text
    assert "will not be shown again" in warning
    browser.screenshot("key-shown-once")
    browser.click("#copy-key")
    assert browser.find("#copy-status").text
    browser.click("#key-once-done")
    key_id = key_id_of(key)

    # The key's own page follows, and the key is nowhere on it any more.
    browser.view("key")
    browser.wait_text("#key-facts", key_id)
    assert key not in browser.driver.page_source

    # The table lists it as active.
    browser.click('.nav a[data-section="keys"]')
    browser.view("keys")
    assert key_row_status(browser, key_id) == "active"
    browser.screenshot("keys")

    # The proxy lets it in.
    assert proxy_status(gateway, key) == 200

    # Revoke from its page: the confirmation can be cancelled, then confirmed.
    browser.click(f'#keys-table tr[data-key-id="{key_id}"] a')
    browser.view("key")
    browser.click("#revoke-key")
    browser.click("#confirm-cancel")
    assert browser.find("#key-status").text.lower() == "active"
    assert proxy_status(gateway, key) == 200
    browser.click("#revoke-key")
    browser.screenshot("revoke-confirmation")
    browser.click("#confirm-ok")
    revoked_at = time.monotonic()
    browser.wait_text("#flash", "revoked")
    assert browser.find("#key-status").text.lower() == "revoked"

    # The proxy refuses it within the propagation window, and the table says revoked.
    assert proxy_status_after(gateway, key, revoked_at) == 401
    browser.click('.nav a[data-section="keys"]')
    browser.view("keys")
    assert key_row_status(browser, key_id) == "revoked"
    browser.screenshot("keys-after-revoke")

    # Its page shows the requests it made (recorded in batches every 0.2 s, long since
    # flushed) and the revocation in its audit events, by the admin key.
    browser.click(f'#keys-table tr[data-key-id="{key_id}"] a')
    browser.view("key")
    assert "GET /echo" in browser.find("#key-requests").text
    events = browser.find("#key-audit").text
    assert "key.revoke" in events and admin_key.id in events
    browser.screenshot("key-page")

    assert browser.foreign_requests() == []
    assert browser.console_errors() == []


def test_sign_out_forgets_the_admin_key(browser: Browser, admin_key: AdminKey) -> None:
    """Signing out empties sessionStorage and shows the sign-in form again."""
    sign_in(browser, admin_key)
    browser.click("#sign-out")
    browser.view("signin")
    assert browser.session_storage() == {}
    assert not browser.find_all("#topbar:not([hidden])")
