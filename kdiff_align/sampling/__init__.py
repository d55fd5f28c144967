"""Sampling (layer 5): guided sampling from a checkpoint or export, grids, NFE counting, autoguidance."""
