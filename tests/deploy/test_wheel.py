"""The built wheel (what `pip install keygate` and the container image get) carries the web page."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from gateway.admin.ui import UI_DIR

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_every_file_of_the_web_page(tmp_path: Path) -> None:
    """Every file under gateway/admin/ui/ is package data in the wheel."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    [wheel] = tmp_path.glob("keygate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    page = {f"gateway/admin/ui/{p.name}" for p in UI_DIR.iterdir() if p.is_file()}
    assert {"gateway/admin/ui/index.html", "gateway/admin/ui/app.js"} <= page
    assert page <= names, sorted(page - names)
