"""The app in a real browser: `streamlit run app.py` driven by Playwright and Debian's Chromium.

Screenshots go to test-artifacts/ (git-ignored); the README's picture is made by
scripts/readme_screenshot.py, not by a test.
Every test signs in with a user it creates through the command line (`users add`).
Skipped when Chromium or Playwright is missing.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import free_port, stop_process, synthetic_image

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

if not CHROMIUM.exists():
    pytest.skip("Chromium is not installed at /usr/bin/chromium", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


USER, PASSWORD = "browser-tester", "a password for the browser test"


def add_user(data_dir: Path, *roles: str) -> None:
    """Create the test's user in `data_dir` with the command line, as an administrator would."""
    subprocess.run([sys.executable, "-m", "bus_core", "users", "add", USER, "--password-stdin",
                    *(arg for role in roles or ("admin",) for arg in ("--role", role))],
                   input=PASSWORD + "\n", text=True, check=True, cwd=REPO,
                   env={**os.environ, "BUS_DATA_DIR": str(data_dir)}, timeout=120)


def sign_in(page, url: str) -> None:
    """Open `url` and sign in through the form's "Username", "Password" and "Sign in"."""
    page.goto(url)
    page.get_by_label("Username", exact=True).fill(USER)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text("Signed in as").first.wait_for()


def wait_until_healthy(url: str, server: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"streamlit did not answer at {url} within {timeout} s")


