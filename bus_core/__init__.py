"""bus_core: breast-ultrasound classification library, one package per concern (data, models,
runtime, inference, evaluation, training, clinic, integrations, cli) over a few shared modules
at the root; ARCHITECTURE.md gives the layering. It never imports Streamlit; the app is a thin
UI over it."""

from bus_core.constants import CLASSES

__version__ = "0.1.0"
__all__ = ["CLASSES", "__version__"]
