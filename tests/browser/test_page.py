"""The page in a real browser: only its own origin, its CSP enforced, no console errors."""

from __future__ import annotations

from gateway.admin.ui import CONTENT_SECURITY_POLICY

from .browser import Browser


def test_sign_in_page_loads_only_its_own_files_under_the_csp(browser: Browser) -> None:
    """The signed-out page renders from its own origin, with the CSP header, and logs no error."""
    browser.open("/ui/")
    browser.view("signin")
    browser.find("#signin-key")
    browser.screenshot("sign-in")
    headers = browser.response_headers(browser.origin + "/ui/")
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert headers["cache-control"] == "no-store"
    assert browser.foreign_requests() == []
    loaded = set(browser.requests)
    assert {browser.origin + "/ui/" + name for name in ("app.js", "app.css", "dom.js", "favicon.svg")} <= loaded
    assert browser.console_errors() == []


def test_inline_script_is_refused_and_reported(browser: Browser) -> None:
    """An injected inline script does not run and shows as a CSP violation: the console check can fail."""
    browser.open("/ui/")
    browser.view("signin")
    browser.driver.execute_script(
        "const s = document.createElement('script'); s.textContent = 'window.injected = true';"
        "document.body.append(s);")
    browser.wait(lambda d: browser.console_errors(), message="no CSP violation was logged")
    assert browser.driver.execute_script("return window.injected === undefined")
    assert any("Content Security Policy" in message for message in browser.console_errors())
