"""One key's requests per hour by decision over the last 7 days, drawn from its request records."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

from gateway.models import RequestRecord
from tests.e2e.harness import Keygate, stored_requests

from .browser import Browser
from .conftest import AdminKey, cli
from .flows import proxy_status, sign_in


async def test_chart_shows_each_hours_requests_by_decision(
    browser: Browser, gateway: Keygate, admin_key: AdminKey,
) -> None:
    """Real requests through the proxy and older records of the week are bars per hour and decision."""
    record = json.loads(cli(gateway, "keys", "create", "--name", "charted", "--operation", "read", "--json"))
    assert [proxy_status(gateway, record["key"]) for _ in range(3)] == [200] * 3
    assert proxy_status(gateway, record["key"], "POST") == 403  # write is not granted
    now = datetime.now(UTC)
    week = [RequestRecord(now - timedelta(hours=h), record["id"], "GET", "/echo", "app", "read", "allowed", 200,
                          "127.0.0.1", 1.0) for h in range(6, 160, 7) for _ in range(h % 5 + 1)]
    week += [RequestRecord(now - timedelta(hours=h), record["id"], "GET", "/echo", "app", "read", "rate_limited",
                           429, "127.0.0.1", 1.0) for h in (30, 31, 80)]
    week += [RequestRecord(now - timedelta(days=9), record["id"], "GET", "/echo", "app", "read", "allowed", 200,
                           "127.0.0.1", 1.0)]  # before the window
    async with gateway.service() as service:
        await service.store.add_request_records(week)
    for _ in range(100):  # the proxy's four records are flushed every 0.2 s
        if len(await stored_requests(gateway, record["id"])) >= len(week) + 4:
            break
        await asyncio.sleep(0.1)
    sign_in(browser, admin_key)
    browser.open(f"/ui/#/keys/{record['id']}")
    browser.view("key")
    chart = browser.find("#usage-chart")
    drawn: dict[str, int] = {}
    for rect in chart.find_elements("css selector", "rect[data-decision]"):
        decision = rect.get_attribute("data-decision")
        drawn[decision] = drawn.get(decision, 0) + int(rect.get_attribute("data-requests"))
    allowed = 3 + sum(h % 5 + 1 for h in range(6, 160, 7))
    assert drawn == {"allowed": allowed, "insufficient_scope": 1, "rate_limited": 3}
    legend = browser.find("#usage-legend").text
    assert str(allowed) in legend and "rate limited" in legend.lower()
    assert f"{allowed + 4} requests in the last 7 days" in browser.find("#usage-summary").text
    card = browser.find("#key-usage")
    browser.driver.execute_script("arguments[0].scrollIntoView()", card)
    card.screenshot(str(browser.screenshots / "key-usage-chart.png"))
    browser.screenshot("key-page-with-chart")
    assert browser.foreign_requests() == []
    assert browser.console_errors() == []