@pytest.fixture(scope="module")
def userdata(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("userdata")


@pytest.fixture(scope="module")
def everywhere_segmenter(tmp_path_factory) -> Path:
    """A segmentation model that outlines the whole image (its output layer says 'lesion'
    everywhere), so the page always has a suggestion to edit."""
    import torch

    from bus_core.models.build import save_model
    from bus_core.models.card import ModelCard
    from bus_core.models.unet import SEG_ARCH, DenseNetUNet

    net = DenseNetUNet()
    with torch.no_grad():
        net.decoder.head.weight.zero_()
        net.decoder.head.bias.fill_(6.0)
    card = ModelCard(name="everywhere-seg", arch=SEG_ARCH, task="segmentation",
                     classes=["lesion"], input_size={"resize": 64, "crop": 64, "fit": "pad"},
                     postprocess={"threshold": 0.5, "min_area": 0.0, "fill_holes": True})
    return save_model(net, card, tmp_path_factory.mktemp("seg") / "everywhere")


@contextlib.contextmanager
def running_app(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """`streamlit run app.py` on a free port with `env`; yields its address."""
    port = free_port()
    log = open(log_path, "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1",
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
        yield url
    finally:
        stop_process(process)
        log.seek(0)
        print(log.read()[-4000:])
        log.close()


@pytest.fixture(scope="module")
def server(tiny_model_dir, busi_dir, userdata, everywhere_segmenter) -> Iterator[str]:
    env = {**os.environ, "BUS_MODEL": str(tiny_model_dir),
           "BUS_DATA_DIR": str(userdata), "BUS_DATASET": str(busi_dir),
           "BUS_SEGMENTER": str(everywhere_segmenter)}
    add_user(userdata)
    with running_app(env, userdata / "streamlit.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser(server) -> Iterator:
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 1000},
                                  device_scale_factor=1)
    tab = context.new_page()
    tab.set_default_timeout(60_000)
    yield tab
    context.close()


def upload_image(tmp_path: Path) -> Path:
    image, _ = synthetic_image("malignant", np.random.default_rng(3), size=(360, 480))
    path = tmp_path / "ultrasound.png"
    Image.fromarray(image).save(path)
    return path


def wait_for_images(page, at_least: int) -> None:
    page.wait_for_function(
        "n => { const imgs = [...document.querySelectorAll('[data-testid=stMain] img')];"
        " return imgs.length >= n && imgs.every(i => i.complete && i.naturalWidth > 0); }",
        arg=at_least)


def settle(page) -> None:
    """Wait until the app has finished its script run (no stale or running elements, none
    still loading)."""
    page.wait_for_function(
        "() => !document.querySelector('[data-stale=true], [data-testid=stMain] "
        "[data-testid=stSpinner], [data-testid=stSkeleton]') && !/Running/i.test("
        "document.querySelector('[data-testid=stStatusWidget]')?.innerText || '')")
    page.wait_for_timeout(1000)


def full_screenshot(page, path: Path) -> None:
    """The whole page: Streamlit scrolls inside its main block, so the viewport is grown to fit
    it first."""
    height = page.evaluate(
        "() => Math.max(...[...document.querySelectorAll('[data-testid=stMain], "
        "[data-testid=stMainBlockContainer]')].map(e => e.scrollHeight))")
    page.set_viewport_size({"width": page.viewport_size["width"], "height": max(height, 800)})
    settle(page)
    page.screenshot(path=str(path), full_page=True)


def test_diagnose_in_a_browser(page, server, tmp_path):
    sign_in(page, server)
    page.get_by_text("Ultrasound images").first.wait_for()
    page.locator("input[type=file]").first.set_input_files(str(upload_image(tmp_path)))
    page.get_by_text("Model's reading").wait_for()
    page.get_by_text("Grad-CAM for", exact=False).first.wait_for()
    wait_for_images(page, 3)
    page.get_by_role("button", name="Report (PNG)").wait_for()
    settle(page)
    ARTIFACTS.mkdir(exist_ok=True)
    full_screenshot(page, ARTIFACTS / "diagnose.png")


@pytest.mark.parametrize("width", [1440, 800])
def test_three_images_read_as_one_study_in_a_browser(browser, server, tmp_path, width):
    """Three images of one lesion: one study reading, its PDF, saved as one study."""
    rng = np.random.default_rng(width)
    paths = []
    for i in range(3):
        image, _ = synthetic_image("malignant", rng, size=(360, 480))
        paths.append(tmp_path / f"view-{i + 1}.png")
        Image.fromarray(image).save(paths[-1])
    context = browser.new_context(viewport={"width": width, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(60_000)
        sign_in(page, server)
        page.locator("input[type=file]").first.set_input_files([str(p) for p in paths])
        page.get_by_role("heading", name="As one study").wait_for()
        page.get_by_role("button", name="Study report (PDF)").wait_for()
        page.get_by_role("button", name="Save as one study (3 cases)").click()
        page.get_by_text("Saved as study").first.wait_for()
        settle(page)
        assert not page.locator("[data-testid=stException]").count()
        ARTIFACTS.mkdir(exist_ok=True)
        full_screenshot(page, ARTIFACTS / f"study-{width}.png")
    finally:
        context.close()


def test_corrupt_file_gets_a_message_in_a_browser(page, server, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    sign_in(page, server)
    page.locator("input[type=file]").first.set_input_files(str(bad))
    page.get_by_text("'x.png' is not an image file we can read").wait_for()
    settle(page)
    ARTIFACTS.mkdir(exist_ok=True)
    assert page.locator("[data-testid=stException]").count() == 0
    full_screenshot(page, ARTIFACTS / "diagnose-error.png")


def test_teaching_in_a_browser(page, server):
    sign_in(page, f"{server}/teach")
    page.get_by_text("Your reading").wait_for()
    wait_for_images(page, 1)
    page.get_by_text("Benign", exact=True).first.click()
    page.get_by_role("button", name="Check").click()
    page.get_by_text("Next case").wait_for()
    page.get_by_text("Grad-CAM for", exact=False).first.wait_for()
    wait_for_images(page, 3)
    settle(page)
    full_screenshot(page, ARTIFACTS / "teach.png")
    assert page.get_by_text("1 / 1").count() + page.get_by_text("0 / 1").count() >= 1


def draw(page, canvas, points: list[tuple[float, float]]) -> None:
    """Drag the mouse through `points` (fractions of the canvas size). A rerun may replace the
    canvas between finding it and measuring it: the locator then finds the new one."""
    box = None
    for _ in range(5):
        canvas.wait_for(state="visible")
        box = canvas.bounding_box()
        if box is not None:
            break
    assert box is not None, "the canvas kept going away before it could be drawn on"
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for x, y in xy[1:]:
        page.mouse.move(x, y, steps=4)
    page.mouse.up()


def open_canvas(page, server, tmp_path):
    """Sign in, read an uploaded image, and open the painting canvas; its locator, once the
    canvas has the page's width (the first one drawn is the small one, replaced as soon as the
    browser has told the page its width)."""
    sign_in(page, server)
    page.locator("input[type=file]").first.set_input_files(str(upload_image(tmp_path)))
    page.get_by_text("Model's reading").wait_for()
    page.get_by_text("Paint", exact=True).click()
    page.get_by_text("Brush size").wait_for()
    canvas = page.locator("canvas").last
    canvas.wait_for()
    sync_api.expect(canvas).not_to_have_attribute("width", "440", timeout=60_000)
    return canvas


def draw_until_read(page, points: list[tuple[float, float]], tries: int = 3) -> None:
    """Draw `points` on the canvas until the page shows the masked crop it made: a stroke on a
    canvas that is being replaced (a rerun drawing it again) is lost, so it is drawn again on
    the new one, at most `tries` times."""
    for _ in range(tries):
        settle(page)
        draw(page, page.locator("canvas").last, points)
        try:
            page.get_by_text("Masked crop").wait_for(timeout=20_000)
            return
        except sync_api.TimeoutError:
            continue
    raise AssertionError(f"no masked crop after drawing {tries} times")


def edit_suggestion(page, points: list[tuple[float, float]], tries: int = 3) -> None:
    """Erase `points` from the suggested outline (Edit, Eraser) and accept it, until the page
    says the outline has the edits: a stroke on a canvas that is being replaced is lost, so it
    is drawn again, at most `tries` times."""
    for _ in range(tries):
        page.get_by_text("Edit", exact=True).click()
        page.get_by_text("Brush size").wait_for()
        page.get_by_text("Eraser", exact=True).click()
        settle(page)
        draw(page, page.locator("canvas").last, points)
        settle(page)
        page.get_by_text("Accept", exact=True).click()
        try:
            page.get_by_text("with your edits", exact=False).wait_for(timeout=20_000)
            return
        except sync_api.TimeoutError:
            continue
    raise AssertionError(f"the outline has no edits after drawing {tries} times")


def test_paint_a_mask_in_a_browser(page, server, tmp_path):
    open_canvas(page, server, tmp_path)
    ring = [(0.5 + 0.12 * np.cos(a), 0.55 + 0.15 * np.sin(a)) for a in np.linspace(0, 6.3, 24)]
    draw_until_read(page, ring)
    page.get_by_role("button", name="Report (PNG)").wait_for()
    settle(page)
    full_screenshot(page, ARTIFACTS / "diagnose-paint.png")
    page.get_by_role("button", name="Clear").click()
    page.get_by_text("Masked crop").wait_for(state="detached")


def test_suggest_edit_and_predict_in_a_browser(page, server, tmp_path, userdata):
    from bus_core.clinic.cases import open_store

    sign_in(page, server)
    page.locator("input[type=file]").first.set_input_files(str(upload_image(tmp_path)))
    page.get_by_text("Model's reading").wait_for()
    page.get_by_text("Suggest outline", exact=True).click()
    page.get_by_text("Automatic outline by everywhere-seg", exact=False).wait_for()
    edit_suggestion(page, [(0.05, 0.1 + 0.04 * i) for i in range(3)] + [(0.95, 0.2), (0.95, 0.3)])
    page.get_by_text("Masked crop").first.wait_for()
    page.get_by_text("Model's reading").first.wait_for()
    settle(page)
    full_screenshot(page, ARTIFACTS / "diagnose-suggest-edit.png")
    page.get_by_role("button", name="Save as case").click()
    page.get_by_text("Saved as case", exact=False).wait_for()
    with open_store(userdata) as store:
        (case,) = [c for c in store.list_cases() if c.mask_source]
    assert case.mask_source == "suggested, edited"


def test_a_bookmarked_page_opens_inside_the_app_after_a_server_start(browser, tiny_model_dir,
                                                                     tmp_path):
    """The first request of a fresh server names a page: it still runs through app.py (page
    set-up, navigation, sidebar), not as a file on its own."""
    env = {**os.environ, "BUS_MODEL": str(tiny_model_dir), "BUS_DATA_DIR": str(tmp_path)}
    add_user(tmp_path)
    with running_app(env, tmp_path / "streamlit.log") as url:
        context = browser.new_context(viewport={"width": 1440, "height": 900})
        tab = context.new_page()
        tab.set_default_timeout(60_000)
        sign_in(tab, f"{url}/review")
        tab.get_by_text("Review cases").first.wait_for()
        tab.get_by_text("Model in use", exact=False).first.wait_for()
        settle(tab)
        sidebar = tab.locator("[data-testid=stSidebar]").inner_text()
        assert "Clinic" in sidebar and "Teaching" in sidebar and "review\n" not in sidebar
        context.close()


@pytest.mark.parametrize("width", [1440, 800])
def test_the_canvas_fits_the_window(browser, server, tmp_path, width):
    """By default the canvas is as wide as the page allows: clearly wider than the small one
    at 1440 px, inside the page at 800 px."""
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        canvas = open_canvas(page, server, tmp_path)
        settle(page)
        canvas = canvas.bounding_box()
        main = page.locator("[data-testid=stMainBlockContainer]").bounding_box()
        full_screenshot(page, ARTIFACTS / f"canvas-{width}.png")
        assert canvas["x"] + canvas["width"] <= main["x"] + main["width"] + 1, (canvas, main)
        if width == 1440:
            assert canvas["width"] >= 700, canvas
    finally:
        context.close()
