"""Differential privacy: DP-SGD at a site, its ledger, and what a run's privacy report says."""
