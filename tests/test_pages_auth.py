"""Signing in to the app (AppTest): the first-admin screen, the sign-in form, expiry, demo
mode, the navigation each role sees, and the Account page."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from bus_core.clinic.accounts import Accounts
from bus_core.clinic.cases import open_store
from bus_core.db import default_db_path
from bus_core.roles import operator
from tests.conftest import signed_in_app, texts
from ui.common import SESSION_KEY

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PASSWORD = "a long enough password"
EVERY_PAGE = ("diagnose", "review", "teach", "train", "retrain", "evaluate", "models",
              "monitor", "account")


@pytest.fixture(autouse=True)
def data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.delenv("BUS_AUTH", raising=False)


def add_user(name: str, *roles: str, password: str | None = PASSWORD) -> None:
    with open_store(default_db_path()) as store:
        Accounts(store).add(operator(), name, roles, password)


def account_log() -> list[tuple[str, str]]:
    with open_store(default_db_path()) as store:
        return [(e["action"], e["subject"]) for e in Accounts(store).log()]


TITLES = {"diagnose": "Diagnose", "review": "Review cases", "teach": "Teaching",
          "train": "Train", "retrain": "Retrain", "evaluate": "Evaluate",
          "models": "Model registry",
          "monitor": "Monitor",
          "account": "Account"}
"""Page -> its title, in the order of the sidebar's page list."""


def pages_of(at: AppTest) -> set[str]:
    """The pages the navigation offers (those AppTest can switch to)."""
    found = set()
    for page in EVERY_PAGE:
        try:
            at.switch_page(f"pages/{page}.py")
        except ValueError:
            continue
        found.add(page)
    return found


def test_no_user_yet_shows_how_to_create_the_first_admin():
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert "Create the first administrator" in texts(at)
    assert "python -m bus_core users add admin --role admin" in texts(at)
    assert not at.text_input  # no form, no page


def test_sign_in_form_refuses_a_wrong_password_and_signs_in_with_the_right_one():
    add_user("ann", "clinician")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert [t.label for t in at.text_input] == ["Username", "Password"]
    at.text_input[0].input("ann")
    at.text_input[1].input("wrong password")
    at.button[0].click().run()  # the form's "Sign in"
    assert "Wrong username or password." in texts(at)
    assert SESSION_KEY not in at.session_state
    at.text_input[0].input("ann")
    at.text_input[1].input(PASSWORD)
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Signed in as **ann** (clinician)" in texts(at)
    assert account_log()[:2] == [("signed in", "ann"), ("sign-in failed", "ann")]
    at.button(key="sign_out").click().run()
    assert [t.label for t in at.text_input] == ["Username", "Password"]
    assert account_log()[0] == ("signed out", "ann")


def test_an_idle_session_ends_and_a_disabled_user_is_signed_out():
    at = signed_in_app("clinician", name="ann").run()
    session = at.session_state[SESSION_KEY]
    session.last_seen -= timedelta(hours=2)
    at.session_state[SESSION_KEY] = session
    at.run()
    assert "without activity" in texts(at) and SESSION_KEY not in at.session_state
    assert account_log()[0] == ("session expired", "ann")

    at = signed_in_app("clinician", name="bob").run()
    with open_store(default_db_path()) as store:
        Accounts(store).set_disabled(operator(), "bob")
    at.run()
    assert "disabled or removed" in texts(at)


@pytest.mark.parametrize("roles, pages", [
    (("clinician",), {"diagnose", "review", "account"}),
    (("educator",), {"teach", "account"}),
    (("researcher",), {"train", "retrain", "evaluate", "models", "monitor", "account"}),
    (("clinician", "educator"), {"diagnose", "review", "teach", "account"}),
    (("admin",), set(EVERY_PAGE)),
])
def test_each_role_sees_its_pages(roles, pages):
    at = signed_in_app(*roles).run()
    assert not at.exception, [e.value for e in at.exception]
    assert pages_of(at) == pages
    links = [link.proto.label for link in at.sidebar.get("page_link")]
    assert links == [title for page, title in TITLES.items() if page in pages]


def test_review_page_tabs_and_model_buttons_follow_the_roles(tiny_model_dir):
    at = signed_in_app("clinician", name="clin").run()
    at.switch_page("pages/review.py").run()
    assert [t.label for t in at.tabs] == ["Cases", "Export"]
    assert "The cases you saved" in texts(at)
    at = signed_in_app("researcher", name="res").run()
    at.switch_page("pages/models.py").run()
    assert all(b.disabled for b in at.button if b.label == "Make active")
    assert not [b for b in at.button if b.label == "Delete"]
    assert at.get("file_uploader")  # a researcher may upload a model


def test_demo_mode_opens_diagnose_and_teaching_only_and_saves_nothing(monkeypatch):
    monkeypatch.setenv("BUS_AUTH", "demo")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert texts(at).count("Demo mode") == 1  # one banner, not one per call of the gate
    assert pages_of(at) == {"diagnose", "teach"}
    assert not default_db_path().exists()  # not even an empty case database


