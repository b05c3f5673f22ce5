"""A fresh server in Chromium: the model is prepared for this computer in the background, the
Diagnose page says how far that is, then reads an image. The test holds the OpenVINO cache's
lock file (as another process compiling would), so the preparation waits at its first network
for as long as the test needs to see the message."""

from __future__ import annotations

import os

import pytest

from bus_core.runtime.backends import LOCK_FILE
from tests.e2e.test_browser import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    add_user,
    running_app,
    sign_in,
    sync_api,
    upload_image,
)

pytest.importorskip("openvino")
fcntl = pytest.importorskip("fcntl")


def test_a_fresh_server_shows_the_preparation_then_reads(tiny_model_dir, tiny_segmenter_dir,
                                                         tmp_path):
    userdata = tmp_path / "userdata"
    cache = userdata / "cache" / "openvino"
    cache.mkdir(parents=True)
    env = {**os.environ, "BUS_MODEL": str(tiny_model_dir), "BUS_DATA_DIR": str(userdata),
           "BUS_SEGMENTER": str(tiny_segmenter_dir), "BUS_BACKEND": "openvino"}
    add_user(userdata, "clinician")
    with open(cache / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released below, once the message has been seen
        with running_app(env, tmp_path / "log.txt") as url, sync_api.sync_playwright() as p:
            chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = chromium.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(120_000)
            sign_in(page, url)
            page.get_by_text("Preparing the model for this computer: 0 of 2 networks").wait_for()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "diagnose-preparing.png"))
            fcntl.flock(lock, fcntl.LOCK_UN)
            page.get_by_text("Ultrasound images").first.wait_for()
            page.locator("input[type=file]").first.set_input_files(str(upload_image(tmp_path)))
            page.get_by_text("Model's reading").wait_for()
            # the backend is named under the folded "Model details"
            page.get_by_text("OpenVINO", exact=False).first.wait_for(state="attached")
            chromium.close()
