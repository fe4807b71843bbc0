"""Deployment on real machines: certificates and site keys, the SuperLink and SuperNode processes,
and the ``fl-imaging-deploy`` command (coordinator, hospitals, and a local mode on loopback)."""
