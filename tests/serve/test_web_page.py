"""The web page in a real browser: headless Chromium (Debian `chromium` + `chromium-driver`,
driven by selenium) types a query, presses search and gets results with working audio
players.

The page is served by uvicorn in this process (`local_app` over the `served_index` test
index, whose clips keep their audio) rather than by Ray Serve: both serve the same FastAPI
app, and in-process start-up is seconds instead of a Serve deployment's tens of seconds.
"""

from __future__ import annotations

import importlib.util
import io
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import soundfile as sf

from gpa_ray.config import Config

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
QUERY = "a dog barking"
WAIT_S = 20


@pytest.fixture(scope="session")
def chromium_available() -> None:
    """Debian's chromium and chromedriver and selenium, or a skip (a failure on CI, where
    `.ci/run` installs them). Requested first by the test, so a skip comes before the
    index fixtures are built."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package")
    if missing:
        message = (
            f"headless browser test needs {', '.join(missing)}"
            " (apt-get install chromium chromium-driver; pip install selenium)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def browser(chromium_available: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A headless Chromium with a fresh profile, talking to loopback only."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless=new",
        "--no-sandbox",  # containers and root have no user namespaces for the sandbox
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-proxy-server",  # loopback only: no proxy from the environment
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--autoplay-policy=no-user-gesture-required",  # a test plays audio without a click
        "--window-size=1280,1400",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


# Resolves when the <audio> element has loaded its source and decoded its header (the
# browser can play it), with the duration; an error code if the browser cannot.
LOAD_AUDIO_JS = """
const [audio, done] = [arguments[0], arguments[arguments.length - 1]];
audio.addEventListener("loadedmetadata", () => done({duration: audio.duration}), {once: true});
audio.addEventListener("error", () => done({error: audio.error && audio.error.code}), {once: true});
audio.preload = "metadata";
audio.load();
"""


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (bytes 16..24 after the signature)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.usefixtures("chromium_available")
def test_page_search_shows_results_with_audio_players(
    browser, local_server: tuple[str, Config], served_index: dict, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page_server, _ = local_server
    expected = requests.post(f"{page_server}/v1/search/text", json={"query": QUERY, "k": 10})
    assert expected.status_code == 200
    expected_results = expected.json()["results"]

    browser.get(page_server + "/")
    assert browser.title == "gpa_ray audio-text search"
    WebDriverWait(browser, WAIT_S).until(
        lambda d: d.find_element(By.ID, "index-info").text.startswith("Index ")
    )
    browser.find_element(By.ID, "query").send_keys(QUERY)
    browser.find_element(By.ID, "search-button").click()
    items = WebDriverWait(browser, WAIT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#results li.result")
    )
    status = browser.find_element(By.ID, "status")
    assert status.text.startswith(f"{len(expected_results)} results in ")
    assert "error" not in (status.get_attribute("class") or "")

    # The page shows what the API answers, in rank order: ids, captions, scores.
    assert len(items) == len(expected_results) == len(served_index["clips"])
    audio_by_id = {c["clip_id"]: c["audio"] for c in served_index["clips"]}
    for item, result in zip(items, expected_results, strict=True):
        assert item.find_element(By.CSS_SELECTOR, ".id").text == result["clip_id"]
        assert item.find_element(By.CSS_SELECTOR, ".captions").text == " | ".join(
            result["captions"]
        )
        assert f"score {result['score']:.4f}" in item.find_element(By.CSS_SELECTOR, ".score").text
        players = item.find_elements(By.TAG_NAME, "audio")
        assert len(players) == 1
        src = players[0].get_attribute("src")
        assert src == page_server + result["audio_url"]
        audio = requests.get(src, timeout=30)
        assert audio.status_code == 200
        assert audio.headers["content-type"].startswith("audio/")
        assert audio.content == audio_by_id[result["clip_id"]] and len(audio.content) > 1000

    # The browser itself loads and decodes the top result's audio: same duration as the
    # stored FLAC has by soundfile.
    loaded = browser.execute_async_script(
        LOAD_AUDIO_JS, items[0].find_element(By.TAG_NAME, "audio")
    )
    assert "error" not in loaded, f"Chromium could not load the clip's audio: {loaded}"
    stored = sf.info(io.BytesIO(audio_by_id[expected_results[0]["clip_id"]]))
    assert loaded["duration"] == pytest.approx(stored.duration, abs=0.01)

    screenshot = tmp_path / "web_page.png"
    assert browser.save_screenshot(str(screenshot))
    data = screenshot.read_bytes()
    width, height = png_size(data)
    assert width >= 800 and height >= 600 and len(data) > 20_000


def _ids(items: list) -> list[str]:
    from selenium.webdriver.common.by import By

    return [item.find_element(By.CSS_SELECTOR, ".id").text for item in items]


@pytest.mark.usefixtures("chromium_available")
def test_page_filters_and_more_like_this(
    browser, local_server: tuple[str, Config], served_index: dict
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page_server, _ = local_server
    label = served_index["clips"][0]["labels"][0]
    browser.get(page_server + "/")
    browser.find_element(By.ID, "query").send_keys(QUERY)
    browser.find_element(By.ID, "filter-labels").send_keys(label)
    browser.find_element(By.ID, "search-button").click()
    items = WebDriverWait(browser, WAIT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#results li.result")
    )
    body = {"query": QUERY, "k": 10, "filter": {"labels": [label]}}
    filtered = requests.post(f"{page_server}/v1/search/text", json=body).json()["results"]
    assert _ids(items) == [r["clip_id"] for r in filtered]
    assert 0 < len(filtered) < len(served_index["clips"])
    assert all(label in r["labels"] for r in filtered)

    # "More like this" on the top clip: the API's similar clips under the same filter,
    # the clip itself left out.
    top = filtered[0]["clip_id"]
    items[0].find_element(By.CSS_SELECTOR, "button.similar").click()
    WebDriverWait(browser, WAIT_S).until(
        lambda d: f"like {top}" in d.find_element(By.ID, "status").text
    )
    shown = _ids(browser.find_elements(By.CSS_SELECTOR, "#results li.result"))
    similar = requests.get(
        f"{page_server}/v1/similar/{top}", params={"k": 10, "label": label}, timeout=30
    ).json()["results"]
    assert similar and shown == [r["clip_id"] for r in similar] and top not in shown


# Plays the <audio> element and resolves with where it started (after its media fragment
# seeked it), or an error code.
PLAY_FROM_JS = """
const [audio, done] = [arguments[0], arguments[arguments.length - 1]];
audio.muted = true;
audio.addEventListener("playing", () => { done({at: audio.currentTime}); audio.pause(); },
                       {once: true});
