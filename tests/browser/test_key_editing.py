"""Editing a key's settings from its page: a dialog that PATCHes what changed and shows the API's refusals."""

from __future__ import annotations

import json
import time

from tests.e2e.harness import Keygate

from .browser import Browser
from .conftest import AdminKey, cli
from .flows import proxy_status, proxy_status_after, sign_in
from .test_pages import network_error


def create_key(gateway: Keygate, *args: str) -> dict[str, str]:
    return json.loads(cli(gateway, "keys", "create", "--json", *args))


def open_edit_dialog(browser: Browser, admin_key: AdminKey, key_id: str) -> None:
    sign_in(browser, admin_key)
    browser.open(f"/ui/#/keys/{key_id}")
    browser.view("key")
    browser.click("#edit-key")
    browser.find("#edit-form")


def test_edit_saves_name_servers_allowlist_rate_limit_and_expiry(
    browser: Browser, gateway: Keygate, admin_key: AdminKey,
) -> None:
    """Every setting changed in the dialog is saved, and the proxy applies the new allowlist."""
    record = create_key(gateway, "--name", "before edit", "--operation", "read", "--expires", "never")
    assert proxy_status(gateway, record["key"]) == 200
    open_edit_dialog(browser, admin_key, record["id"])
    browser.fill("#edit-name", "after edit")
    browser.fill("#edit-servers", "app other")
    browser.fill("#edit-ips", "192.0.2.0/24\n2001:db8::/32")
    browser.fill("#edit-rate", "10/second; burst=20")
    browser.select("#edit-expires", "30d")
    browser.screenshot("key-edit-dialog")
    browser.click("#edit-form-submit")
    saved_at = time.monotonic()
    browser.wait_text("#flash", f"{record['id']} saved")
    shown = json.loads(cli(gateway, "keys", "show", record["id"], "--json"))
    assert (shown["name"], shown["servers"], shown["ip_allowlist"], shown["rate_limit"]) == (
        "after edit", ["app", "other"], ["192.0.2.0/24", "2001:db8::/32"], "10/second; burst=20")
    assert shown["expires_at"] is not None
    facts = browser.find("#key-facts").text
    assert "192.0.2.0/24" in facts and "10/second; burst=20" in facts
    # The test client is 127.0.0.1: outside the new allowlist.
    assert proxy_status_after(gateway, record["key"], saved_at) == 403
    assert browser.console_errors() == []


def test_a_refused_edit_shows_the_problem_in_the_open_dialog(
    browser: Browser, gateway: Keygate, admin_key: AdminKey,
) -> None:
    """The API's 422 and its field problems are shown in the dialog, which keeps what was typed; nothing changes."""
    record = create_key(gateway, "--name", "edit refused", "--operation", "read")
    open_edit_dialog(browser, admin_key, record["id"])
    browser.fill("#edit-rate", "lots")
    browser.fill("#edit-ips", "not-a-cidr")
    browser.click("#edit-form-submit")
    problem = browser.find("#edit-form-error")
    assert "(422)" in problem.text
    fields = {li.get_attribute("data-field") for li in browser.find_all("#edit-form-error li")}
    assert fields == {"rate_limit", "ip_allowlist.0"}
    assert browser.find("#edit-rate").get_attribute("value") == "lots"
    browser.screenshot("key-edit-refused")
    browser.click("#edit-form-cancel")
    browser.wait(lambda _d: not browser.find_all("#edit-form"), message="the dialog did not close")
    shown = json.loads(cli(gateway, "keys", "show", record["id"], "--json"))
    assert (shown["rate_limit"], shown["ip_allowlist"]) == (None, [])
    assert browser.console_errors(allow=network_error) == []


def test_clearing_the_rate_limit_returns_to_the_default(
    browser: Browser, gateway: Keygate, admin_key: AdminKey,
) -> None:
    """An emptied rate limit is sent as null: the key falls back to ratelimit.default."""
    record = create_key(gateway, "--name", "own limit", "--operation", "read", "--rate-limit", "5/minute")
    open_edit_dialog(browser, admin_key, record["id"])
    browser.fill("#edit-rate", "")
    browser.click("#edit-form-submit")
    browser.wait_text("#flash", "saved")
    assert json.loads(cli(gateway, "keys", "show", record["id"], "--json"))["rate_limit"] is None
