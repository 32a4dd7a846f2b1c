"""Loading settings in a test's own folder, with no environment unless a test gives one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config.load import ConfigError, load_settings
from gateway.config.schema import Settings

APP = {"name": "app", "url": "http://127.0.0.1:8080"}
PEPPER = "p" * 40


def load(tmp_path: Path, **kwargs: Any) -> Settings:
    kwargs.setdefault("environ", {})
    return load_settings(cwd=tmp_path, **kwargs)


def problems(tmp_path: Path, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, **kwargs)
    return caught.value.problems


def write(tmp_path: Path, text: str, name: str = "settings.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path
