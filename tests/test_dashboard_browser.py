"""The dashboard in a real headless browser (issue 27): Debian's chromium and chromium-driver,
driven by Selenium. The page loads with no console errors, asks for the API key (kept in
sessionStorage), shows the figures of a server that just answered a hit and a miss and the
miss's explanation, and updates within 2 s of a new request. Writes docs/dashboard.png."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import openai
import pytest
from live_server import start_server, stop_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:
    pytest.skip("chromium and chromium-driver are not installed "
                "(apt-get install -y chromium chromium-driver, or scripts/install.sh --dev)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed "
                                "(pip install -e '.[test]')")

KEY = "dash-key-27"
SYSTEM = "You are a helpful assistant. Answer briefly and cite the capital of France."
SHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"


def _ask(client, system: str, user: str = "What is the capital of France?") -> None:
    client.chat.completions.create(
        model="default", max_tokens=4, temperature=0,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}])


def _browser(profile: Path):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={profile}", "--window-size=1280,860"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def _until(driver, check, seconds: float) -> float:
    started = time.monotonic()
    while True:
        try:
            if check(driver):
                return time.monotonic() - started
        except Exception:  # the element is not there yet
            pass
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not within {seconds} s: {driver.page_source[:3000]}")
        time.sleep(0.05)


def test_the_dashboard_shows_hits_misses_and_why(tmp_path, tiny_model):
    from selenium.webdriver.common.by import By

    (tmp_path / "server").mkdir()
    running = start_server(tmp_path / "server", tiny_model, "--api-key", KEY)
    driver = None
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key=KEY, max_retries=0)
        _ask(client, SYSTEM)  # a miss
        _ask(client, SYSTEM)  # a hit
        time.sleep(0.5)
        _ask(client, SYSTEM.replace("helpful", "careful"))  # a miss that parted at char 10

        driver = _browser(tmp_path / "profile")
        driver.get(running.url + "/")
        text = lambda id: driver.find_element(By.ID, id).text  # noqa: E731
        # With --api-key the page asks for the key, and keeps it in sessionStorage only.
        _until(driver, lambda d: d.find_element(By.ID, "key-form").is_displayed(), 10)
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
        _until(driver, lambda d: text("hits") == "1" and text("misses") == "2", 10)
        assert driver.execute_script("return sessionStorage.getItem('mlxc-api-key')") == KEY
        assert driver.execute_script("return localStorage.length") == 0
        assert text("hit-rate") == "33.3%"
        _until(driver, lambda d: "message 0 @ char 10" in text("misses-rows"), 5)
        rows = text("misses-rows")
        assert "(system)" in rows and "helpful" in rows and "careful" in rows
        assert int(text("tokens-memory")) > 0

        _ask(client, SYSTEM)  # another hit: on the page within 2 s
        took = _until(driver, lambda d: text("hits") == "2", 2.0)
        print(f"the page showed the new hit {took:.2f} s after it was answered")
        _ask(client, SYSTEM, user="Something else entirely, please.")  # a new miss row
        _until(driver, lambda d: text("misses") == "3", 2.0)
        time.sleep(1.2)  # one more poll, so the sparklines have two points
        SHOT.parent.mkdir(exist_ok=True)
        driver.save_screenshot(str(SHOT))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        if driver is not None:
            driver.quit()
        stop_server(running)
