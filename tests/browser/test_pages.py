"""Roles, members and audit pages over the admin API, and how the page shows what the API says."""

from __future__ import annotations

import json
from typing import Any

from tests.e2e.harness import Keygate

from .browser import Browser
from .conftest import AdminKey, cli
from .flows import sign_in


def network_error(entry: dict[str, Any]) -> bool:
    """Chromium logs every 4xx answer to fetch(); an expected refusal is not a page error."""
    return entry.get("source") == "network"


def open_section(browser: Browser, admin_key: AdminKey, section: str) -> None:
    sign_in(browser, admin_key)
    browser.click(f'.nav a[data-section="{section}"]')
    browser.view(section)


def test_roles_page_saves_a_role(browser: Browser, admin_key: AdminKey) -> None:
    """A role saved from the roles page is listed with its grants."""
    open_section(browser, admin_key, "roles")
    browser.fill("#role-name", "deploy-only")
    browser.fill("#role-grants", "deploy servers:read")
    browser.click("#role-submit")
    browser.wait_text("#flash", "deploy-only")
    row = browser.find('#roles-table tr[data-role="deploy-only"]')
    assert "deploy" in row.text and "servers:read" in row.text
    browser.screenshot("roles")
    assert browser.console_errors() == []


def test_members_page_adds_a_member(browser: Browser, admin_key: AdminKey) -> None:
    """A member added from the members page is listed with their role."""
    open_section(browser, admin_key, "members")
    browser.fill("#member-user", "alice")
    browser.select("#member-role", "admin")
    browser.click("#member-submit")
    browser.wait_text("#flash", "alice")
    assert "admin" in browser.find('#members-table tr[data-user="alice"]').text
    browser.screenshot("members")
    assert browser.console_errors() == []


def test_audit_page_lists_management_events(browser: Browser, gateway: Keygate, admin_key: AdminKey) -> None:
    """The audit log shows the CLI's bootstrap of the admin key, with its actor."""
    open_section(browser, admin_key, "audit")
    row = browser.wait_text("#audit-table tbody tr", admin_key.id)
    assert "key.create" in browser.find("#audit-table").text
    assert row.text
    browser.screenshot("audit")
    assert browser.console_errors() == []


def test_key_names_are_shown_as_text(browser: Browser, gateway: Keygate, admin_key: AdminKey) -> None:
    """A key name holding markup is displayed literally and never becomes an element."""
    name = '<img src=x id=injected onerror="document.title=1">'
    cli(gateway, "keys", "create", "--name", name, "--operation", "read")
    sign_in(browser, admin_key)
    browser.wait_text("#keys-table", name)
    assert browser.find_all("#injected") == []
    assert browser.driver.title == "Keygate"
    assert browser.console_errors() == []


def test_a_refused_admin_key_shows_the_problem_and_stays_signed_out(browser: Browser, gateway: Keygate) -> None:
    """A non-admin key is refused by the API; the page shows its problem detail and keeps nothing."""
    other = json.loads(cli(gateway, "keys", "create", "--name", "not-admin", "--operation", "read", "--json"))
    browser.open("/ui/")
    browser.view("signin")
    browser.fill("#signin-key", other["key"])
    browser.click("#signin-submit")
    error = browser.find("#error")
    assert "(403)" in error.text or "(401)" in error.text
    assert browser.find("#error-detail").text.strip()
    browser.view("signin")
    assert browser.session_storage() == {}
    assert browser.console_errors(allow=network_error) == []
