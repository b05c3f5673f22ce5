"""Evaluation: scoring a model on records (figures, intervals, two-stage policy)."""
