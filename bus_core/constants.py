"""Names and numbers shared by every module."""

CLASSES: tuple[str, ...] = ("normal", "benign", "malignant")
"""Class names in the order of model outputs."""

NORMAL = "normal"
MALIGNANT = "malignant"

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm",
                                   ".dicom")
