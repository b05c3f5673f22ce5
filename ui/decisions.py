"""The model decision log as shown on the Review and Model registry pages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from bus_core.clinic.cases import display_time

ACTION_LABELS = {"activated": "activated", "overridden": "activated by override",
                 "blocked": "blocked by the gate", "rejected": "rejected",
                 "rolled back": "rolled back", "made active": "made active by hand"}


def decisions_table(log: list[dict[str, Any]], key: str) -> None:
    """Every model decision of `log`, newest first (who, when, which model, why)."""
    if not log:
        st.caption("No model decision recorded yet.")
        return
    st.dataframe(pd.DataFrame([{
        "When": display_time(e["time"]), "Decision": ACTION_LABELS.get(e["action"], e["action"]),
        "Who": e["who"], "Model": Path(e["candidate"] or "").name,
        "Previously active": Path(e["active"] or "").name or "–",
        "Gate": {True: "passed", False: "failed"}.get(e.get("passed"), "–"),
        "Reason": e.get("override_reason") or ""} for e in reversed(log)]),
        hide_index=True, width="stretch", key=key)
