"""Engines that run a federation: Flower's simulation engine (and, later, a real deployment)."""
