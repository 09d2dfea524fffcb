"""The web page in a real headless Chromium (Debian ``chromium`` + ``chromium-driver``, driven
by Selenium): a text query shows the expected top result's thumbnail, an uploaded image finds
itself, the side-by-side view shows QuARI and the plain baseline, and the blend's weight
re-ranks QuARI's column — at a desktop and at a phone-sized window. One browser and one
server for the module."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from quari.embed.images import load_image
from quari.retriever import Retriever
from quari.serve import create_app

from helpers import blended_model
from serve_helpers import TEXT_QUERY, TEXT_ROW, make_served

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver")
uvicorn = pytest.importorskip("uvicorn")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

PHONE = (390, 844)
DESKTOP = (1280, 900)
UPLOAD_ROW = 23


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return make_served(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def retriever(served):
    """The served set with a model trained with the static blend (the page shows its weight)."""
    return Retriever(
        served.eset, blended_model(served.eset.dim, seed=3), served.index, encoder=served.encoder
    )


@pytest.fixture(scope="module")
def server(retriever):
    """uvicorn in a thread of this process, on a free loopback port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(retriever), log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    # Headless as root, and quiet: without the networking switches Chromium keeps trying to
    # reach Google's services on a closed network.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait(driver, condition, timeout: float = 20):
    return WebDriverWait(driver, timeout).until(condition)


def hit_ids(driver, column: str) -> list[int]:
    """The ids shown in a column, read in one go (the page replaces the grid as it renders)."""
    ids = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => Number(e.dataset.id));",
        f"#{column} .hit",
    )
    return [int(i) for i in ids]


def first_thumbnail_loaded(driver, column: str) -> bool:
    return driver.execute_script(
        "const img = document.querySelector(arguments[0]);"
        "return !!img && img.complete && img.naturalWidth > 0;",
        f"#{column} .hit img",
    )


def results_changed(column: str, before: list[int]):
    def check(driver):
        ids = hit_ids(driver, column)
        return ids if ids and ids != before else False

    return check


def run_page(
    driver, server, served, retriever, tmp_path: Path, size: tuple[int, int], name: str
) -> None:
    driver.set_window_size(*size)
    driver.get(server + "/")
    wait(driver, ec.text_to_be_present_in_element((By.ID, "set-info"), "48 items"))
    Select(driver.find_element(By.ID, "mode")).select_by_value("plain")
    if driver.find_element(By.ID, "compare").is_selected():
        driver.find_element(By.ID, "compare").click()

    # A text query: the planted row first, its thumbnail loaded.
    box = driver.find_element(By.ID, "query")
    box.clear()
    box.send_keys(TEXT_QUERY)
    driver.find_element(By.ID, "search-button").click()
    ids = wait(driver, results_changed("col-main", []))
    assert ids[0] == TEXT_ROW and len(ids) == 12
    wait(driver, lambda d: first_thumbnail_loaded(d, "col-main"))
    first = driver.find_element(By.CSS_SELECTOR, "#col-main .hit img")
    assert first.get_attribute("src").endswith(f"/items/{TEXT_ROW}/image")
    assert driver.find_element(By.CSS_SELECTOR, "#col-main .hit .score").text == "1.000"
    assert "encode" in driver.find_element(By.CSS_SELECTOR, "#col-main .timings").text

    # An uploaded image finds itself.
    upload = served.image_path(UPLOAD_ROW)
    driver.find_element(By.ID, "file-input").send_keys(str(upload))
    ids = wait(driver, results_changed("col-main", ids))
    assert ids[0] == UPLOAD_ROW
    assert driver.find_element(By.ID, "drop-preview").is_displayed()

    # Side by side: QuARI (adaptive) beside the plain baseline, for the same image.
    driver.find_element(By.ID, "compare").click()
    wait(driver, lambda d: d.find_element(By.ID, "col-plain").is_displayed())
    wait(
        driver,
        lambda d: d.find_element(By.ID, "col-main").get_attribute("data-mode") == "adaptive",
    )
    image = load_image(upload).image
    quari = retriever.search(images=[image], k=12, mode="adaptive")
    plain = retriever.search(images=[image], k=12, mode="plain")
    assert hit_ids(driver, "col-main") == quari.ids[0].tolist()
    assert hit_ids(driver, "col-plain") == plain.ids[0].tolist()
    assert (
        "QuARI (adaptive, blend 0.5)"
        in driver.find_element(By.CSS_SELECTOR, "#col-main .title").text
    )

    # The blend's weight, from the model's 0.5 to 0: QuARI's column follows, the plain one stays.
    model = retriever.model
    model.set_blend_weight(0)
    try:
        alone = retriever.search(images=[image], k=12, mode="adaptive", with_metadata=False)
    finally:
        model.set_blend_weight(None)
    assert alone.ids[0].tolist() != quari.ids[0].tolist()  # so the check has teeth
    blend = driver.find_element(By.ID, "blend")
    assert blend.is_displayed() and blend.get_attribute("value") == "0.5"
    blend.clear()
    blend.send_keys("0", Keys.TAB)
    wait(driver, results_changed("col-main", quari.ids[0].tolist()))
    assert hit_ids(driver, "col-main") == alone.ids[0].tolist()
    assert hit_ids(driver, "col-plain") == plain.ids[0].tolist()
    blend.clear()
    blend.send_keys("0.5", Keys.TAB)  # back, for the next window size
    wait(driver, results_changed("col-main", alone.ids[0].tolist()))
    left = driver.find_element(By.ID, "col-main").rect
    right = driver.find_element(By.ID, "col-plain").rect
    width = driver.execute_script("return window.innerWidth")
    assert left["x"] + left["width"] <= right["x"] + 1  # beside, not below
    assert right["x"] + right["width"] <= width + 1
    # Nothing wider than the window (no sideways scrolling on a phone).
    assert driver.execute_script("return document.documentElement.scrollWidth") <= width

    shot = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 1000
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_page_at_desktop_size(browser, server, served, retriever, tmp_path):
    run_page(browser, server, served, retriever, tmp_path, DESKTOP, "desktop")


def test_page_at_phone_size(browser, server, served, retriever, tmp_path):
    run_page(browser, server, served, retriever, tmp_path, PHONE, "phone")
