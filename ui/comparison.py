"""The Evaluate page's view of architecture comparison runs (`python -m bus_core compare`):
the results table and the models' malignant ROC curves side by side."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from bus_core.errors import BusError
from bus_core.training.architectures import find_comparisons, read_results
from ui.common import md_escape, show_error
from ui.evaluation import comparison_run_table, roc_comparison_figure

COMMAND = ("python -m bus_core compare --data $DATA/BUSI --split splits/busi.json "
           "--out runs/compare")


def settings_caption(settings: dict) -> str:
    """What every row of a comparison shared, in one line."""
    data = ", ".join(Path(s).name for s in settings.get("data") or [])
    return (f"Every row: {md_escape(data)}, test subset of "
            f"{md_escape(Path(str(settings.get('split'))).name)}, "
            f"epoch budget {settings.get('epochs')} (best validation "
            f"{settings.get('monitor')} kept), balance {settings.get('balance')}, batch "
            f"{settings.get('batch_size')}, lr {settings.get('lr')}, seed {settings.get('seed')}. "
            "Threshold chosen on "
            f"validation for malignant sensitivity >= {settings.get('target_sensitivity')}; "
            "the diamonds mark where it operates on test.")


def architecture_comparison(chart_config: dict) -> None:
    """Pick a comparison run found under runs/; show its table and ROC curves."""
    st.markdown("#### Architecture comparison runs")
    folders = find_comparisons()
    if not folders:
        st.caption(f"No comparison run yet. `{COMMAND}` trains DenseNet121, VGG16, ResNet50 "
                   "and InceptionV3 (AdamW, RMSprop) alike on one split; its results appear "
                   "here.")
        return
    folder = st.selectbox("Comparison run", folders, key="eval_compare_run",
                          format_func=lambda p: f"{p.parent.name}/{p.name}")
    try:
        results = read_results(folder)
    except BusError as exc:
        show_error(exc)
        return
    rows = results["rows"]
    if not rows:
        st.info("This comparison has no finished row yet.", icon=":material/hourglass_top:")
        return
    st.caption(settings_caption(results.get("settings") or {}))
    st.dataframe(comparison_run_table(rows), hide_index=True, width="stretch",
                 column_config={"row": st.column_config.TextColumn(pinned=True)})
    st.plotly_chart(roc_comparison_figure(rows), config=chart_config, key="eval_compare_roc")
