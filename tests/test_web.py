"""The web chat page end to end in headless Chromium (Debian's chromium + chromium-driver; .ci/run installs them)."""

from __future__ import annotations

import shutil
import tempfile

import pytest
from test_serve import Running, wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does this)",
)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="slmkit-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_chat_page_streams_an_answer_and_stops(store, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    s = Running(["tiny", "smollm2-135m-instruct"], max_tokens_limit=100000)
    try:
        browser.get(s.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 2)
        assert [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#model option")] == ["tiny", "smollm2-135m-instruct"]
        browser.find_element(By.ID, "prompt").send_keys("hello there")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done], .msg.error"))
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        answer = browser.find_element(By.CSS_SELECTOR, ".msg.assistant").text
        user = browser.find_element(By.CSS_SELECTOR, ".msg.user").text
        assert user == "hello there" and answer  # streamed into the page
        # the stop button ends a long answer: make the model unable to stop by itself, then press stop
        sched = s.registry.get("tiny").backend.scheduler
        sched.backend.model.config.max_position_embeddings = 100000
        sched.backend._eos = frozenset()
        browser.execute_script("document.getElementById('prompt').value = 'again'")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.ID, "stop").is_enabled())
        browser.find_element(By.ID, "stop").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=stopped]"))
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
        assert wait_until(lambda: sched.batch_size == 0)  # the server freed the slot
    finally:
        s.stop()
