"""The shipped Streamlit settings (.streamlit/config.toml)."""

from __future__ import annotations

from pathlib import Path

import tomllib

CONFIG = Path(__file__).resolve().parents[1] / ".streamlit" / "config.toml"


def test_the_server_watches_no_files():
    """A deployed app's files do not change; watching them floods the log on busy machines."""
    assert tomllib.loads(CONFIG.read_text())["server"]["fileWatcherType"] == "none"


def test_no_page_file_list_before_signing_in():
    """Streamlit's own list of the pages/ files is off: only the navigation app.py builds for
    a signed-in user's roles is shown (the browser test checks a fresh server)."""
    assert tomllib.loads(CONFIG.read_text())["client"]["showSidebarNavigation"] is False
