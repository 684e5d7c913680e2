"""Headless Debian chromium driven by selenium through Debian's chromedriver (no driver is ever downloaded).

``chrome()`` returns a driver or raises :class:`BrowserMissing`; the browser tests skip on that, unless
``HARDNEG_REQUIRE_BROWSER=1`` (``.ci/run`` sets it after installing the packages), where they fail instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Flags that work in a container without a GPU, a sandbox or network: no background fetches of any kind.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1100")


class BrowserMissing(RuntimeError):
    """selenium, chromium or chromedriver is not installed."""


def artifacts_dir() -> Path:
    """Where tests leave screenshots: ``HARDNEG_TEST_ARTIFACTS`` or ``test-artifacts/`` at the repository root."""
    root = Path(os.environ.get("HARDNEG_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def chrome(profile: Path):
    """A headless chromium driver with a fresh profile in the empty folder ``profile``."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BrowserMissing("selenium is not installed: pip install -e '.[browser]'") from None
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        raise BrowserMissing("chromium and chromedriver are not on PATH: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)
