"""Rotate, reassign a role and custom expiry from the page, with the proxy honouring each."""

from __future__ import annotations

import json
import time

from tests.e2e.harness import Keygate

from .browser import Browser
from .conftest import AdminKey, cli
from .flows import fill_create_form, key_id_of, proxy_status, proxy_status_after, sign_in, take_shown_key


def create_key(gateway: Keygate, *args: str) -> dict[str, str]:
    return json.loads(cli(gateway, "keys", "create", "--json", *args))


def open_key(browser: Browser, key_id: str) -> None:
    browser.open(f"/ui/#/keys/{key_id}")
    browser.view("key")
    browser.wait_text("#key-facts", key_id)


def rotate(browser: Browser, grace: str) -> str:
    """Rotates the open key with ``grace``; the new full key, read from its shown-once dialog."""
    browser.select("#rotate-grace", grace)
    return take_shown_key(browser, "#rotate-submit")


def test_rotate_without_grace_swaps_the_keys(browser: Browser, gateway: Keygate, admin_key: AdminKey) -> None:
    """The new key works at once; the old one is refused within the propagation window."""
    old = create_key(gateway, "--name", "rotate-now", "--operation", "read")
    sign_in(browser, admin_key)
    open_key(browser, old["id"])
    new_key = rotate(browser, "")
    rotated_at = time.monotonic()
    assert key_id_of(new_key) in browser.find("#key-facts").text
    assert proxy_status(gateway, new_key) == 200
    assert proxy_status_after(gateway, old["key"], rotated_at) == 401
    assert browser.console_errors() == []


def test_rotate_with_grace_keeps_the_old_key_working(
    browser: Browser, gateway: Keygate, admin_key: AdminKey
) -> None:
    """With a one-hour grace both keys work after the rotation."""
    old = create_key(gateway, "--name", "rotate-grace", "--operation", "read")
    sign_in(browser, admin_key)
    open_key(browser, old["id"])
    new_key = rotate(browser, "1h")
    rotated_at = time.monotonic()
    assert proxy_status(gateway, new_key) == 200
    assert proxy_status_after(gateway, old["key"], rotated_at) == 200
    # The old key, now rotating, offers no second rotation (its successor is the one to rotate).
    open_key(browser, old["id"])
    browser.wait_text("#rotating-notice", "Rotate the key that replaced it")
    assert browser.find_all("#rotate-submit") == [] and browser.find_all("#revoke-key") != []
    browser.screenshot("key-rotating")
    assert browser.console_errors() == []


def test_reassigned_role_reaches_the_proxy(browser: Browser, gateway: Keygate, admin_key: AdminKey) -> None:
    """A key moved from a read role to a write role may then POST."""
    cli(gateway, "roles", "set", "reader", "--grant", "read")
    cli(gateway, "roles", "set", "writer", "--grant", "read", "--grant", "write")
    record = create_key(gateway, "--name", "role-moves", "--role", "reader")
    sign_in(browser, admin_key)
    open_key(browser, record["id"])
    assert proxy_status(gateway, record["key"], "POST") == 403
    browser.select("#reassign-role", "writer")
    browser.click("#reassign-submit")
    changed_at = time.monotonic()
    browser.wait_text("#flash", "writer")
    assert proxy_status_after(gateway, record["key"], changed_at, "POST") == 200
    assert browser.console_errors() == []


def test_custom_expiry_date_is_stored(browser: Browser, admin_key: AdminKey) -> None:
    """A key created with a custom date expires at midnight UTC starting that day."""
    fill_create_form(browser, admin_key, "until 2030")
    browser.select("#create-expires", "custom")
    date = browser.find("#create-expires-on")
    browser.driver.execute_script("arguments[0].value = '2030-01-31'", date)
    browser.click("#create-submit")
    browser.click("#key-once-done")
    browser.view("key")
    assert "2030-01-31 00:00 UTC" in browser.wait_text("#key-facts", "2030-01-31").text


def test_create_form_shows_the_api_problem(browser: Browser, admin_key: AdminKey) -> None:
    """A bad CIDR is refused by the API and its problem detail is shown; no key dialog opens."""
    fill_create_form(browser, admin_key, "bad cidr")
    browser.fill("#create-ips", "10.0.0.300/8")
    browser.click("#create-submit")
    error = browser.find("#error")
    assert "(422)" in error.text
    assert "10.0.0.300/8" in browser.find("#error-detail").text
    assert browser.find_all("#new-key") == []
