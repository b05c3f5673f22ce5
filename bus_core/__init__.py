"""bus_core: breast-ultrasound classification library (data, splits, masks, models, training,
evaluation, Grad-CAM, storage). It never imports Streamlit; the app is a thin UI over it."""

from bus_core.constants import CLASSES

__version__ = "0.1.0"
__all__ = ["CLASSES", "__version__"]
