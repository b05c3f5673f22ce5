"""Breast-ultrasound classifier: the Streamlit entry point (`streamlit run app.py`).

A thin UI over bus_core: this file only sets up navigation and the sidebar; each page lives in
pages/ and calls the library.
"""

import streamlit as st

from bus_core.settings import configure_logging
from ui.common import mark_entrypoint, render_sidebar

configure_logging()

st.set_page_config(page_title="Breast ultrasound classifier", page_icon=":material/radiology:",
                   layout="wide")

PAGES = {
    "Clinic": [
        st.Page("pages/diagnose.py", title="Diagnose", icon=":material/stethoscope:",
                default=True),
        st.Page("pages/review.py", title="Review cases", icon=":material/fact_check:"),
    ],
    "Learn": [
        st.Page("pages/teach.py", title="Teaching", icon=":material/school:"),
    ],
    "Models": [
        st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
        st.Page("pages/evaluate.py", title="Evaluate", icon=":material/analytics:"),
        st.Page("pages/models.py", title="Model registry", icon=":material/inventory_2:"),
    ],
}

mark_entrypoint()
navigation = st.navigation(PAGES)
render_sidebar()
navigation.run()
