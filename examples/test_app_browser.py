"""End-to-end test of examples/app.py in headless Chromium: load the bundled example, segment, see the overlay.

Run by `.ci/browser.sh`, which installs what it needs; by hand:

    apt-get install -y chromium chromium-driver fonts-wqy-microhei
    pip install -e ".[app,dev]" "selenium>=4.40,<5"
    python -m pytest examples/test_app_browser.py -q -p no:cacheprovider

It serves the model shipped in the package (the page's default) on 127.0.0.1. With DEMO_PAGE_SCREENSHOT=PATH it
also saves its screenshot of the page there (the README's is docs/images/demo-page.png).
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

APP = Path(__file__).parent / "app.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(APP), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={"GRADIO_ANALYTICS_ENABLED": "False",
                                                              "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"app exited: {process.stdout.read().decode()[-2000:]}")
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("app did not start within 120 s")
    yield url
    process.kill()


@pytest.fixture
def browser(tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("headless Chromium is needed: apt-get install chromium chromium-driver (see .ci/browser.sh)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1280,1000"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver)
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def test_page_segments_the_bundled_example(server, browser, tmp_path):
    browser.get(server)
    wait = WebDriverWait(browser, 60)
    example = wait.until(EC.element_to_be_clickable((By.XPATH, "//tr[.//td[normalize-space()='red circle']]")))
    example.click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image img"))
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea").get_attribute("value") == "red circle")
    browser.find_element(By.ID, "segment-button").click()
    overlay = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#overlay img"))
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", overlay))
    width = browser.execute_script("return arguments[0].naturalWidth", overlay)
    wait.until(lambda d: "red circle" in d.find_element(By.ID, "summary").text)
    summary = browser.find_element(By.ID, "summary").text
    browser.save_screenshot(str(tmp_path / "page.png"))
    if os.environ.get("DEMO_PAGE_SCREENSHOT"):
        browser.save_screenshot(os.environ["DEMO_PAGE_SCREENSHOT"])
    example_width = Image.open(Path(__file__).parent / "assets" / "shapes.png").width
    assert width == example_width  # the overlay keeps the example image's width, with the caption band below
    assert "px" in summary and "presence score" in summary

    prompt = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")  # Enter in the box segments too
    prompt.clear()
    prompt.send_keys("左边的红色圆圈\n")  # any script reaches the model and the caption
    wait.until(lambda d: "左边的红色圆圈" in d.find_element(By.ID, "summary").text)

    prompt.clear()  # Markdown and HTML in the prompt, and the warning's "<unk>", show as written
    prompt.send_keys("*red* <b>circle</b>\n")
    wait.until(lambda d: "*red* <b>circle</b>" in d.find_element(By.ID, "summary").text)
    summary = browser.find_element(By.ID, "summary").text
    assert "it reads them as <unk>, so" in summary and not browser.find_elements(By.CSS_SELECTOR, "#summary b")
