"""The Demo-Chat page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by selenium, against the app served on a free local port.

Missing tools skip the test with the reason; under ``CI`` they fail it, naming what is missing.
``VISIONZIP_APP_SCREENSHOT=docs/app.png`` also writes the README's screenshot there.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
from pathlib import Path

import pytest

# gradio's queue trips pandas deprecation warnings that say nothing about this page
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
# ten (row, col) patches of the 24 x 24 grid, spread over the image
PATCHES = [(2, 3), (3, 15), (5, 10), (8, 20), (10, 7), (12, 12), (15, 5), (18, 18), (20, 2), (22, 22)]


def _missing() -> list[str]:
    missing = [
        f"python package {name} (pip install -e '.[browser]')"
        for name in ("gradio", "selenium")
        if importlib.util.find_spec(name) is None
    ]
    if not any(shutil.which(name) for name in CHROMIUM):
        missing.append("a chromium executable (apt-get install chromium)")
    if not shutil.which("chromedriver"):
        missing.append("chromedriver (apt-get install chromium-driver)")
    return missing


@pytest.fixture(scope="module")
def tools():
    missing = _missing()
    if missing and os.environ.get("CI"):
        pytest.fail(f"the browser test cannot run, missing: {'; '.join(missing)}", pytrace=False)
    if missing:
        pytest.skip(f"missing: {'; '.join(missing)}")


@pytest.fixture(scope="module")
def served(tools):
    """The page on a free port, its model, and what the LLM received at each prefill."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from visionzip_eval.demos.app import build_app
    from visionzip_eval.synth.benchmark import build_docs
    from visionzip_eval.synth.scenes import render
    from visionzip_eval.synth.weights import load_trained as load_tiny_llava_synth

    model, processor = load_tiny_llava_synth()
    _, scenes = build_docs("pope", n_scenes=2)
    image = render(scenes[0])[0]
    received, tower_calls = [], []

    def record(module, args, kwargs):
        input_ids = kwargs.get("input_ids")
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if input_ids is not None and encoded is not None:
            placeholders = int((input_ids == model.config.image_token_id).sum())
            received.append((placeholders, sum(len(rows) for rows in encoded.pooler_output)))

    hooks = [
        model.model.register_forward_pre_hook(record, with_kwargs=True),
        model.model.vision_tower.register_forward_pre_hook(lambda *_: tower_calls.append(1)),
    ]
    page = build_app(model, processor, examples=[image])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "model": model, "processor": processor, "image": image,
               "received": received, "tower_calls": tower_calls}
    finally:
        page.close()
        for hook in hooks:
            hook.remove()


@pytest.fixture(scope="module")
def browser(tools):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = next(shutil.which(name) for name in CHROMIUM if shutil.which(name))
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1700"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def _wait_text(driver, selector: str, pattern: str, timeout: float = 60) -> re.Match:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    found = {}

    def check(_):
        text = driver.find_element(By.CSS_SELECTOR, selector).text
        found["text"], found["match"] = text, re.search(pattern, text)
        return found["match"]

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(check)
    except TimeoutException:
        raise AssertionError(f"{selector} never showed /{pattern}/; it shows {found.get('text')!r}") from None


