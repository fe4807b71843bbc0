"""The names homomorphic encryption adds to messages (no imports: both sides and the site's gate
read them)."""

__all__ = ["HE", "HE_SUM", "HE_UPDATE"]

#: The ConfigRecord of the coordinator's training message (and of a site's reply) about HE.
HE = "he"
#: The array of the global ArrayRecord holding the encrypted sum of the last round.
HE_SUM = "he.sum"
#: The array of a site's reply holding its encrypted weighted vector.
HE_UPDATE = "he.update"
