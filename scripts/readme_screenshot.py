"""Retake the README's picture of the Diagnose page (docs/diagnose.png).

    .venv/bin/python scripts/readme_screenshot.py [--model FOLDER] [--out docs/diagnose.png]

Makes a synthetic ultrasound-like image (speckle, a dark irregular mass with an acoustic shadow
below it; not a patient's image), starts the app on a new, temporary data folder with the
bundled models (or `--model`), signs in as a clinician made for the purpose, uploads the image on
the Diagnose page, waits for the reading with the suggested outline and its Grad-CAM, and saves
the whole page at 1440 px. Needs Chromium at /usr/bin/chromium and Playwright (both installed by
`requirements-dev.txt` and `.ci/run`).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import sync_playwright
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
USER, PASSWORD = "readme", "a picture for the readme"


def synthetic_scan(seed: int = 7, size: tuple[int, int] = (440, 560)) -> np.ndarray:
    """A grey ultrasound-like picture: layered speckle, brighter near the probe, a dark mass with
    an irregular, angular margin in the middle and the acoustic shadow it casts below it."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w].astype(float)
    tissue = 105 * np.exp(-yy / (1.8 * h)) + 22 * np.sin(yy / 31.0 + np.sin(xx / 90.0)) ** 2
    speckle = ndimage.gaussian_filter(rng.rayleigh(1.0, size), sigma=(0.8, 2.2))
    speckle /= speckle.mean()
    cy, cx, r = 0.42 * h, 0.5 * w, 0.12 * h
    angle = np.arctan2(yy - cy, xx - cx)
    edge = r * (1 + 0.14 * np.sin(5 * angle) + 0.07 * np.sin(9 * angle + 1.0))
    distance = np.hypot((yy - cy) * 1.3, xx - cx)
    mass = distance < edge
    below = np.clip((yy - cy) / (0.15 * h), 0, 1)
    shadow = 1 - 0.6 * below * np.exp(-((xx - cx) / r) ** 4)
    image = tissue * speckle * shadow
    image[mass] = 24 * speckle[mass]
    return np.clip(ndimage.gaussian_filter(image, 0.6), 0, 255).astype(np.uint8)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(url: str, process: subprocess.Popen, timeout_s: float = 180) -> None:
    """Wait for the server's health check (or its end)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("The app stopped before it was ready.")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit("The app did not start in time.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the bundled default)")
    parser.add_argument("--out", default=str(REPO / "docs" / "diagnose.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        scan = folder / "synthetic-scan.png"
        Image.fromarray(synthetic_scan()).save(scan)
        env = {**os.environ, "BUS_DATA_DIR": str(folder / "data")}
        if args.model:
            env["BUS_MODEL"] = str(Path(args.model).resolve())
        subprocess.run([sys.executable, "-m", "bus_core", "users", "add", USER, "--role",
                        "clinician", "--password-stdin"], input=PASSWORD + "\n", text=True,
                       check=True, cwd=REPO, env=env, capture_output=True)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with open(folder / "app.log", "w") as log:
            app = subprocess.Popen(
                [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                 "--server.port", str(port), "--server.address", "127.0.0.1",
                 "--browser.gatherUsageStats", "false"], cwd=REPO, env=env, stdout=log,
                stderr=subprocess.STDOUT)
            try:
                wait_until_up(url, app)
                shoot(url, scan, Path(args.out))
            finally:
                app.terminate()
                app.wait(timeout=30)
    print(f"Saved {args.out}")
    return 0


def shoot(url: str, scan: Path, out: Path) -> None:
    """Sign in, read `scan` on the Diagnose page and save the whole page to `out`."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_context(viewport={"width": 1440, "height": 900}).new_page()
            page.set_default_timeout(180_000)
            page.goto(url)
            page.get_by_label("Username", exact=True).fill(USER)
            page.get_by_label("Password", exact=True).fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_text("Ultrasound images").first.wait_for()
            page.locator("input[type=file]").first.set_input_files(str(scan))
            page.get_by_text("Grad-CAM for", exact=False).first.wait_for()
            page.get_by_role("button", name="Report (PNG)").wait_for()
            page.wait_for_function(  # every image drawn, the script run over
                "() => [...document.querySelectorAll('[data-testid=stMain] img')]"
                ".every(i => i.complete && i.naturalWidth > 0) && !document.querySelector("
                "'[data-stale=true], [data-testid=stMain] [data-testid=stSpinner]')")
            height = page.evaluate("() => document.querySelector('[data-testid=stMain]')"
                                   ".scrollHeight")
            page.set_viewport_size({"width": 1440, "height": max(900, height)})
            page.wait_for_timeout(500)  # the resized page redrawn
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


if __name__ == "__main__":
    raise SystemExit(main())
