"""Listeners that cannot all bind: one line each from check-config and serve (README, check-config)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config.load import serving_problems

UPSTREAM = {"upstreams": [{"name": "app", "url": "http://127.0.0.1:9"}]}


def clash(section: str, text: str, other: str, other_text: str) -> str:
    return (f"{section}.listen = {text!r}: the address of {other}.listen ({other_text!r}); "
            "each listener needs a port of its own")


@pytest.mark.parametrize(("listens", "problems"), [
    ({}, []),  # the defaults: 8000 and 8001, authz off
    ({"proxy": "127.0.0.1:8001"}, [clash("admin", "127.0.0.1:8001", "proxy", "127.0.0.1:8001")]),
    ({"proxy": "localhost:8001"}, [clash("admin", "127.0.0.1:8001", "proxy", "localhost:8001")]),
    ({"proxy": "0.0.0.0:9000", "authz": "127.0.0.1:9000"}, [clash("authz", "127.0.0.1:9000", "proxy", "0.0.0.0:9000")]),
    ({"proxy": "[::]:9000", "authz": "[::1]:9000"}, [clash("authz", "[::1]:9000", "proxy", "[::]:9000")]),
    ({"proxy": "[0::1]:9000", "admin": "[::1]:9000"}, [clash("admin", "[::1]:9000", "proxy", "[0::1]:9000")]),
    ({"proxy": "0.0.0.0:9000", "authz": "[::]:9000"}, []),  # IPv6 sockets are IPv6-only: both bind
    ({"proxy": "[::]:9000", "authz": "127.0.0.1:9000"}, []),
    ({"proxy": "127.0.0.1:9000", "admin": "127.0.0.2:9000"}, []),
    ({"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0", "authz": "127.0.0.1:0"}, []),  # each gets a free port
    ({"proxy": "127.0.0.1:9000", "authz": ""}, []),  # authz off
    ({"proxy": "gw.example:9000", "admin": "GW.example:9000"}, [clash("admin", "GW.example:9000", "proxy",
                                                                       "gw.example:9000")]),
    ({"proxy": "127.0.0.1:9000", "admin": "127.0.0.1:9000", "authz": "127.0.0.1:9000"}, [
        clash("admin", "127.0.0.1:9000", "proxy", "127.0.0.1:9000"),
        clash("authz", "127.0.0.1:9000", "proxy", "127.0.0.1:9000")]),
    ({"proxy": "not an address", "admin": "127.0.0.1:8000"}, []),  # the bad one is its own setting's problem
])
def test_listeners_that_cannot_all_bind(listens: dict[str, str], problems: list[str]) -> None:
    values: dict[str, Any] = {**UPSTREAM, **{section: {"listen": text} for section, text in listens.items()}}
    assert serving_problems(values) == problems
