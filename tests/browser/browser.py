"""Driving Debian's headless Chromium through Debian's ChromeDriver (Selenium), for the web page's tests."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

T = TypeVar("T")

# Chromium's own background traffic (updates, sync, safe browsing) is off: the
# machine's network is closed, and a test must see only the page's requests.
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-default-apps",
    "--window-size=1440,900", "--force-device-scale-factor=1", "--lang=en-US",
)


def browser_binaries() -> tuple[str, str] | str:
    """(chromium, chromedriver), or why they cannot be used."""
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    missing = " and ".join(name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path)
    return (f"{missing} not found: run the tests with scripts/test, which installs Debian's "
            "chromium and chromium-driver")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@dataclass
class Browser:
    """One Chromium session with helpers that wait for the page instead of sleeping."""

    driver: webdriver.Chrome
    origin: str
    screenshots: Path
    console: list[dict[str, Any]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    responses: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def start(cls, chromium: str, chromedriver: str, profile: Path, origin: str, screenshots: Path) -> "Browser":
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        # An explicit driver path: Selenium Manager never runs, nothing is downloaded.
        service = Service(executable_path=chromedriver, log_output=str(profile.parent / "chromedriver.log"))
        driver = webdriver.Chrome(options=options, service=service)
        driver.set_page_load_timeout(30)
        return cls(driver, origin, screenshots)

    def quit(self) -> None:
        self.driver.quit()

    # -- navigation and waiting ------------------------------------------------
    def open(self, path: str) -> None:
        self.driver.get(self.origin + path)

    def wait(self, condition: Callable[[webdriver.Chrome], T], timeout: float = 10, message: str = "") -> T:
        # The page swaps whole views when it re-renders: an element found a moment ago may be gone.
        return WebDriverWait(self.driver, timeout, poll_frequency=0.05,
                             ignored_exceptions=(StaleElementReferenceException,)).until(condition, message)

    def find(self, css: str, timeout: float = 10) -> WebElement:
        """The first visible element matching ``css``, once it is there."""
        def visible(driver: webdriver.Chrome) -> WebElement | bool:
            for element in driver.find_elements(By.CSS_SELECTOR, css):
                if element.is_displayed():
                    return element
            return False
        return self.wait(visible, timeout, f"no visible element {css!r}")

    def find_all(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def click(self, css: str) -> None:
        """Clicks ``css``, again if a re-render swapped it out between finding and clicking."""
        def clicked(_driver: webdriver.Chrome) -> bool:
            self.find(css).click()
            return True
        self.wait(clicked, message=f"could not click {css!r}")

    def fill(self, css: str, text: str) -> None:
        def filled(_driver: webdriver.Chrome) -> bool:
            element = self.find(css)
            element.clear()
            element.send_keys(text)
            return True
        self.wait(filled, message=f"could not fill {css!r}")

    def select(self, css: str, value: str) -> None:
        Select(self.find(css)).select_by_value(value)

    def wait_text(self, css: str, text: str, timeout: float = 10) -> WebElement:
        """The visible element ``css`` once its text contains ``text``."""
        def has(driver: webdriver.Chrome) -> WebElement | bool:
            for element in driver.find_elements(By.CSS_SELECTOR, css):
                if element.is_displayed() and text in element.text:
                    return element
            return False
        return self.wait(has, timeout, f"{css!r} never showed {text!r}")

    def view(self, name: str, timeout: float = 10) -> WebElement:
        """The page's current view once the page named ``name`` has finished rendering."""
        return self.find(f'#main:not([aria-busy]) > .view[data-view="{name}"]', timeout)

    def session_storage(self) -> dict[str, str]:
        return dict(self.driver.execute_script(
            "return Object.fromEntries(Object.entries(window.sessionStorage));"))

    # -- evidence --------------------------------------------------------------
    def screenshot(self, name: str) -> Path:
        """A PNG of the whole page (the window grows to the page's height first)."""
        height = int(self.driver.execute_script("return document.documentElement.scrollHeight"))
        self.driver.set_window_size(1440, max(900, min(height + 100, 4000)))
        path = self.screenshots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        self.driver.set_window_size(1440, 900)
        return path

    def collect_logs(self) -> None:
        """Moves what the browser logged since the last call into ``console`` and ``requests``."""
        self.console.extend(self.driver.get_log("browser"))
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            # Only what our page asked for: Chromium's own tabs (chrome://new-tab-page at start) are not the page.
            if message["method"] == "Network.requestWillBeSent" and \
                    message["params"].get("documentURL", "").startswith(self.origin + "/"):
                self.requests.append(message["params"]["request"]["url"])
            elif message["method"] == "Network.responseReceived":
                response = message["params"]["response"]
                self.responses[response["url"]] = {k.lower(): v for k, v in response["headers"].items()}

    def response_headers(self, url: str) -> dict[str, str]:
        """The headers the browser received with ``url`` (names in lower case)."""
        self.collect_logs()
        return self.responses[url]

    def console_errors(self, allow: Callable[[dict[str, Any]], bool] = lambda _e: False) -> list[str]:
        self.collect_logs()
        return [e["message"] for e in self.console if e["level"] in ("SEVERE", "WARNING") and not allow(e)]

    def foreign_requests(self) -> list[str]:
        """Requests the page made to anything but its own origin (data: URLs are inline, not requests)."""
        self.collect_logs()
        return [url for url in self.requests if not url.startswith((self.origin + "/", "data:"))]
