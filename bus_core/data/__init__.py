"""Data: image files -> arrays, records and manifests, leakage-safe splits, lesion masks,
what a model reads, preprocessing presets, augmentation and the training loader."""
