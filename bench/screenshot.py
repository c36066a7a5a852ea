"""The README's picture of the web page (docs/ui.png): the page in Debian's headless chromium, on a trained
bundle, opened on one user with an item clicked (its re-ranker features and similar items shown).

    python -m bench.screenshot --bundle artifacts --user 1
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tests.browserkit import MISSING, browser, items, open_user, served, wait_until

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=ROOT / "artifacts")
    p.add_argument("--user", default="1")
    p.add_argument("--click", type=int, default=1, help="which re-ranked item to open (0-based)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "ui.png")
    args = p.parse_args()
    if MISSING:
        raise SystemExit(MISSING)
    from selenium.webdriver.common.by import By

    with tempfile.TemporaryDirectory() as tmp, served(args.bundle.resolve(), Path(tmp) / "state", Path(tmp) / "log") as url, \
            browser() as driver:
        open_user(driver, url, args.user)
        driver.find_elements(By.CSS_SELECTOR, "#ranked > li .title")[args.click].click()
        wait_until(driver, lambda d: items(d, "similar"), "similar items rendered")
        driver.save_screenshot(str(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
