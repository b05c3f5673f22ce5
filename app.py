"""Breast-ultrasound classifier: the Streamlit entry point (`streamlit run app.py`).

A thin UI over bus_core: this file only signs the user in, sets up the navigation their roles
allow and the sidebar; each page lives in pages/ and calls the library.
"""

import streamlit as st

from bus_core.settings import configure_logging
from ui.auth import may_open, open_requested_page, require_signed_in, show_who
from ui.common import (
    APP_TITLE,
    app_icon,
    mark_entrypoint,
    narrow_window_layout,
    render_sidebar,
    sidebar_navigation,
    start_warmup,
)

configure_logging()

st.set_page_config(page_title=APP_TITLE, page_icon=app_icon(), layout="wide")
narrow_window_layout()

PAGES = {
    "Clinic": [("diagnose", "Diagnose", ":material/stethoscope:"),
               ("review", "Review cases", ":material/fact_check:")],
    "Learn": [("teach", "Teaching", ":material/school:")],
    "Models": [("train", "Train", ":material/model_training:"),
               ("retrain", "Retrain", ":material/published_with_changes:"),
               ("evaluate", "Evaluate", ":material/analytics:"),
               ("models", "Model registry", ":material/inventory_2:"),
               ("monitor", "Monitor", ":material/monitoring:")],
    "You": [("account", "Account", ":material/account_circle:")],
}
# Section -> (page in pages/, title, icon); who may open which: ui.auth.PAGE_ACTIONS.

mark_entrypoint()
start_warmup()  # the active model gets ready while the user signs in
who = require_signed_in()
allowed = {section: [page for page in pages if may_open(who, page[0])]
           for section, pages in PAGES.items()}
first = next(name for pages in allowed.values() for name, _, _ in pages)
sections = {section: [st.Page(f"pages/{name}.py", title=title, icon=icon,
                              default=name == first) for name, title, icon in pages]
            for section, pages in allowed.items() if pages}
navigation = st.navigation(sections, position="hidden")
sidebar_navigation(sections)
open_requested_page(who, {name: title for pages in PAGES.values()
                                for name, title, _ in pages})
show_who(who)
render_sidebar()
navigation.run()
