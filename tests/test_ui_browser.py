"""The `sage finetune ui` page in headless Chromium (Selenium, Debian's chromium and
chromium-driver): the task list, a task created through the form with its preview, a run
started from the page with its step counter moving and its loss curve drawn, the eval report.
Screenshots go to ``$SAGE_UI_SCREENSHOTS`` (relative to the repository) when set (``make
screenshots``: docs/img)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import write_data
from ui_server import UiServer

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium "
        "chromium-driver; `make test` installs them as root)",
        allow_module_level=True,
    )
pytest.importorskip("selenium", reason="needs selenium (the test extra)")
pytest.importorskip("fastapi")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

#: Generous: the machine may be busy; nothing here is a timing assertion.
WAIT = 240


@pytest.fixture
def browser(tmp_path: Path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def screenshot(driver, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    target = os.environ.get("SAGE_UI_SCREENSHOTS")
    if target:
        folder = REPO / target  # relative: to the repository (tests run in a tmp folder)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)


def test_the_page_creates_a_task_runs_it_and_draws_the_curve(
    browser, make_prepared_task, tmp_path: Path, tiny_model_dir: Path
) -> None:
    existing = make_prepared_task("numbers")
    root = existing.parent
    server = UiServer(root)
    wait = WebDriverWait(browser, WAIT)
    try:
        browser.get(server.base + "/")
        row = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "tr[data-task=numbers]")))
        assert "prepared" in row.text

        # a new task through the form: an uploaded file, previewed, created
        browser.get(server.base + "/#/new")
        data = write_data(tmp_path / "words.jsonl", count=24)
        wait.until(ec.visibility_of_element_located((By.ID, "data-file"))).send_keys(str(data))
        browser.find_element(By.ID, "task-name").send_keys("words")
        Select(browser.find_element(By.ID, "task-type")).select_by_value("instruction")
        browser.find_element(By.ID, "model").send_keys(str(tiny_model_dir))
        browser.find_element(By.ID, "max-length").send_keys("64")
        browser.find_element(By.ID, "preview-btn").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#preview .sample .trained")))
        assert "The number 0 is written zero." in browser.find_element(By.ID, "preview").text
        screenshot(browser, tmp_path, "ui-new-task")
        browser.find_element(By.ID, "create-btn").click()
        wait.until(ec.url_contains("#/task/words"))
        wait.until(ec.text_to_be_present_in_element((By.ID, "task-title"), "words"))
        assert (root / "words" / "finetune_meta.json").is_file()
        wait.until(ec.text_to_be_present_in_element((By.ID, "memory"), "fits"))

        # a run from the page: the step counter moves, the curve is drawn
        browser.find_element(By.ID, "run-max-steps").send_keys("3000")
        browser.find_element(By.ID, "run-btn").click()
        wait.until(lambda d: _step(d) >= 5)
        first = _step(browser)
        wait.until(lambda d: _step(d) > first)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#curve polyline.series")))
        points = browser.find_element(By.CSS_SELECTOR, "#curve polyline[data-series=loss]")
        assert len(points.get_attribute("points").split()) >= 2
        assert browser.find_element(By.ID, "eta").text != "-"
        screenshot(browser, tmp_path, "ui-task-training")

        # refused while it trains: the same one line as the API's
        browser.find_element(By.ID, "run-btn").click()
        error = wait.until(ec.visibility_of_element_located((By.ID, "error")))
        assert error.text.startswith("Task 'words' is busy: its run")

        # the list, live: the running task's step of max steps
        browser.find_element(By.ID, "nav-tasks").click()
        words = (By.CSS_SELECTOR, "tr[data-task=words]")
        wait.until(ec.text_to_be_present_in_element(words, "/3000"))
        assert "training" in browser.find_element(*words).text
        screenshot(browser, tmp_path, "ui-tasks")

        browser.find_element(*words).click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "task-title"), "words"))
        browser.find_element(By.ID, "cancel-btn").click()
        status = (By.ID, "task-status")
        wait.until(ec.text_to_be_present_in_element(status, "interrupted · run interrupted"))

        # resumed to a near end, evaluated, and both models asked the same question
        stopped = _step(browser)
        steps = browser.find_element(By.ID, "run-max-steps")
        steps.clear()
        steps.send_keys(str(stopped + 2))
        browser.find_element(By.ID, "resume-btn").click()
        wait.until(ec.text_to_be_present_in_element(status, "trained · run done"))
        browser.find_element(By.ID, "eval-btn").click()
        wait.until(ec.text_to_be_present_in_element(status, "eval done"))
        wait.until(ec.presence_of_element_located((By.ID, "eval-table")))
        assert "ROUGE-L" in browser.find_element(By.ID, "eval-table").text
        browser.find_element(By.ID, "chat-prompt").send_keys("Write the number 7 as a word.")
        browser.find_element(By.ID, "chat-btn").click()
        for pane in ("chat-tuned", "chat-base"):
            wait.until(lambda d, pane=pane: d.find_element(By.ID, pane).text.strip())
        browser.set_window_size(1400, 1800)
        browser.execute_script("document.getElementById('eval-report').scrollIntoView()")
        screenshot(browser, tmp_path, "ui-eval-chat")
    finally:
        server.stop()


def _step(driver) -> int:
    text = driver.find_element(By.ID, "step").text
    return int(text.split("/")[0]) if text[:1].isdigit() else -1
