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


def test_chat_page_markdown_settings_speed_and_reload(store, browser):
    import json

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    s = Running(["tiny"], max_tokens_limit=200)
    try:
        browser.get(s.url + "/")
        saved = {"history": [{"role": "user", "content": "fruit?"},
                             {"role": "assistant", "content": "*Banana* and `code`\n\n<img src=x onerror=\"window.pwned=1\">\n\n"
                                                              "<script>window.pwned=2</script>\n\n```\nprint(1)\n```"}],
                 "stats": [{"tokens": 5, "tps": 12.5, "ttft": 0.1}], "system": "Be brief.", "temperature": "0", "max_tokens": "8"}
        browser.execute_script(f"localStorage.setItem('slmkit-chat', {json.dumps(json.dumps(saved))}); location.reload();")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant em"))
        first = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
        assert first.find_element(By.TAG_NAME, "em").text == "Banana" and first.find_element(By.TAG_NAME, "code").text == "code"
        inner = first.get_attribute("innerHTML")
        assert "onerror" not in inner and "<script" not in inner and not browser.execute_script("return window.pwned")  # sanitized
        assert first.find_element(By.CSS_SELECTOR, "pre button.copy").text == "copy"  # code blocks get a copy button
        assert browser.find_element(By.ID, "system").get_attribute("value") == "Be brief."
        assert browser.find_element(By.ID, "settings").get_attribute("open") is not None
        assert "12.5 tokens/s" in browser.find_element(By.CSS_SELECTOR, ".stats").text
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 1)
        browser.find_element(By.ID, "reset").click()  # a new chat keeps the settings (the tiny model has 64 tokens of context)
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg")
        browser.find_element(By.ID, "prompt").send_keys("hi")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done]") or d.find_elements(By.CSS_SELECTOR, ".msg.error"))
        errors = browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert not errors, errors[0].text
        stats = browser.find_elements(By.CSS_SELECTOR, ".stats")
        assert len(stats) == 1 and "8 tokens" in stats[0].text and "tokens/s" in stats[0].text  # max_tokens 8 from the settings
        first_answer = browser.find_element(By.CSS_SELECTOR, ".msg.assistant").text
        browser.find_element(By.ID, "regenerate").click()  # the last question again, in place of its answer
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done]") and d.find_element(By.ID, "send").is_enabled())
        assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1 and len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 1
        assert browser.find_element(By.CSS_SELECTOR, ".msg.assistant").text == first_answer  # temperature 0 from the settings
        browser.refresh()  # the conversation and the settings survive a reload
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.user")) == 1)
        assert [m.text for m in browser.find_elements(By.CSS_SELECTOR, ".msg.user")] == ["hi"]
        assert browser.find_element(By.ID, "max_tokens").get_attribute("value") == "8"
        browser.find_element(By.ID, "reset").click()
        browser.refresh()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg")
    finally:
        s.stop()