def _click_patch(driver, row: int, col: int, grid=(24, 24)) -> None:
    """Click the centre of a patch of the grid picture (drawn object-fit: contain)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def loaded(_):  # the picture is replaced after every click: wait for the new one
        picture = driver.find_element(By.CSS_SELECTOR, "#grid img")
        box = driver.execute_script(
            "const i = arguments[0], r = i.getBoundingClientRect();"
            "return i.complete && i.naturalWidth ? [r.width, r.height, i.naturalWidth, i.naturalHeight] : null;",
            picture)
        return box and (picture, box)

    picture, (width, height, natural_w, natural_h) = WebDriverWait(driver, 30, poll_frequency=0.05).until(loaded)
    scale = min(width / natural_w, height / natural_h)
    x = (width - natural_w * scale) / 2 + (col + 0.5) * natural_w / grid[1] * scale
    y = (height - natural_h * scale) / 2 + (row + 0.5) * natural_h / grid[0] * scale
    ActionChains(driver).move_to_element_with_offset(picture, int(x - width / 2), int(y - height / 2)).click().perform()


def test_choosing_ten_patches_sends_exactly_those_and_answers_as_the_python_api(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from visionzip_eval.demos.app import DEFAULT_QUESTION as QUESTION
    from visionzip_eval.demos.chat import ChosenTokens, answer
    from visionzip_eval.methods.base import NoReduction

    driver = browser
    driver.get(served["url"])
    upload = tmp_path / "scene.png"
    served["image"].save(upload)
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
    driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(upload))
    # a new image starts from VisionZip's selection at 64: 53 patches + CLS + 10 contextual
    _wait_text(driver, "#selection", r"53 of 576 patches chosen\*?\*? \+ CLS \+ 10 contextual → 64 visual tokens")

    driver.find_element(By.CSS_SELECTOR, "#none").click()
    _wait_text(driver, "#selection", r"^0 of 576 patches chosen")
    number = driver.find_element(By.CSS_SELECTOR, "#contextual input")
    number.send_keys(Keys.CONTROL, "a")
    number.send_keys("0", Keys.TAB)
    _wait_text(driver, "#selection", r"^0 of 576 patches chosen \+ CLS → 1 visual tokens")
    for count, (row, col) in enumerate(PATCHES, start=1):
        _click_patch(driver, row, col)
        _wait_text(driver, "#selection", rf"^{count} of 576 patches chosen")
    _wait_text(driver, "#selection", r"^10 of 576 patches chosen \+ CLS → 11 visual tokens")
    expected = sorted(row * 24 + col for row, col in PATCHES)
    shown = driver.find_element(By.CSS_SELECTOR, "#indices textarea").get_attribute("value")
    assert [int(i) for i in shown.split(",")] == expected

    question = driver.find_element(By.CSS_SELECTOR, "#question textarea")
    assert question.get_attribute("value") == QUESTION
    driver.find_element(By.CSS_SELECTOR, "#side_by_side input").click()  # also answer with all tokens
    calls_before, received_before = len(served["tower_calls"]), len(served["received"])
    driver.find_element(By.CSS_SELECTOR, "#send").click()
    shown = _wait_text(
        driver, "#received",
        r"chosen tokens: (\d+) visual tokens reached the LLM · prefill [\d.]+ ms · turn 1: tower ran.*\n*"
        r".*all tokens: (\d+) visual tokens reached the LLM · prefill [\d.]+ ms · turn 1: tower ran",
    )
    page_answer = driver.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value")
    page_answer_full = driver.find_element(By.CSS_SELECTOR, "#answer_full textarea").get_attribute("value")
    driver.save_screenshot(str(tmp_path / "app.png"))
    if os.environ.get("VISIONZIP_APP_SCREENSHOT"):
        driver.save_screenshot(os.environ["VISIONZIP_APP_SCREENSHOT"])

    # exactly the 10 patches + CLS reached the LLM: the page's count, the prompt's placeholders
    # and the rows scattered into them; beside it, all 576
    assert (int(shown[1]), int(shown[2])) == (11, 576)
    assert served["received"][received_before:] == [(11, 11), (576, 576)]
    assert len(served["tower_calls"]) == calls_before + 2  # one encode each
    model, processor, image = served["model"], served["processor"], served["image"]
    chosen = ChosenTokens(patches=tuple(expected), cls=True)
    assert page_answer == answer(model, processor, image, chosen, QUESTION)
    assert page_answer_full == answer(model, processor, image, NoReduction(), QUESTION)
    # the tiny model sees the red circle with every token, not through these ten patches
    assert (page_answer, page_answer_full) == ("no", "yes")

    # a second turn reuses both conversations' tokens: the tower does not run again
    calls_before = len(served["tower_calls"])
    question.send_keys(Keys.CONTROL, "a")
    question.send_keys("How many shapes are in the image? Answer the question using a single word or phrase.")
    driver.find_element(By.CSS_SELECTOR, "#send").click()
    _wait_text(driver, "#received", r"chosen tokens: 11 visual tokens reached the LLM · prefill [\d.]+ ms · "
               r"turn 2: reused from turn 1(.|\n)*all tokens: 576 .* turn 2: reused from turn 1")
    assert len(served["tower_calls"]) == calls_before
    assert served["received"][-2:] == [(11, 11), (576, 576)]
    assert Path(tmp_path / "app.png").stat().st_size > 10_000

    # a rectangle: two corner clicks choose the patches between them
    driver.find_element(By.CSS_SELECTOR, "#none").click()
    _wait_text(driver, "#selection", r"^0 of 576 patches chosen")
    driver.find_element(By.XPATH, "//*[@id='mode']//label[contains(., 'rectangle')]").click()
    _click_patch(driver, 4, 6)
    _click_patch(driver, 5, 8)
    _wait_text(driver, "#selection", r"^6 of 576 patches chosen \+ CLS → 7 visual tokens")
    shown = driver.find_element(By.CSS_SELECTOR, "#indices textarea").get_attribute("value")
    assert shown == "102, 103, 104, 126, 127, 128"

    driver.find_element(By.CSS_SELECTOR, "#invert").click()
    _wait_text(driver, "#selection", r"^570 of 576 patches chosen \+ CLS → 571 visual tokens")
    driver.find_element(By.CSS_SELECTOR, "#all").click()
    _wait_text(driver, "#selection", r"^576 of 576 patches chosen")
    driver.find_element(By.CSS_SELECTOR, "#visionzip").click()
    _wait_text(driver, "#selection", r"^53 of 576 patches chosen \+ CLS \+ 10 contextual → 64 visual tokens")

    # the redundancy tab draws the uploaded image's tower
    driver.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Redundancy view')]").click()
    driver.find_element(By.CSS_SELECTOR, "#redundancy").click()
    _wait_text(driver, "#redundancy_summary", r"At the feature layer \(layer 3 of 4\) the top 54 of 576 patches hold")