def test_account_page_changes_the_own_password_and_admins_manage_users():
    add_user("ann", "clinician")
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.text_input[0].input("ann")
    at.text_input[1].input(PASSWORD)
    at.button[0].click().run()
    at.switch_page("pages/account.py").run()
    assert "Users" not in [s.value for s in at.subheader]  # not an admin
    fields = {t.label: t for t in at.text_input}
    fields["Current password"].input(PASSWORD)
    fields["New password (at least 10 characters)"].input("my new password")
    fields["New password again"].input("my new password")
    next(b for b in at.button if b.label == "Change password").click().run()
    assert "Your password was changed." in texts(at)
    with open_store(default_db_path()) as store:
        assert Accounts(store).sign_in("ann", "my new password").name == "ann"

    at = signed_in_app("admin", name="root").run()
    at.switch_page("pages/account.py").run()
    assert "Users" in [s.value for s in at.subheader]
    fields = {t.label: t for t in at.text_input}
    fields["New user's name"].input("ed")
    at.multiselect[0].set_value(["educator"])
    next(b for b in at.button if b.label == "Add user").click().run()
    assert not at.exception, [e.value for e in at.exception]
    with open_store(default_db_path()) as store:
        assert Accounts(store).get("ed").roles == {"educator"}


def sso_app(monkeypatch, claims: dict) -> AppTest:
    """The app in single-sign-on mode, its browser signed in at the provider with `claims`."""
    monkeypatch.setenv("BUS_AUTH", "oidc")
    at = AppTest.from_file(APP, default_timeout=60)
    at.user = {"is_logged_in": True, **claims}
    return at


def test_single_sign_on_roles_come_from_the_claim_or_the_local_table(monkeypatch):
    at = AppTest.from_file(APP, default_timeout=60)
    monkeypatch.setenv("BUS_AUTH", "oidc")
    at.user = {"is_logged_in": False}
    at.run()
    assert [b.label for b in at.button] == ["Sign in with single sign-on"]

    at = sso_app(monkeypatch, {"sub": "s1", "email": "dr.c@example.org",
                               "roles": ["clinician", "not-a-role"]}).run()
    assert not at.exception, [e.value for e in at.exception]
    assert pages_of(at) == {"diagnose", "review", "account"}
    assert ("signed in", "dr.c@example.org") in account_log()

    add_user("dr.t@example.org", "educator", password=None)
    at = sso_app(monkeypatch, {"sub": "s2", "email": "dr.t@example.org"}).run()
    assert pages_of(at) == {"teach", "account"}

    at = sso_app(monkeypatch, {"sub": "s3", "email": "nobody@example.org"}).run()
    assert "no role in this app yet" in texts(at)
    assert not at.title and not at.get("file_uploader")  # no page ran


def test_single_sign_on_ignores_an_unverified_email_and_obeys_disabling(monkeypatch):
    add_user("boss@example.org", "admin", password=None)
    at = sso_app(monkeypatch, {"sub": "x1", "email": "boss@example.org",
                               "email_verified": False}).run()
    assert "no role in this app yet" in texts(at)  # not the admin's row
    assert not at.title

    add_user("dr@example.org", "clinician", password=None)
    at = sso_app(monkeypatch, {"sub": "s", "email": "dr@example.org",
                               "roles": ["clinician"]}).run()
    assert "diagnose" in pages_of(at)
    with open_store(default_db_path()) as store:
        Accounts(store).set_disabled(operator(), "dr@example.org")
    at.run()
    assert "disabled in this app" in texts(at) and not at.title


def test_the_only_admin_cannot_remove_their_own_admin_role_on_the_account_page():
    at = signed_in_app("admin", name="root").run()
    at.switch_page("pages/account.py").run()
    at.selectbox(key="account_user").set_value("root").run()
    at.multiselect(key="account_roles_root").set_value(["clinician"])
    at.button(key="account_save_roles").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "only active administrator" in " ".join(e.value for e in at.error)
    with open_store(default_db_path()) as store:
        assert Accounts(store).get("root").roles == {"admin"}


def test_a_page_the_role_does_not_open_is_said_to_be_unavailable():
    from ui.auth import AFTER_SIGN_IN_KEY

    at = signed_in_app("clinician", name="clin")
    at.session_state[AFTER_SIGN_IN_KEY] = "train"  # the address named Train at sign-in
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Train is not available for your role" in " ".join(w.value for w in at.warning)


@pytest.mark.slow
def test_every_button_of_every_page_runs_without_a_crash_for_each_role(tiny_model_dir,
                                                                        monkeypatch):
    """Click each button each role sees on each page it opens: no exception anywhere."""
    monkeypatch.setenv("BUS_MODEL", str(tiny_model_dir))
    for role in ("clinician", "educator", "researcher", "admin"):
        at = signed_in_app(role, name=role).run()
        for page in sorted(pages_of(at)):
            at.switch_page(f"pages/{page}.py").run()
            assert not at.exception, (role, page, [e.value for e in at.exception])
            keys = [b.key for b in at.button if b.key and not b.disabled]
            for key in keys:
                at.switch_page(f"pages/{page}.py").run()
                try:
                    button = at.button(key=key)
                except KeyError:
                    continue  # gone after an earlier click
                if button.disabled:
                    continue
                button.click().run()
                assert not at.exception, (role, page, key, [e.value for e in at.exception])
