"""The keys list: search by name, filter by kind (in the API), sort by column (on the loaded keys)."""

from __future__ import annotations

from tests.e2e.harness import Keygate

from .browser import Browser
from .conftest import AdminKey
from .flows import sign_in

ORG = "listing"


def shown(browser: Browser) -> list[str]:
    """The names in the keys table now, top to bottom (read in one step: re-renders swap rows)."""
    return list(browser.driver.execute_script(
        "return [...document.querySelectorAll('#main:not([aria-busy]) #keys-table tr[data-key-id] td.name')]"
        ".map((td) => td.textContent);"))


async def test_search_kind_and_sort(browser: Browser, gateway: Keygate, admin_key: AdminKey) -> None:
    """Typing narrows the list by name, the kind filter asks the API, a header click sorts both ways."""
    for name, kind in [("Deploy prod", "integration"), ("deploy staging", "integration"),
                       ("nightly backup", "automation"), ("ci runner", "automation")]:
        await gateway.key(name=name, kind=kind, org=ORG, operations=["read"])
    sign_in(browser, admin_key)
    browser.open(f"/ui/#/keys?org={ORG}")
    browser.wait(lambda _d: len(shown(browser)) == 4, message="the org's four keys are not listed")

    browser.fill("#filter-name", "DEPLOY")
    browser.wait(lambda _d: sorted(shown(browser)) == ["Deploy prod", "deploy staging"], message="search ignored")
    assert "2 of the 4 keys loaded" in browser.find("#keys-count").text
    browser.fill("#filter-name", "")

    browser.click('#keys-table th[data-column="1"] .sort')  # Name, ascending
    browser.wait(lambda _d: shown(browser) == ["ci runner", "Deploy prod", "deploy staging", "nightly backup"],
                 message="not sorted by name")
    assert browser.find('#keys-table th[data-column="1"]').get_attribute("aria-sort") == "ascending"
    browser.click('#keys-table th[data-column="1"] .sort')  # descending
    browser.wait(lambda _d: shown(browser) == ["nightly backup", "deploy staging", "Deploy prod", "ci runner"],
                 message="not sorted by name, descending")
    assert "sort=-name" in browser.driver.current_url
    browser.screenshot("keys-sorted")

    browser.fill("#filter-kind", "automation")
    browser.click("#key-filters button[type=submit]")
    browser.wait(lambda _d: "kind=automation" in browser.driver.current_url, message="kind filter not applied")
    browser.view("keys")
    browser.wait(lambda _d: shown(browser) == ["nightly backup", "ci runner"], message="kind filter or sort lost")
    browser.collect_logs()
    assert any("/admin/v1/keys?" in url and "kind=automation" in url for url in browser.requests)
    assert browser.console_errors() == []
