"""Models: the networks (classifier backbones, the lesion U-Net), checkpoints with their
model cards, and the registry of models on disk."""
