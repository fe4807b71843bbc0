"""Secure aggregation: its arithmetic, the coordinator's side and a site's side."""
