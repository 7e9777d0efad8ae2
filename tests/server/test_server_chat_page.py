"""The chat page at GET / in headless Chromium (selenium + chromium-driver): send a message, see the
streamed greedy reply, send a second one. Skips when selenium, chromium or chromedriver is absent."""

from __future__ import annotations

import shutil

import pytest
from live_server import engine_fixture, serve  # noqa: F401  (the fixture "engine")

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from hotexperts.engine.sampling import SamplingParams  # noqa: E402
from hotexperts.engine.textstream import TextStream  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium / chromedriver not installed")


@pytest.fixture
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    try:
        yield drv
    finally:
        drv.quit()


def _send(browser, text: str, n: int):
    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done]")) == n)
    return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].get_attribute("textContent")


def test_chat_page_streams_a_reply(engine, browser):
    with serve(engine) as s:
        browser.get(s.url + "/")
        WebDriverWait(browser, 15).until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        browser.execute_script("document.getElementById('temperature').value = '0';"
                               "document.getElementById('max_tokens').value = '6';")
        reply = _send(browser, "Hello there", 1)
        assert s.wait_idle()
        ids = engine.tokenizer.encode_chat([{"role": "user", "content": "Hello there"}])
        params = SamplingParams(temperature=0, max_tokens=6)
        want = "".join(TextStream(engine.tokenizer).run(engine.generate(ids, params)))
        assert reply == want
        assert "finish: length" in browser.find_element(By.ID, "status").text
        second = _send(browser, "And again", 2)
        assert isinstance(second, str) and not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
