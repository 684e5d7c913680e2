"""The /ui page in a real browser (headless chromium) against a real ``hardneg serve`` with an API key.

The page must ask for the key before it shows anything, and then show, for a searched id, tiles whose ids and
labels are exactly those the JSON API returns, with the snapshot's thumbnails. A screenshot is left in the
test artifacts (``test-artifacts/ui.png`` unless ``HARDNEG_TEST_ARTIFACTS`` says otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image
from api_support import API_KEY, STORE_KEY, wait_for
from browser_support import BrowserMissing, artifacts_dir, chrome
from inspect_support import FLIPPED, build_inspect_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator:
    try:
        driver = chrome(tmp_path_factory.mktemp("chromium-profile"))
    except BrowserMissing as e:
        if os.environ.get("HARDNEG_REQUIRE_BROWSER") == "1":
            pytest.fail(f"HARDNEG_REQUIRE_BROWSER=1 but {e}")
        pytest.skip(str(e))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory, start_server):
    store = build_inspect_store(tmp_path_factory.mktemp("ui") / "store")
    s = start_server(store.root, {"HARDNEG_API_KEY": API_KEY, "HARDNEG_STORE_KEY": STORE_KEY})
    wait_for(lambda: httpx.get(f"{s.url}/readyz").status_code == 200, what="/readyz")
    return s, store


def tiles(driver, container: str) -> list[tuple[int, int, str]]:
    """(data-id, data-label, visible text) of each tile in ``#container``, read in one script (the page may
    replace the tiles at any moment)."""
    found = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(t => [t.dataset.id, t.dataset.label, t.innerText])",
        f"#{container} .tile")
    return [(int(i), int(lab) if lab is not None else -1, text) for i, lab, text in found if i is not None]


def thumbnails_loaded(driver) -> bool:
    """Every tile's picture has arrived (8x8 PNGs the page fetched with the key)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('.tile img')].every(i => i.complete && i.naturalWidth === 8)")


def test_page_shows_what_the_api_returns(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    srv, store = server
    api = httpx.Client(base_url=srv.url, headers={"X-API-Key": API_KEY}, timeout=30)
    browser.get(f"{srv.url}/ui")
    # No key yet: the page asks for it and shows no data.
    wait_for(lambda: browser.find_element(By.ID, "key-panel").is_displayed(), what="the key prompt")
    assert "pixels" not in browser.find_element(By.ID, "served").text
    key = browser.find_element(By.ID, "key-input")
    key.send_keys("wrong-key")
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait_for(lambda: "refused" in browser.find_element(By.ID, "key-message").text, what="the refusal")
    assert "pixels" not in browser.find_element(By.ID, "served").text
    key.clear()
    key.send_keys(API_KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait_for(lambda: "serving pixels-b: 300 items" in browser.find_element(By.ID, "served").text, what="the header")
    assert not browser.find_element(By.ID, "key-panel").is_displayed()

    item_id = int(store.ids[FLIPPED[1]])  # a flipped item: its neighbours carry another label
    box = browser.find_element(By.ID, "item-id")
    box.clear()
    box.send_keys(str(item_id))
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("6")
    browser.find_element(By.CSS_SELECTOR, "#search-form button").click()
    wait_for(lambda: len(tiles(browser, "neighbors")) == 6 and len(tiles(browser, "hard-negatives")) == 6,
             what="the neighbour tiles")

    item = api.get(f"/items/{item_id}").json()
    near = api.get(f"/neighbors/{item_id}", params={"k": 6}).json()["results"][0]
    hard = api.get(f"/neighbors/{item_id}", params={"k": 6, "different_label": True}).json()["results"][0]
    assert [(i, lab) for i, lab, _ in tiles(browser, "item")] == [(item_id, item["label"])]
    for container, want in (("neighbors", near), ("hard-negatives", hard)):
        got = tiles(browser, container)
        assert [(i, lab) for i, lab, _ in got] == [(n["id"], n["label"]) for n in want]
        for (_, _, text), n in zip(got, want):
            assert f"id {n['id']}" in text and f"label {n['label']}" in text and f"d² {n['distance']:.3f}" in text
    wait_for(lambda: thumbnails_loaded(browser), what="the thumbnails")

    browser.find_element(By.ID, "load-suspects").click()
    audit = api.get("/audit/labels", params={"limit": 24}).json()
    wait_for(lambda: len(tiles(browser, "suspects")) == 24, what="the suspects")
    assert [(i, lab) for i, lab, _ in tiles(browser, "suspects")] == [(s["id"], s["label"]) for s in audit["suspects"]]

    # An uploaded picture is embedded by the snapshot's model: the page must show what POST /neighbors returns
    # for the same inputs (the PNG's pixels / 255, as the page computes them).
    picture = tmp_path / "digit.png"
    pixels = store.thumbs[int(FLIPPED[2])]
    Image.fromarray(pixels).save(picture)
    browser.find_element(By.ID, "upload").send_keys(str(picture))
    want = api.post("/neighbors", json={"inputs": [(pixels[None] / 255).tolist()], "k": 6}).json()["results"][0]
    wait_for(lambda: [t[0] for t in tiles(browser, "neighbors")] == [n["id"] for n in want], what="the upload's tiles")
    assert [(i, lab) for i, lab, _ in tiles(browser, "neighbors")] == [(n["id"], n["label"]) for n in want]
    assert want[0]["id"] == int(store.ids[FLIPPED[2]])  # the picture finds its own item first

    browser.find_element(By.ID, "item-id").clear()
    browser.find_element(By.ID, "item-id").send_keys(str(item_id))
    browser.find_element(By.CSS_SELECTOR, "#search-form button").click()
    wait_for(lambda: thumbnails_loaded(browser), what="the thumbnails")
    path = artifacts_dir() / "ui.png"
    assert browser.save_screenshot(str(path)) and path.stat().st_size > 10_000
