"""Homomorphic encryption of the updates (CKKS, TenSEAL): the arithmetic, the coordinator's side
and a site's side."""
