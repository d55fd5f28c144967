"""Storage (layer 4): checkpoints and the export metadata."""
