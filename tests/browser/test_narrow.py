"""The web page on a phone (420 px wide): every page fits the screen, the navigation wraps."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.e2e.harness import Keygate

from .browser import Browser
from .conftest import AdminKey, cli
from .flows import sign_in

WIDTH = 420


@pytest.fixture
def narrow(browser: Browser) -> Iterator[Browser]:
    browser.driver.set_window_size(WIDTH, 900)
    # The window's outer size includes no chrome in headless mode; the page must be as wide as asked.
    assert browser.driver.execute_script("return window.innerWidth") == WIDTH
    yield browser


def overflow(browser: Browser) -> tuple[int, int]:
    """(the page's scroll width, the viewport's width): the page scrolls sideways when the first is larger."""
    return tuple(browser.driver.execute_script(
        "return [document.documentElement.scrollWidth, window.innerWidth];"))  # type: ignore[return-value]


def shot(browser: Browser, name: str) -> None:
    """A PNG at the phone's width (Browser.screenshot widens the window to 1440 px)."""
    height = int(browser.driver.execute_script("return document.documentElement.scrollHeight"))
    browser.driver.set_window_size(WIDTH, max(900, min(height + 100, 4000)))
    browser.driver.save_screenshot(str(browser.screenshots / f"{name}.png"))
    browser.driver.set_window_size(WIDTH, 900)


PAGES = [("keys", "#/keys"), ("new", "#/new"), ("roles", "#/roles"), ("members", "#/members"),
         ("audit", "#/audit?type=all"), ("key", "#/keys/{key}")]


def test_every_page_fits_420_px(narrow: Browser, gateway: Keygate, admin_key: AdminKey) -> None:
    """No page scrolls sideways at 420 px (wide tables scroll inside their box); the navigation wraps."""
    record = json.loads(cli(gateway, "keys", "create", "--name", "a key with a rather long name for a phone",
                            "--operation", "read", "--allow-ip", "2001:db8:1234:5678::/64", "--json"))
    sign_in(narrow, admin_key)
    for view, route in PAGES:
        narrow.open("/ui/" + route.format(key=record["id"]))
        narrow.view(view)
        width, viewport = overflow(narrow)
        assert width <= viewport, (view, width, viewport)
        shot(narrow, f"narrow-{view}")
    links = narrow.find_all(".nav a")
    assert len({round(link.rect["y"]) for link in links}) > 1, "the navigation does not wrap"
    assert all(link.rect["x"] + link.rect["width"] <= WIDTH for link in links)


def test_dialog_and_signin_fit_420_px(narrow: Browser, gateway: Keygate, admin_key: AdminKey) -> None:
    """The sign-in page and the edit dialog fit the phone's width too."""
    narrow.open("/ui/")
    narrow.view("signin")
    assert overflow(narrow)[0] <= WIDTH
    shot(narrow, "narrow-signin")
    record = json.loads(cli(gateway, "keys", "create", "--name", "edited on a phone", "--operation", "read",
                            "--json"))
    sign_in(narrow, admin_key)
    narrow.open(f"/ui/#/keys/{record['id']}")
    narrow.view("key")
    narrow.click("#edit-key")
    dialog = narrow.find("#edit-form")
    assert dialog.rect["x"] >= 0 and dialog.rect["x"] + dialog.rect["width"] <= WIDTH
    assert overflow(narrow)[0] <= WIDTH
    shot(narrow, "narrow-edit-dialog")


def test_api_reference_fits_420_px(narrow: Browser) -> None:
    """The API reference does not scroll sideways either (its tables scroll inside their box)."""
    narrow.open("/ui/api/")
    narrow.find("#main:not([aria-busy]) details.operation")
    width, viewport = overflow(narrow)
    assert width <= viewport
    shot(narrow, "narrow-api-reference")
