"""Inference: one image (or a folder) -> a reading: classification, suggested lesion
outline, heat maps, batch CSV, one-page report, model warm-up."""
