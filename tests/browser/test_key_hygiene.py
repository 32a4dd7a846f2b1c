"""Key hygiene on a key's page: the allowlist suggestion, canary keys and status idle; a canary made in the form."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.e2e.harness import Keygate, Upstream, stored_requests

from .browser import Browser
from .conftest import AdminKey, cli
from .flows import proxy_status, sign_in

IDLE_AFTER = 3


@pytest.fixture(scope="module")
def gateway(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    """Client addresses from X-Forwarded-For (127.0.0.1 is a trusted proxy); keys unused for 3 s are idle."""
    keygate = Keygate(tmp_path_factory.mktemp("keygate-hygiene-ui"), upstream.url,
                      proxy='trusted_proxies = ["127.0.0.1/32"]\n',
                      config=f'[keys]\nidle_after = "{IDLE_AFTER}s"\n').start()
    yield keygate
    keygate.stop()


def create_key(gateway: Keygate, *args: str) -> dict[str, str]:
    return json.loads(cli(gateway, "keys", "create", "--json", *args))


def use_from(gateway: Keygate, key: str, client: str) -> None:
    request = urllib.request.Request(gateway.proxy_url + "/echo",
                                     headers={"Authorization": f"Bearer {key}", "X-Forwarded-For": client})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def open_key(browser: Browser, key_id: str) -> None:
    browser.open(f"/ui/#/keys/{key_id}")
    browser.view("key")
    browser.wait_text("#key-facts", key_id)


def test_the_key_page_suggests_an_allowlist(browser: Browser, gateway: Keygate, admin_key: AdminKey) -> None:
    """The suggestion lists the CIDRs with their requests and the exact command; an unused key gets a message."""
    record = create_key(gateway, "--name", "from-ci", "--operation", "read")
    for client in ("198.51.100.7", "198.51.100.7", "198.51.100.9", "203.0.113.40"):
        use_from(gateway, record["key"], client)
    asyncio.run(stored_requests(gateway, record["id"], count=4))  # every request written
    sign_in(browser, admin_key)
    open_key(browser, record["id"])
    browser.wait_text("#suggestion-command", f"keygate keys update {record['id']}")
    command = browser.find("#suggestion-command").text
    assert command == (f"keygate keys update {record['id']} --allow-ip 198.51.100.7/32 "
                       "--allow-ip 198.51.100.9/32 --allow-ip 203.0.113.40/32")
    rows = [row.text for row in browser.find_all("#suggestion-table tbody tr")]
    assert rows == ["198.51.100.7/32 2 1", "198.51.100.9/32 1 1", "203.0.113.40/32 1 1"]
    unused = create_key(gateway, "--name", "never-used", "--operation", "read")
    open_key(browser, unused["id"])
    browser.wait_text("#suggestion-message", "nothing to suggest")
    assert browser.find_all("#suggestion-command") == []
    browser.screenshot("key-allowlist-suggestion")
    assert browser.console_errors() == []


def test_a_canary_is_marked_as_one_and_an_unused_key_as_idle(
    browser: Browser, gateway: Keygate, admin_key: AdminKey,
) -> None:
    """A canary's page and row say canary (no role to reassign, no suggestion); a key unused for
    keys.idle_after shows status idle, in its page and under the idle filter."""
    canary = create_key(gateway, "--name", "decoy", "--canary")
    quiet = create_key(gateway, "--name", "quiet", "--operation", "read")
    assert proxy_status(gateway, canary["key"]) == 401
    time.sleep(IDLE_AFTER + 0.5)
    sign_in(browser, admin_key)
    open_key(browser, canary["id"])
    assert "canary" in browser.find("#key-facts").text.lower()
    browser.wait_text("#canary-notice", "never authorizes")
    assert browser.find_all("#reassign-submit") == [] and browser.find_all("#allowlist-suggestion") == []
    open_key(browser, quiet["id"])
    assert browser.find("#key-status").text.lower() == "idle"
    browser.open("/ui/#/keys?status=idle")
    browser.view("keys")
    browser.wait_text("#keys-table", quiet["id"])
    table = browser.find("#keys-table").text
    assert canary["id"] not in table  # a canary is unused by design: never idle
    assert admin_key.id not in table  # the page itself keeps the admin key in use
    browser.screenshot("keys-idle")
    assert browser.console_errors() == []


def test_the_create_form_makes_a_canary(browser: Browser, gateway: Keygate, admin_key: AdminKey) -> None:
    """Ticking Canary disables the access settings; the key made is a canary, refused as an unknown key."""
    sign_in(browser, admin_key)
    browser.open("/ui/#/new")
    browser.view("new")
    browser.fill("#create-name", "decoy from the form")
    browser.click("#create-canary")
    assert not browser.find("#create-operations").is_enabled()
    browser.click("#create-submit")
    key = browser.find("#new-key").text
    browser.click("#key-once-done")
    browser.view("key")
    browser.wait_text("#canary-notice", "never authorizes")
    assert proxy_status(gateway, key) == 401
    listed = json.loads(cli(gateway, "keys", "list", "--json"))
    assert [k["canary"] for k in listed if key.startswith(k["id"])] == [True]
    assert browser.console_errors() == []
