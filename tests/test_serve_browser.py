"""The chat page at serve.py's `/`, in a real headless browser (Debian's chromium, driven by
selenium through the system's chromedriver), against `uv run serve.py` as a user starts it."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from chatkit import CHAT_MODEL, plain_reply
from evalkit import PROJECT_DIR, write_model

CHROMEDRIVER = "/usr/bin/chromedriver"  # Debian's chromium-driver; .ci/run installs it
START_TIMEOUT = 120  # seconds for the server to load torch and the model on a busy machine
REPLY_TIMEOUT = 60


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(url, process):
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert process.poll() is None, "serve.py exited"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"serve.py did not answer {url}/health in {START_TIMEOUT} s")


@pytest.fixture
def served(tmp_path):
    model_json, weights, model = write_model(tmp_path / "model", CHAT_MODEL, seed=5)
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen([sys.executable, "serve.py", str(model_json), str(weights), "--port", str(port),
                                "--threads", "1"], cwd=PROJECT_DIR, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", process)
        yield f"http://127.0.0.1:{port}", model
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,700",
                     f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(argument)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(REPLY_TIMEOUT)
    yield driver
    driver.quit()


def set_field(browser, element_id, value):
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


@pytest.mark.e2e
def test_a_message_typed_in_the_page_gets_the_greedy_reply(served, browser, tmp_path):
    url, model = served
    browser.get(url)
    WebDriverWait(browser, REPLY_TIMEOUT).until(lambda b: b.find_element(By.ID, "model").text == "model")
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", "8")
    set_field(browser, "message", "Hello")
    browser.find_element(By.ID, "message").send_keys(Keys.ENTER)
    done = '.assistant[data-done="true"], .error[data-done="true"]'
    reply = WebDriverWait(browser, REPLY_TIMEOUT).until(lambda b: b.find_elements(By.CSS_SELECTOR, done))[0]
    browser.save_screenshot(str(tmp_path / "chat-page.png"))
    expected, _, _ = plain_reply(model, "User: Hello\nAssistant: ", 8, stop_text="\nUser:")
    assert reply.get_attribute("class") == "message assistant"
    assert reply.get_attribute("textContent") == expected
    assert [m.get_attribute("textContent") for m in browser.find_elements(By.CSS_SELECTOR, ".user")] == ["Hello"]
    # A second message is answered with the conversation so far.
    set_field(browser, "message", "More")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, REPLY_TIMEOUT).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, done)) == 2)
    second, _, _ = plain_reply(model, f"User: Hello\nAssistant: {expected}\nUser: More\nAssistant: ", 8,
                               stop_text="\nUser:")
    assert browser.find_elements(By.CSS_SELECTOR, ".assistant")[1].get_attribute("textContent") == second
