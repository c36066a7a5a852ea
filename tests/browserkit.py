"""A real browser on the web page: Debian's headless chromium driven through its chromedriver (selenium),
never a downloaded browser. Used by tests/service/test_ui.py and by bench/screenshot.py (the README's picture)."""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.servicekit import free_port, spawned, wait_for

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver") or next((p for p in ("/usr/lib/chromium/chromedriver",) if Path(p).exists()), None)
MISSING = None if CHROMIUM and CHROMEDRIVER else (
    "chromium and its driver are not installed (apt-get install chromium chromium-driver): the browser test needs them")
WINDOW = (1440, 900)  # a laptop screen
TIMEOUT = 30


@contextmanager
def served(bundle_dir: Path, state_dir: Path, log: Path, **settings: str) -> Iterator[str]:
    """The service on a free loopback port, as ``make run`` starts it (plus ``RECSYS_*`` ``settings``); yields its
    base URL."""
    url = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "RECSYS_BUNDLE_DIR": str(bundle_dir), "RECSYS_STATE_DIR": str(state_dir), "RECSYS_LOG_LEVEL": "WARNING",
           **{f"RECSYS_{k.upper()}": v for k, v in settings.items()}}
    cmd = [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]]
    with spawned(cmd, log, env) as proc:
        wait_for(f"{url}/ready", 90, proc)
        yield url


@contextmanager
def browser() -> Iterator:
    """Headless chromium at a laptop's window size, its console log readable (``driver.get_log("browser")``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(TIMEOUT)
        yield driver
    finally:
        driver.quit()


def wait_until(driver, condition, message: str):
    """``condition(driver)`` once it is truthy (the page fetches and renders asynchronously: an element read while the
    page replaces it is stale, and the condition is asked again at the next poll)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, TIMEOUT, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda d: condition(d), message)


def items(driver, list_id: str) -> list[str]:
    """The item ids a list on the page shows, in order."""
    from selenium.webdriver.common.by import By

    return [li.get_attribute("data-item") for li in driver.find_elements(By.CSS_SELECTOR, f"#{list_id} > li[data-item]")]


def open_user(driver, url: str, user: str, k: int = 10) -> list[str]:
    """The page opened on ``?user_id=user``, once its top-k has rendered; returns the top-k ids."""
    driver.get(f"{url}/?user_id={user}")
    return wait_until(driver, lambda d: (ids := items(d, "ranked")) and len(ids) == k and ids, f"top-{k} for {user} rendered")
