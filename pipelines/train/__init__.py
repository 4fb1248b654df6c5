"""Training on Ray Train: one runner (runner.py) and one small file per model."""
