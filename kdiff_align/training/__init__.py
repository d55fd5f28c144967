"""Training (layer 6): the engine, LR schedulers, teachers, the k-diffusion trainer and the one training CLI."""
