"""Every page each role opens, in Chromium at 1440 and 800 px: no exception box, no request to
another host, and a screenshot of each page in test-artifacts/walk/ to look at.

Skipped when Chromium or Playwright is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.e2e.test_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    PASSWORD,
    REPO,
    full_screenshot,
    running_app,
    settle,
    sync_api,
)

WALK = REPO / "test-artifacts" / "walk"
PAGES = {"admin": ["Diagnose", "Review cases", "Teaching", "Train", "Retrain", "Evaluate",
                   "Model registry", "Monitor", "Account"],
         "clinician": ["Diagnose", "Review cases", "Account"],
         "educator": ["Teaching", "Account"],
         "researcher": ["Train", "Retrain", "Evaluate", "Model registry", "Monitor",
                        "Account"]}


@pytest.fixture(scope="module")
def walk_data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("walk-data")


def seed_cases(data_dir: Path) -> None:
    """Cases for the pages to show: a study of two images to review (barely suspicious, so
    listed after any case a test adds) and a case a reviewer corrected."""
    import numpy as np

    from bus_core.clinic.cases import NewCase, StudyReadingRecord, open_store
    from tests.conftest import person, synthetic_image

    rng = np.random.default_rng(0)

    def reading(label: str, p_malignant: float) -> NewCase:
        image, mask = synthetic_image(label, rng)
        return NewCase(image=image, image_name=f"{label}.png", model_name="tiny",
                       model_hash="0" * 64, masks=[mask],
                       probabilities={"normal": 0.1, "benign": 0.9 - p_malignant,
                                      "malignant": p_malignant},
                       predicted_label="benign" if p_malignant < 0.5 else "malignant",
                       flagged=p_malignant >= 0.5)
    with open_store(data_dir) as store:
        store.save_study([reading("benign", 0.02), reading("benign", 0.01)], StudyReadingRecord(
            "least-normal", {"normal": 0.1, "benign": 0.88, "malignant": 0.02}, "benign", False,
            False), who=person("clinician"))
        corrected = store.add_case(reading("malignant", 0.6), who=person("clinician"))
        store.review_case(corrected.id, label="benign", who=person("admin"))


@pytest.fixture(scope="module")
def walk_server(tiny_model_dir, busi_dir, walk_data) -> Iterator[str]:
    userdata = walk_data
    for role in PAGES:
        subprocess.run([sys.executable, "-m", "bus_core", "users", "add", role, "--role", role,
                        "--password-stdin"], input=PASSWORD + "\n", text=True, check=True,
                       cwd=REPO, env={**os.environ, "BUS_DATA_DIR": str(userdata)}, timeout=120)
    seed_cases(userdata)
    env = {**os.environ, "BUS_MODEL": str(tiny_model_dir), "BUS_DATA_DIR": str(userdata),
           "BUS_DATASET": str(busi_dir)}
    with running_app(env, userdata / "streamlit.log") as url:
        yield url


@pytest.mark.parametrize("width", [1440, 800])
@pytest.mark.parametrize("role", list(PAGES))
def test_every_page_of_each_role_renders_without_an_error(walk_server, role, width):
    WALK.mkdir(parents=True, exist_ok=True)
    own_host = urlsplit(walk_server).netloc
    elsewhere: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": width, "height": 900})
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.on("request", lambda r: elsewhere.append(r.url) if urlsplit(r.url).netloc
                    not in (own_host, "") and not r.url.startswith("data:") else None)
            page.goto(walk_server)
            settle(page)
            full_screenshot(page, WALK / f"signin-{width}.png")
            page.get_by_label("Username", exact=True).fill(role)
            page.get_by_label("Password", exact=True).fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_text("Signed in as").first.wait_for()
            if width < 1024:  # a narrow window keeps most of its width for the page
                assert page.locator("[data-testid=stSidebar]").bounding_box()["width"] <= 200
            for title in PAGES[role]:
                page.locator(".st-key-app_navigation").get_by_text(title, exact=True).click()
                page.get_by_role("heading", name=title).first.wait_for()
                settle(page)
                assert not page.locator("[data-testid=stException]").count(), (role, title)
                assert "encountered an error" not in page.inner_text("body"), (role, title)
                full_screenshot(page, WALK / f"{role}-{width}-{title.replace(' ', '-')}.png")
                page.set_viewport_size({"width": width, "height": 900})
        finally:
            browser.close()
    assert not elsewhere, f"requests to other hosts: {sorted(set(elsewhere))[:5]}"


def test_a_key_press_reviews_the_case_and_opens_the_next(walk_server, walk_data):
    import numpy as np

    from bus_core.clinic.cases import open_store
    from tests.conftest import person, synthetic_image

    with open_store(walk_data) as store:
        saved = [store.save_case(synthetic_image("benign", np.random.default_rng(seed))[0],
                                 image_name="scan.png", masks=[], model_name="tiny",
                                 model_hash="0" * 64,
                                 probabilities={"benign": 0.9 - p, "malignant": p},
                                 predicted_label="benign", who=person("clinician"))
                 for seed, p in ((9, 0.3), (10, 0.1))]
    first, second = saved  # the first is the more suspicious: listed first
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1440, "height": 900}).new_page()
            page.set_default_timeout(60_000)
            page.goto(walk_server)
            page.get_by_label("Username", exact=True).fill("clinician")
            page.get_by_label("Password", exact=True).fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_text("Signed in as").first.wait_for()
            page.locator(".st-key-app_navigation").get_by_text("Review cases",
                                                               exact=True).click()
            page.get_by_role("heading", name="Review cases").first.wait_for()
            settle(page)
            full_screenshot(page, WALK / "review-worklist.png")
            selector = page.locator(".st-key-review_case")
            shown = ("e => e.textContent + ' ' + [...e.querySelectorAll('input')]"
                     ".map(i => i.value + ' ' + (i.placeholder || '')).join(' ')")
            assert f"Case {first.id}" in selector.evaluate(shown), selector.evaluate(shown)
            page.get_by_text("Status: to review").wait_for()
            page.get_by_role("heading", name="Review cases").first.click()  # off any field
            page.keyboard.press("3")  # malignant
            page.get_by_text(f"Case {first.id} corrected as malignant. Now case "
                             f"{second.id}.").wait_for()
            settle(page)
            full_screenshot(page, WALK / "review-after-a-key.png")
            assert f"Case {second.id}" in selector.evaluate(shown), selector.evaluate(shown)
            # typing in the notes does not label the case
            page.get_by_label("Notes").fill("1 small cyst, 2 views")
            settle(page)
            with open_store(walk_data) as store:
                assert store.get_case(second.id).status == "unreviewed"
                assert store.get_case(first.id).reviewer == "clinician"
        finally:
            browser.close()


@pytest.mark.parametrize("address", ["", "/review"])
def test_a_fresh_server_lists_no_page_files_before_signing_in(tiny_model_dir, tmp_path, address):
    """The first request of a fresh server (the app's address, or a bookmarked page): the
    sign-in form only, no sidebar list of the pages/ files; once signed in, the navigation of
    the user's roles."""
    env = {**os.environ, "BUS_MODEL": str(tiny_model_dir), "BUS_DATA_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "bus_core", "users", "add", "clinician", "--role",
                    "clinician", "--password-stdin"], input=PASSWORD + "\n", text=True,
                   check=True, cwd=REPO, env=env, timeout=120)
    with running_app(env, tmp_path / "streamlit.log") as url, \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1440, "height": 900}).new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{url}{address}")
            page.get_by_label("Username", exact=True).wait_for()
            settle(page)
            WALK.mkdir(parents=True, exist_ok=True)
            full_screenshot(page, WALK / f"signin-fresh{address.replace('/', '-')}.png")
            assert not page.locator(".st-key-app_navigation, [data-testid=stSidebarNav]").count()
            assert not page.locator("[data-testid=stSidebar]").get_by_text(
                "account", exact=True).count()
            page.get_by_label("Password", exact=True).fill(PASSWORD)
            page.get_by_label("Username", exact=True).fill("clinician")
            page.get_by_role("button", name="Sign in").click()
            nav = page.locator(".st-key-app_navigation")
            nav.get_by_text("Diagnose", exact=True).wait_for()
            assert not nav.get_by_text("Train", exact=True).count()
        finally:
            browser.close()
