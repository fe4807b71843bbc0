"""Federated statistics of the sites' data before training (``fl-imaging-data stats``): the
request, a site's side (computed and released under its own policy), the coordinator's side
(collected and pooled) and the files they give."""
