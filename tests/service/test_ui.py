"""The web page in a real browser (Debian's headless chromium): it renders a known user's history, recall
candidates and re-ranked list as the API answers them, its event button changes the list, and its filters,
item detail and new-user form work. Skipped, saying why, only where chromium cannot be installed."""
from __future__ import annotations

import httpx
import pytest

from tests.browserkit import MISSING, browser, items, open_user, served, wait_until
from tests.servicekit import AUTH, TOKEN

pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]
USER = "u18"


@pytest.fixture(scope="module")
def page(bundle_root, tmp_path_factory):
    """A served bundle with its own state, and one browser, for the module."""
    root = tmp_path_factory.mktemp("ui")
    with served(bundle_root, root / "state", root / "service.log", admin_token=TOKEN) as url, browser() as driver:
        yield url, driver


def answer(url: str, **body) -> dict:
    response = httpx.post(f"{url}/recommend", json={"trace": True, **body}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def by_css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def test_the_page_shows_what_the_api_answers_for_a_shared_link(page, tmp_path):
    url, driver = page
    top = open_user(driver, url, USER)
    expected = answer(url, user_id=USER, k=10)
    assert top == [i["item_id"] for i in expected["items"]]
    assert items(driver, "candidates") == [c["item_id"] for c in expected["trace"]["candidates"]]
    assert items(driver, "history") == [h["item_id"] for h in expected["trace"]["history"]]
    assert by_css(driver, "#user_id")[0].get_attribute("value") == USER
    assert {chip.text.split()[0] for chip in by_css(driver, "#timings .chip")} >= {"features", "user", "ann", "rerank", "total"}
    moves = [el.text for el in by_css(driver, "#ranked .move")]
    assert moves == [_move(i["recall_rank"] - p) for p, i in enumerate(expected["items"])]
    assert expected["bundle_version"] in by_css(driver, "#bundle")[0].text
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    shot = tmp_path / "ui.png"
    driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_clicking_an_item_shows_its_features_and_similar_items(page):
    url, driver = page
    open_user(driver, url, USER)
    by_css(driver, "#ranked > li .title")[0].click()
    similar = wait_until(driver, lambda d: items(d, "similar"), "similar items rendered")
    first = by_css(driver, "#ranked > li")[0].get_attribute("data-item")
    served = httpx.get(f"{url}/similar-items/{first}", params={"k": 10}).json()["items"]
    assert similar == [i["item_id"] for i in served]
    assert len(by_css(driver, "#features tr")) > 5  # the explain features of this user and item


def test_the_event_button_records_an_event_and_the_list_changes(page):
    url, driver = page
    before = open_user(driver, url, USER)
    by_css(driver, "#ranked > li button.event")[0].click()
    wait_until(driver, lambda d: "Event recorded" in by_css(d, "#status")[0].text, "the list re-rendered after the event")
    after = items(driver, "ranked")
    assert before[0] not in after  # now seen, so no longer recommended
    assert items(driver, "history")[0] == before[0]  # the most recent interaction
    assert after == [i["item_id"] for i in answer(url, user_id=USER, k=10)["items"]]
    fresh = [li.get_attribute("data-item") for li in by_css(driver, "#ranked > li.fresh")]
    assert fresh == [i for i in after if i not in before] and fresh


def test_filters_and_a_new_user_from_the_form(page, bundle):
    from selenium.webdriver.support.ui import Select

    url, driver = page
    open_user(driver, url, USER)
    Select(by_css(driver, "#genres_any")[0]).select_by_visible_text("genre2")
    by_css(driver, "#go")[0].click()
    genre = list(bundle.catalog["genre_names"]).index("genre2")
    row_of = {item: r for r, item in enumerate(bundle.catalog["item_ids"])}
    shown = wait_until(driver, lambda d: (ids := items(d, "ranked")) and all(bundle.arrays["item_genres"][row_of[i], genre] for i in ids)
                       and ids, "a genre-filtered list")
    assert shown == [i["item_id"] for i in answer(url, user_id=USER, k=10, filters={"genres_any": ["genre2"]})["items"]]
    driver.get(f"{url}/")
    wait_until(driver, lambda d: by_css(d, "#genres_any option"), "the form built from /info")
    by_css(driver, "#recent_items")[0].send_keys("i3, i9")
    by_css(driver, "#go")[0].click()
    wait_until(driver, lambda d: "a new user" in by_css(d, "#status")[0].text, "a new user's list")
    assert items(driver, "history") == ["i9", "i3"]
    assert items(driver, "ranked") == [i["item_id"] for i in answer(url, recent_items=["i3", "i9"], k=10)["items"]]
    assert "recent_items=i3%2Ci9" in driver.current_url


def test_a_bad_user_id_is_said_on_the_page(page):
    url, driver = page
    driver.get(f"{url}/?user_id=nobody")
    wait_until(driver, lambda d: "unknown user_id 'nobody'" in by_css(d, "#status")[0].text, "the API's error shown")


def _move(places: int) -> str:
    return f"▲{places}" if places > 0 else f"▼{-places}" if places < 0 else "="


def test_the_page_shows_running_experiments_and_the_users_assignment(page):
    url, driver = page
    body = {"variants": [{"name": "control", "share": 0.5}, {"name": "shallow", "share": 0.5, "candidates": 20}]}
    assert httpx.put(f"{url}/admin/experiments/page-test", json=body, headers=AUTH).status_code == 201
    driver.get_log("browser")  # what earlier tests left (a 404 on purpose) is theirs
    try:
        open_user(driver, url, USER)
        mine = httpx.get(f"{url}/recommend", params={"user_id": USER}).json()["assignments"]["page-test"]
        wait_until(driver, lambda d: by_css(d, '[data-experiment="page-test"] tr[data-variant]'), "experiments rendered")
        rows = [r.get_attribute("data-variant") for r in by_css(driver, '[data-experiment="page-test"] tr[data-variant]')]
        assert rows == ["control", "shallow"]
        assert f"page-test = {mine}" in by_css(driver, "#status")[0].text
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        httpx.delete(f"{url}/admin/experiments/page-test", headers=AUTH)
