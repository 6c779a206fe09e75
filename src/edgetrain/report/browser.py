"""Render an HTML report in headless Chromium (Debian package ``chromium``) to a PNG screenshot."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def screenshot(html_path: Path, png_path: Path, width: int = 1100, height: int = 2400, timeout: float = 90.0) -> Path:
    """Screenshot ``html_path`` into ``png_path``; raises ``RuntimeError`` if Chromium is missing or fails."""
    browser = find_chromium()
    if browser is None:
        raise RuntimeError("Chromium is not installed: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        command = [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={png_path}",
            html_path.resolve().as_uri(),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0 or not png_path.exists():
        raise RuntimeError(f"Chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return png_path
