"""Roles, members and audit pages over the admin API, and how the page shows what the API says."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.e2e.harness import Keygate

from .browser import Browser
from .conftest import AdminKey, cli
from .flows import PROPAGATION, proxy_status, proxy_status_after, sign_in, take_shown_key


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


def agent_key_from_page(browser: Browser, user: str) -> str:
    """Issues ``user``'s agent key from the members page; the full key from its shown-once dialog."""
    return take_shown_key(browser, f'#members-table tr[data-user="{user}"] button[data-action="agent-key"]')


def test_agent_key_from_the_members_page(browser: Browser, gateway: Keygate, admin_key: AdminKey) -> None:
    """An agent key issued on the page works; issuing the next one revokes it."""
    cli(gateway, "members", "set", "default", "bob", "admin")
    open_section(browser, admin_key, "members")
    first = agent_key_from_page(browser, "bob")
    assert proxy_status(gateway, first) == 200
    second = agent_key_from_page(browser, "bob")
    issued_at = time.monotonic()
    assert proxy_status(gateway, second) == 200
    assert proxy_status_after(gateway, first, issued_at) == 401
    assert browser.console_errors() == []


def test_removing_a_member_stops_their_keys(browser: Browser, gateway: Keygate, admin_key: AdminKey) -> None:
    """A per-user key stops working once its user is removed from the org on the page."""
    cli(gateway, "members", "set", "default", "carol", "admin")
    record = json.loads(cli(gateway, "keys", "create", "--name", "carol laptop", "--user", "carol",
                            "--operation", "read", "--json"))
    assert proxy_status(gateway, record["key"]) == 200
    open_section(browser, admin_key, "members")
    browser.click('#members-table tr[data-user="carol"] button[data-action="remove"]')
    browser.click("#confirm-ok")
    removed_at = time.monotonic()
    browser.wait_text("#flash", "carol removed")
    assert browser.find_all('#members-table tr[data-user="carol"]') == []
    assert proxy_status_after(gateway, record["key"], removed_at) == 401


def table_statuses(browser: Browser) -> dict[str, str]:
    """Key id -> status of every row of the keys table now shown (read in one step: re-renders swap rows)."""
    return dict(browser.driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#main:not([aria-busy]) #keys-table "
        "tr[data-key-id]')].map((r) => [r.dataset.keyId, r.querySelector('td.status').textContent]));"))


async def test_keys_table_filters_by_status_and_org(browser: Browser, gateway: Keygate, admin_key: AdminKey) -> None:
    """The status and org filters show only the matching keys."""
    revoked, _ = await gateway.key(name="filtered-revoked", operations=["read"])
    async with gateway.service() as service:
        await service.revoke_key(revoked.id)
    other_org, _ = await gateway.key(name="in acme", org="acme", operations=["read"])
    sign_in(browser, admin_key)
    assert set(table_statuses(browser).values()) == {"active", "revoked"}

    def only_revoked(_driver: object) -> bool:
        shown = table_statuses(browser)
        return revoked.id in shown and set(shown.values()) == {"revoked"}

    browser.select("#filter-status", "revoked")  # a change of status applies the filters at once
    browser.wait(only_revoked, message="the status filter was not applied")
    browser.fill("#filter-org", "acme")
    browser.select("#filter-status", "")
    browser.wait(lambda _d: set(table_statuses(browser)) == {other_org.id}, message="org filter not applied")


async def test_load_more_pages_through_the_keys(browser: Browser, gateway: Keygate, admin_key: AdminKey) -> None:
    """More keys than one page: "Load more" appends the next page until every key is listed."""
    created = {(await gateway.key(name=f"bulk {n}", org="bulk", operations=["read"]))[0].id for n in range(55)}
    sign_in(browser, admin_key)
    browser.open("/ui/#/keys?org=bulk")
    browser.wait(lambda _d: len(table_statuses(browser)) == 50, message="first page is not 50 keys")
    browser.click("#load-more")
    browser.wait(lambda _d: set(table_statuses(browser)) == created, message="second page not appended")
    assert browser.find_all("#load-more") == []


def test_a_revoked_admin_key_signs_the_page_out(browser: Browser, gateway: Keygate) -> None:
    """When the admin key in use is revoked, the next page load signs out and shows why."""
    record = json.loads(cli(gateway, "keys", "create", "--name", "short-lived admin", "--role", "admin",
                            "--server", "admin", "--json"))
    sign_in(browser, AdminKey(record["id"], record["key"]))
    cli(gateway, "keys", "revoke", record["id"], "--yes")
    time.sleep(PROPAGATION)  # the admin listener checks keys through the same cache as the proxy
    browser.click('.nav a[data-section="roles"]')
    browser.view("signin")
    assert "(401)" in browser.find("#error").text
    assert browser.session_storage() == {}
    assert browser.console_errors(allow=network_error) == []


def test_the_builtin_admin_role_has_no_delete_button(browser: Browser, admin_key: AdminKey) -> None:
    """The admin role cannot be changed or deleted (409): its row offers neither; other roles keep both."""
    open_section(browser, admin_key, "roles")
    browser.fill("#role-name", "reader")
    browser.fill("#role-grants", "read")
    browser.click("#role-submit")
    browser.wait_text("#flash", "reader")
    admin_row = browser.find('#roles-table tr[data-role="admin"]')
    assert admin_row.find_elements("css selector", "button") == []
    assert "built-in" in admin_row.text
    other = browser.find('#roles-table tr[data-role="reader"]')
    assert {b.get_attribute("data-action") for b in other.find_elements("css selector", "button")} == {"edit", "delete"}
    browser.screenshot("roles-admin-builtin")


async def test_members_page_lists_the_orgs(browser: Browser, gateway: Keygate, admin_key: AdminKey) -> None:
    """Every org that exists is listed on the members page; choosing one shows its members."""
    cli(gateway, "members", "set", "initech", "peter", "admin")
    await gateway.key(name="in umbrella", org="umbrella", operations=["read"])
    open_section(browser, admin_key, "members")
    listed = [a.get_attribute("data-org") for a in browser.find_all("#org-list a[data-org]")]
    async with gateway.service() as service:
        assert listed == await service.list_orgs()
    assert {"default", "initech", "umbrella"} <= set(listed)
    browser.click('#org-list a[data-org="initech"]')
    browser.wait_text('#members-table tr[data-user="peter"]', "admin")
    assert browser.find('#org-list a[aria-current="page"]').text == "initech"
    browser.screenshot("members-orgs")
    assert browser.console_errors() == []
