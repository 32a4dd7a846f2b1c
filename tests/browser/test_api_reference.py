"""The admin API reference at /ui/api/: the OpenAPI document drawn by Keygate's own files, nothing fetched elsewhere."""

from __future__ import annotations

import json
import urllib.request

from tests.e2e.harness import Keygate

from .browser import Browser

METHODS = ("get", "post", "put", "patch", "delete")


def test_reference_shows_every_operation_of_the_document(browser: Browser, gateway: Keygate) -> None:
    """Every (method, path) of openapi.json is an operation on the page, with its summary and admin operation."""
    with urllib.request.urlopen(gateway.admin_url + "/admin/v1/openapi.json", timeout=10) as answer:
        document = json.load(answer)
    expected = {(method.upper(), path): op for path, item in document["paths"].items()
                for method, op in item.items() if method in METHODS}
    browser.open("/ui/api/")
    browser.find("#main:not([aria-busy]) .operation")
    shown = {(el.get_attribute("data-method"), el.get_attribute("data-path")): el
             for el in browser.find_all(".operation")}
    assert set(shown) == set(expected)
    assert len(browser.find_all(".operation")) == len(expected)
    for key, op in expected.items():
        text = shown[key].text
        assert op["summary"] in text, key
        if "x-keygate-operation" in op:
            assert op["x-keygate-operation"] in text, key
        for status in op["responses"]:
            assert shown[key].find_elements("css selector", f'li[data-status="{status}"]'), (key, status)
        for param in op.get("parameters", []):
            assert shown[key].find_elements("css selector", f'tr[data-param="{param["name"]}"]'), (key, param)
    # Every schema the operations refer to is drawn, so each link lands somewhere.
    for name in document["components"]["schemas"]:
        assert browser.find_all(f"#schema-{name}"), name
    browser.screenshot("api-reference")
    assert browser.foreign_requests() == []
    loaded = browser.driver.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name).concat([location.href]);")
    assert loaded and all(url.startswith(gateway.admin_url + "/") for url in loaded), loaded
    assert browser.console_errors() == []


def test_reference_is_linked_from_the_web_page(browser: Browser) -> None:
    """The web page's navigation leads to the reference, served with the page's strict CSP."""
    browser.open("/ui/")
    browser.view("signin")
    browser.open("/ui/api/")
    browser.find("#main:not([aria-busy]) .operation")
    csp = browser.response_headers(browser.origin + "/ui/api/")["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
