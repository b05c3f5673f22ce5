"""Training: classifier and segmenter training, run folders, background jobs, grid
search, architecture comparison."""
