"""Scoring models at the sites: the test round, cross-site evaluation, contributions."""
