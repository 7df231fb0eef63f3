"""The chat page at / in a real headless Chromium (selenium): type a message, send it, see the answer stream in as
growing prefixes, and see which pool answered and its swap time. The answer must equal the server's own
non-streamed answer to the same request. Skipped only where no Chromium is installed."""

from __future__ import annotations

import shutil

import pytest

from test_serve import Server, call, serve_bundle

INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
RECORD = """window.__seen = [];
new MutationObserver((records) => { for (const r of records) {
  const el = r.target.nodeType === 1 ? r.target : r.target.parentElement;
  if (el && el.id === 'answer-1') window.__seen.push(el.textContent); } })
  .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(serve_bundle(tmp_path_factory), log=tmp_path_factory.mktemp("browser") / "serve.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.skip(f"no Chromium installed (install it with: {INSTALL})")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(flag)
    driver_path = shutil.which("chromedriver")
    driver = webdriver.Chrome(options=opts, service=Service(driver_path) if driver_path else None)
    try:
        yield driver
    finally:
        driver.quit()


def test_chat_page_streams_the_answer_and_shows_the_pool(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    msg = "Solve for x: 2x + 3 = 11."
    wait = WebDriverWait(browser, 120)
    browser.get(server.url + "/")
    wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "model " + server.bundle_name))
    Select(browser.find_element(By.ID, "pool")).select_by_value("math")
    browser.execute_script(RECORD)
    browser.find_element(By.ID, "msg").send_keys(msg)
    browser.find_element(By.ID, "send").click()
    meta = wait.until(EC.presence_of_element_located((By.ID, "meta-1")))
    answer = browser.find_element(By.ID, "answer-1").text
    seen = browser.execute_script("return window.__seen")
    # what the page asks for, without streaming: the same greedy answer
    status, whole = call(server.port, "POST", "/v1/chat/completions",
                         {"model": server.bundle_name, "pool": "math", "max_tokens": 64, "temperature": 0,
                          "messages": [{"role": "user", "content": msg}]})
    assert status == 200 and whole["emo_edge"]["pool"] == "math"
    assert answer == whole["choices"][0]["message"]["content"].strip() and answer
    # streamed: the answer grew through several prefixes before it was complete
    assert len(seen) >= 3 and seen[-1].strip() == answer
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:])) and len(set(seen)) >= 3
    assert meta.get_attribute("data-pool") == "math"
    assert meta.text.startswith("pool math, swapped in ") and meta.text.endswith(" ms")
