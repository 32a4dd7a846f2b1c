"""The page for an org admin: its own org only, named in the header; a cross-org admin switches orgs."""

from __future__ import annotations

import json

import pytest

from tests.e2e.harness import Keygate

from .browser import Browser
from .conftest import AdminKey, cli
from .flows import sign_in

ORG_ADMIN = ["keys:*", "members:write", "roles:read", "audit:read", "deploy", "read"]


def shown_keys(browser: Browser) -> dict[str, str]:
    """Key id -> "org / user" cell of every row of the keys table now shown (read in one step)."""
    return dict(browser.driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#main:not([aria-busy]) #keys-table "
        "tr[data-key-id]')].map((r) => [r.dataset.keyId, r.children[3].textContent]));"))


def make_key(gateway: Keygate, name: str, org: str, *args: str) -> AdminKey:
    record = json.loads(cli(gateway, "keys", "create", "--name", name, "--org", org, *args, "--json"))
    return AdminKey(record["id"], record["key"])


@pytest.fixture(scope="module")
def orgs(gateway: Keygate) -> dict[str, dict[str, object]]:
    """acme and globex: an org admin each (generous rate limits: every page load is a few calls) and a key."""
    grants = [arg for grant in ORG_ADMIN for arg in ("--grant", grant)]
    cli(gateway, "roles", "set", "org-admin", *grants)
    made: dict[str, dict[str, object]] = {}
    for org in ("acme", "globex"):
        admin = make_key(gateway, f"{org} admin", org, "--role", "org-admin", "--server", "admin", "--server", "*",
                         "--rate-limit", "6000/minute")
        key = make_key(gateway, f"{org} deploys", org, "--operation", "deploy")
        made[org] = {"admin": admin, "ids": {admin.id, key.id}}
    return made


@pytest.mark.parametrize("org", ["acme", "globex"])
def test_an_org_admin_sees_only_its_orgs_keys(browser: Browser, orgs: dict[str, dict[str, object]], org: str) -> None:
    """Signed in with an org admin key, the keys page lists that org's keys alone and the header names the org."""
    mine = orgs[org]
    other = orgs["globex" if org == "acme" else "acme"]
    sign_in(browser, mine["admin"])  # type: ignore[arg-type]
    browser.wait(lambda _d: mine["ids"] <= set(shown_keys(browser)), message="own keys not listed")
    shown = shown_keys(browser)
    assert set(shown.values()) == {org}
    assert not set(shown) & other["ids"]  # type: ignore[operator]
    assert browser.find("#current-org").text == org
    assert browser.find_all("#org-switcher") == [] and browser.find_all("#filter-org") == []
    browser.click('.nav a[data-section="new"]')
    browser.view("new")
    assert browser.find("#create-org").get_attribute("value") == org
    assert browser.find("#create-org").get_attribute("readonly") is not None
    assert browser.console_errors() == []


def test_a_cross_org_admin_switches_between_orgs(
    browser: Browser, orgs: dict[str, dict[str, object]], admin_key: AdminKey,
) -> None:
    """An admin key with orgs:any gets an org switcher: every org, or one org's keys only."""
    sign_in(browser, admin_key)
    every = orgs["acme"]["ids"] | orgs["globex"]["ids"]  # type: ignore[operator]
    browser.wait(lambda _d: every <= set(shown_keys(browser)), message="not every org's keys listed")
    options = [o.get_attribute("value") for o in browser.find_all("#org-switcher option")]
    assert {"", "acme", "globex"} <= set(options)
    browser.select("#org-switcher", "globex")
    browser.wait(lambda _d: set(shown_keys(browser).values()) == {"globex"}, message="the switch was not applied")
    assert orgs["globex"]["ids"] <= set(shown_keys(browser))  # type: ignore[operator]
    assert browser.session_storage().get("keygate.org") == "globex"
    browser.select("#org-switcher", "")
    browser.wait(lambda _d: every <= set(shown_keys(browser)), message="back to every org failed")
    assert browser.console_errors() == []
