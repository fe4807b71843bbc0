"""Flower apps of fl-imaging: a thin ServerApp and ClientApp wiring config, sites and tasks."""
