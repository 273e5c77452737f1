"""The web page at ``/`` in a real headless browser (Debian's chromium + chromium-driver, via selenium).

Upload an image, type a prompt, submit: the streamed answer appears and equals
``model.generate`` for the same greedy request; the browser logs no errors (the page's
Content-Security-Policy allows only this server, so any outside fetch would be an
error); a screenshot is saved under the test's tmp dir.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("starlette")

from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
TOKENS = 12


@pytest.fixture
def browser(tmp_path):
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the driver from the system: selenium must not look for (download) one itself
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_page_streams_an_answer_about_an_uploaded_image(serve_server, tiny_model, browser, tmp_path):
    image = Image.fromarray((np.random.RandomState(7).rand(240, 320, 3) * 255).astype(np.uint8))
    path = tmp_path / "upload.png"
    image.save(path)
    prompt = "What is in this picture?"
    expected = tiny_model.generate(image, prompt, max_new_tokens=TOKENS)

    browser.get(serve_server.url + "/")
    wait = WebDriverWait(browser, 120, poll_frequency=0.1)
    wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")
    browser.find_element(By.ID, "image").send_keys(str(path))
    wait.until(lambda d: d.find_element(By.ID, "canvas").is_displayed())
    assert "320×240" in browser.find_element(By.ID, "image-info").text
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    # the settings sit in a closed <details>; set the value as a user opening it would
    browser.execute_script(f"document.getElementById('max-tokens').value = '{TOKENS}'")
    browser.find_element(By.ID, "send").click()

    answer = browser.find_element(By.ID, "answer")
    wait.until(lambda d: answer.text)  # text appears while the answer streams
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("done"))
    assert answer.text == expected.strip() or answer.get_attribute("textContent") == expected
    assert "prompt tokens" in browser.find_element(By.ID, "usage").text
    assert not browser.find_element(By.ID, "error").is_displayed()

    # a pointing answer's last chunk: the page lists the points and draws them on the image
    count_red = ("const d = document.getElementById('canvas').getContext('2d').getImageData(150, 110, 21, 21).data;"
                 "let n = 0; for (let i = 0; i < d.length; i += 4) {"
                 "  if (d[i] > 200 && d[i + 1] < 90 && d[i + 2] < 100) n++; } return n;")
    before = browser.execute_script(count_red)
    browser.execute_script(
        "handleEvent(arguments[0], document.getElementById('answer'))",
        '{"choices": [{"index": 0, "delta": {"points": [{"x": 160.0, "y": 120.0, "label": "centre"}]}, '
        '"finish_reason": "stop"}]}')
    assert browser.find_element(By.ID, "points").text == "centre: (160.0, 120.0) px"
    assert browser.execute_script(count_red) >= before + 15  # the red marker around (160, 120)

    shot = Path(tmp_path) / "serve_page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_page_shows_a_server_error(serve_server, browser, tmp_path):
    """A refused request (here: a 1x1 image) shows the server's message on the page."""
    path = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(path)
    browser.get(serve_server.url + "/")
    wait = WebDriverWait(browser, 120, poll_frequency=0.1)
    wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")
    browser.find_element(By.ID, "image").send_keys(str(path))
    wait.until(lambda d: d.find_element(By.ID, "canvas").is_displayed())
    browser.find_element(By.ID, "send").click()
    error = browser.find_element(By.ID, "error")
    wait.until(lambda d: error.is_displayed())
    assert error.text.startswith("400") and "too small" in error.text
