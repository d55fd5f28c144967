"""The core (layer 1): the objective registry and family, guidance, conditioning, models; imports only errors/env."""
