"""The private Flower home each of our ``flwr`` commands runs with: one SuperLink connection.

``flwr run`` (the deployment engine) and ``flwr supernode register`` (the coordinator) read the
SuperLink's address and CA certificate from ``$FLWR_HOME/config.toml``; we write one per use,
inside the run's or the SuperLink's folder, so that a user's own Flower settings are never read
or changed.
"""

from __future__ import annotations

import json
from pathlib import Path

from fl_imaging.config import ConfigError
from fl_imaging.deploy.processes import flower_env

__all__ = ["CONNECTION", "cli_home", "toml_string", "write_flower_home"]

#: Name of the SuperLink connection in the private Flower home.
CONNECTION = "fl-imaging"


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string (JSON's escapes are a subset of TOML's)."""
    return json.dumps(text, ensure_ascii=True)


def write_flower_home(home: Path, superlink: str, root_certificates: str | None) -> Path:
    """Write a private Flower home (``home/config.toml``) holding one SuperLink connection,
    ``fl-imaging``, set as default: ``superlink`` (host:port) with the CA certificate that
    signed its TLS certificate, or plain text when ``root_certificates`` is None (loopback
    trials only). Returns ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f"address = {toml_string(superlink)}",
    ]
    if root_certificates:
        ca = Path(root_certificates).expanduser().resolve()
        if not ca.is_file():
            raise ConfigError(
                f"engine.root_certificates={root_certificates}: no such file; give the CA "
                "certificate (ca.crt) the coordinator shared"
            )
        lines.append(f"root-certificates = {toml_string(str(ca))}")
    else:
        lines.append("insecure = true")
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    return home


def cli_home(home: Path, superlink: str, ca_cert: Path | None) -> dict[str, str]:
    """A private Flower home for the ``flwr`` command (one connection to ``superlink``) and the
    environment that uses it (``FLWR_HOME`` and ``HOME`` set to ``home``)."""
    write_flower_home(home, superlink, str(ca_cert) if ca_cert else None)
    return flower_env(home, {"HOME": str(home)})
