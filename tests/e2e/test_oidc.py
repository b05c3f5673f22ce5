"""Single sign-on in a real browser: `st.login` against a local OpenID Connect provider.

The provider is `oidc-provider-mock`, started in a thread on a free port; it knows the user
`dr.oidc@example.org` with the claims email (verified) and roles = ["clinician", "educator"]
(the mock's authorization form only asks for the subject: claims are given to the mock
beforehand); the browser types that subject into the form. The app runs with a secrets file
in a temporary folder (config option secrets.files), never the project's .streamlit/.
Screenshots go to test-artifacts/ (git-ignored).
Skipped when Chromium, Playwright or oidc-provider-mock is missing.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_browser import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    REPO,
    full_screenshot,
    running_app,
    settle,
    sync_api,
)

oidc_provider_mock = pytest.importorskip("oidc_provider_mock")

SUBJECT = "dr.oidc@example.org"
CLAIMED_ROLES = ["clinician", "educator"]
OPENED_PAGES = ("Diagnose", "Review cases", "Teaching", "Account")
CLOSED_PAGES = ("Train", "Evaluate", "Model registry")


@pytest.fixture
def provider() -> Iterator[str]:
    """A running OpenID Connect provider that knows SUBJECT and its roles claim; its address."""
    user = oidc_provider_mock.User(sub=SUBJECT,
                                   claims={"email": SUBJECT, "email_verified": True,
                                           "roles": CLAIMED_ROLES})
    with oidc_provider_mock.run_server_in_thread(user_claims=[user]) as server:
        yield f"http://127.0.0.1:{server.server_port}"


def write_secrets(folder: Path, provider: str) -> Path:
    """A secrets.toml whose [auth] section makes `provider` the app's single sign-on."""
    path = folder / "secrets.toml"
    path.write_text(
        "[auth]\n"
        'redirect_uri = "http://127.0.0.1:{port}/oauth2callback"\n'  # Streamlit fills in {port}
        f'cookie_secret = "{secrets.token_hex(32)}"\n'
        'client_id = "bus-classifier"\n'
        f'client_secret = "{secrets.token_hex(16)}"\n'
        f'server_metadata_url = "{provider}/.well-known/openid-configuration"\n')
    return path


def account_log(data_dir: Path) -> str:
    """The account log as `python -m bus_core users log` prints it for `data_dir`."""
    return subprocess.run([sys.executable, "-m", "bus_core", "users", "log"], cwd=REPO,
                          env={**os.environ, "BUS_DATA_DIR": str(data_dir)}, text=True,
                          capture_output=True, check=True, timeout=120).stdout


@pytest.mark.timeout(420)
def test_single_sign_on_with_roles_from_the_claim(provider: str, tiny_model_dir: Path,
                                                  tmp_path: Path) -> None:
    """Sign in at the provider, come back with the claimed roles' pages, the sign-in logged;
    sign out through the provider's end-session page, back to the sign-in button."""
    data = tmp_path / "userdata"
    data.mkdir()
    env = {name: value for name, value in os.environ.items()
           if name not in ("BUS_AUTH", "BUS_ROLES_CLAIM")}
    env.update(BUS_DATA_DIR=str(data), BUS_MODEL=str(tiny_model_dir),
               STREAMLIT_SECRETS_FILES=str(write_secrets(tmp_path, provider)))
    with running_app(env, tmp_path / "streamlit.log") as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(url)
            page.get_by_role("button", name="Sign in with single sign-on").click()

            page.wait_for_url(f"{provider}/oauth2/authorize?**")
            page.get_by_placeholder("sub").fill(SUBJECT)
            page.get_by_role("button", name="Authorize", exact=True).click()

            sidebar = page.locator("[data-testid=stSidebar]")
            sidebar.get_by_text("Signed in as").wait_for()
            page.locator(".st-key-app_navigation").wait_for()
            settle(page)
            assert f"Signed in as {SUBJECT} (clinician, educator)" in sidebar.inner_text()
            navigation = page.locator(".st-key-app_navigation").inner_text()
            links = page.locator(".st-key-app_navigation [data-testid=stPageLink]")
            assert links.count() == len(OPENED_PAGES)
            for title in OPENED_PAGES:
                assert title in navigation
            for title in CLOSED_PAGES:
                assert title not in navigation
            assert page.locator("[data-testid=stException]").count() == 0
            log = account_log(data)
            assert f"{SUBJECT}: signed in {SUBJECT}  (single sign-on)" in log

            ARTIFACTS.mkdir(exist_ok=True)
            full_screenshot(page, ARTIFACTS / "oidc-signed-in-1440.png")
            page.set_viewport_size({"width": 800, "height": 900})
            full_screenshot(page, ARTIFACTS / "oidc-signed-in-800.png")

            page.set_viewport_size({"width": 1440, "height": 900})
            sidebar.get_by_role("button", name="Sign out").click()
            page.wait_for_url(f"{provider}/oauth2/end_session?**")
            page.get_by_role("button", name="End session").click()
            page.get_by_role("button", name="Sign in with single sign-on").wait_for()
            assert f"{SUBJECT}: signed out {SUBJECT}" in account_log(data)
        finally:
            browser.close()
