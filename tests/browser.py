"""Render a local HTML file in headless Chromium (Debian's ``chromium`` and ``chromium-driver``) with selenium."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,2000",
)
"""Headless and offline: no sandbox (root in CI containers), no background connections (closed network)."""


@dataclass
class Rendered:
    images: list[dict]
    """Every ``<img>``: its ``alt``, ``complete`` and ``naturalWidth``."""
    console: list[dict]
    """The browser console's entries (``level``, ``message``)."""
    resources: list[str]
    """URLs the page fetched (Resource Timing)."""
    title: str
    text: str


def chromium() -> tuple[str, str]:
    """Paths of Chromium and its driver; skips the test, saying why, where they are not installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "Chromium and chromedriver not found (Debian: apt-get install chromium chromium-driver; .ci/run "
            "installs them when run as root)"
        )
    return browser, driver


def render(path: Path, screenshot: Path | None = None) -> Rendered:
    """Open ``path`` (file://) in headless Chromium, wait for it to load, and read back what it shows."""
    browser, driver_path = chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(Path(path).resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, "
            "naturalWidth: i.naturalWidth}));"
        )
        resources = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:'));"
        )
        if screenshot is not None:
            driver.save_screenshot(str(screenshot))
        return Rendered(
            images, driver.get_log("browser"), resources, driver.title, driver.find_element("tag name", "body").text
        )
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def assert_renders(path: Path, screenshot: Path | None = None, min_images: int = 1) -> Rendered:
    """The page loads in Chromium with every image decoded (naturalWidth > 0), no console error and no fetch."""
    page = render(path, screenshot)
    assert len(page.images) >= min_images, f"{len(page.images)} images on the page"
    broken = [i for i in page.images if not i["complete"] or i["naturalWidth"] <= 0]
    assert not broken, f"images that did not load: {broken}"
    errors = [entry for entry in page.console if entry["level"] in ("SEVERE", "ERROR")]
    assert not errors, f"console errors: {errors}"
    assert not page.resources, f"the page fetched {page.resources}; it must be self-contained"
    return page
