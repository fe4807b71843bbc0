"""Hydra configuration tree of fl-imaging (shipped as package data; groups mirror the code)."""
