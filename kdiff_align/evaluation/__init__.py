"""Evaluation (layer 7): metric sweeps, the metrics, plots and the tilted-target analysis."""