audio.addEventListener("error", () => done({error: audio.error && audio.error.code}), {once: true});
audio.preload = "auto";
audio.play().catch((err) => done({error: String(err)}));
"""


@pytest.mark.usefixtures("chromium_available")
def test_page_shows_a_segment_and_plays_from_it(
    browser, local_server: tuple[str, Config], served_index: dict
) -> None:
    """A hit on a window of a long file names the window and its player starts there. The
    answer is the API's own for a real clip, given the window a segmented index returns
    (`index.segments`; tests/index/test_long_audio.py builds such indexes)."""
    from selenium.webdriver.common.by import By

    page_server, _ = local_server
    answer = requests.post(f"{page_server}/v1/search/text", json={"query": QUERY, "k": 1}).json()
    (hit,) = answer["results"]
    stored = sf.info(
        io.BytesIO(
            next(c for c in served_index["clips"] if c["clip_id"] == hit["clip_id"])["audio"]
        )
    )
    start, end = round(stored.duration * 0.3, 1), round(stored.duration * 0.7, 1)
    answer["results"] = [{**hit, "segment": 1, "segment_start_s": start, "segment_end_s": end}]
    browser.get(page_server + "/")
    browser.execute_script("showClips(arguments[0]);", answer)
    (item,) = browser.find_elements(By.CSS_SELECTOR, "#results li.result")
    assert item.find_element(By.CSS_SELECTOR, ".segment").text == (
        f"best segment {start:.1f}-{end:.1f} s"
    )
    audio = item.find_element(By.TAG_NAME, "audio")
    assert audio.get_attribute("src") == f"{page_server}{hit['audio_url']}#t={start:g},{end:g}"
    played = browser.execute_async_script(PLAY_FROM_JS, audio)
    assert "error" not in played, played
    assert played["at"] == pytest.approx(start, abs=0.05)
    # A whole clip (segment 0 over its full length) shows no segment and plays from 0.
    browser.execute_script("showClips(arguments[0]);", {**answer, "results": [hit]})
    (item,) = browser.find_elements(By.CSS_SELECTOR, "#results li.result")
    assert not item.find_elements(By.CSS_SELECTOR, ".segment")
    assert (
        item.find_element(By.TAG_NAME, "audio").get_attribute("src")
        == page_server + hit["audio_url"]
    )
