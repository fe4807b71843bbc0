"""The coordinator's side of the Flower apps: ServerApp, rounds, checkpoints."""
