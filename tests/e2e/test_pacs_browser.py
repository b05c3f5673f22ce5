""""Open from PACS" and "Send to PACS" on the Diagnose page in Chromium, with the local test
Orthanc (tests/orthanc.py) as the archive. Screenshots at 1440 and 800 px go to
test-artifacts/."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from bus_core.integrations.pacs.client import Pacs
from bus_core.integrations.pacs.endpoints import PASSWORD_ENV, URL_ENV, USER_ENV
from tests.e2e.test_browser import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    add_user,
    full_screenshot,
    running_app,
    settle,
    sign_in,
    sync_api,
)
from tests.orthanc import PATIENT_NAME, USER, orthanc_fixture, us_study  # noqa: F401


@pytest.fixture(scope="module")
def pacs_app(orthanc, tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    """The app with the test Orthanc as its PACS, holding one ultrasound study."""
    userdata = tmp_path_factory.mktemp("pacs-userdata")
    study = us_study(accession="ACC-BROWSER")
    Pacs(orthanc.endpoint).store(study, str(study[0].StudyInstanceUID))
    env = {**os.environ, "BUS_MODEL": str(tiny_model_dir), "BUS_DATA_DIR": str(userdata),
           URL_ENV: orthanc.endpoint.url, USER_ENV: USER,
           PASSWORD_ENV: orthanc.endpoint.password or ""}
    add_user(userdata, "clinician")
    with running_app(env, userdata / "streamlit-pacs.log") as url:
        yield url


@pytest.mark.parametrize("width", [1440, 800])
def test_open_from_pacs_and_send_back(pacs_app, width) -> None:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 1000})
            page.set_default_timeout(60_000)
            sign_in(page, pacs_app)
            page.get_by_text("Open from PACS").first.wait_for()
            page.get_by_label("Accession number").fill("ACC-BROWSER")
            page.get_by_role("button", name="Search").click()
            settle(page)
            page.get_by_text("Series 2").first.wait_for()
            assert PATIENT_NAME not in page.content() and "Doe" not in page.content()
            page.get_by_text("Image 1 (3 frames)").first.click()
            page.get_by_text("Image 1", exact=True).first.click()
            settle(page)
            ARTIFACTS.mkdir(exist_ok=True)
            full_screenshot(page, ARTIFACTS / f"pacs-open-{width}.png")
            page.get_by_role("button", name="Open 2 selected").click()
            settle(page)
            page.get_by_text("2 images opened from the PACS").wait_for()
            page.get_by_role("button", name="Send to PACS").first.click()
            page.get_by_text("sent to the PACS").first.wait_for()
            assert "Traceback" not in page.content()
            settle(page)
            full_screenshot(page, ARTIFACTS / f"pacs-sent-{width}.png")
        finally:
            browser.close()
