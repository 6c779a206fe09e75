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
    """Screenshot ``html_path`` into ``png_path``; raises a one-line ``RuntimeError`` if Chromium is
    missing, fails or takes longer than ``timeout`` seconds."""
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
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"Chromium did not render {html_path} within {timeout:.0f} s") from None
    if done.returncode != 0 or not png_path.exists():
        last = done.stderr.strip().splitlines()[-1:] or ["no message"]
        raise RuntimeError(f"Chromium failed to render {html_path} (exit {done.returncode}): {last[0][:300]}")
    return png_path
