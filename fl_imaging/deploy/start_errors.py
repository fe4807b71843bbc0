"""Why a SuperLink or SuperNode did not start, read from Flower's log: its cause and its fix in
the admin's own words (the flags of ``fl-imaging-deploy``, the paths as typed).

Flower words one cause in several ways and several causes alike (exit code 305 means "no
connection to the SuperLink" for an unknown key, a wrong CA and a SuperLink that is down), so
each cause is recognised by the line that only it writes; the first rule of :data:`RULES` that
matches wins. Tests: ``tests/deploy/test_start_errors.py`` (one per cause, with Flower's lines).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RULES", "StartContext", "start_cause"]


@dataclass(frozen=True)
class StartContext:
    """What the admin gave the role that did not start, as typed (for the message): ``role``
    (``superlink`` or ``supernode``), its ``--port``, and for a SuperNode its ``--superlink``,
    ``--ca``, ``--key``; ``certs``: a SuperLink's ``--certs``; ``state``: its ``--state``."""

    role: str
    port: int
    superlink: str = ""
    ca: str = ""
    key: str = ""
    certs: str = ""
    state: str = ""

    @property
    def public_key(self) -> str:
        """The public key that goes with ``key`` (``keys/NAME.key`` -> ``keys/NAME.pub``)."""
        return re.sub(r"(\.key)?$", ".pub", self.key, count=1)


def _port(ctx: StartContext, _match: re.Match[str]) -> str:
    return (
        f"port {ctx.port} is in use already on this machine (another program, or another "
        f"SuperNode or SuperLink, listens there): give this {ctx.role} its own --port; two "
        "SuperNodes on one host each need their own --port"
    )


#: Flower's path flags -> ours.
_OUR_FLAG = {
    "--root-certificates": "--ca",
    "--auth-supernode-private-key": "--key",
    "--ssl-ca-certfile": "--certs (its ca.crt)",
    "--ssl-certfile": "--certs (its server.pem)",
    "--ssl-keyfile": "--certs (its server.key)",
}


def _missing_path(ctx: StartContext, match: re.Match[str]) -> str:
    ours = _OUR_FLAG.get(match.group(1), match.group(1))
    return (
        f"the file given as {ours} is gone (Flower found no file at its path): check that it "
        "exists and start again"
    )


def _ca_not_certificate(ctx: StartContext, _match: re.Match[str]) -> str:
    return (
        f"--ca {ctx.ca} is not a certificate (a key given as the CA?): give the coordinator's "
        "ca.crt"
    )


def _bad_key(ctx: StartContext, _match: re.Match[str]) -> str:
    return (
        f"--key {ctx.key} is not this site's private key (Flower cannot read it): give "
        "NAME.key from `fl-imaging-deploy site-key --name NAME`, not the .pub or a certificate"
    )


def _unregistered(ctx: StartContext, _match: re.Match[str]) -> str:
    return (
        f"the SuperLink at {ctx.superlink} refused this SuperNode: the public key of --key "
        f"{ctx.key} is not registered. Send {ctx.public_key} to the coordinator, who runs "
        f"`fl-imaging-deploy register {ctx.public_key} --superlink {ctx.superlink} --ca "
        "certs/ca.crt`. Right after a crash the SuperLink still counts the site as connected "
        "for up to 60 s: start again then, or give --rejoin-wait 90"
    )


def _address_not_in_certificate(ctx: StartContext, _match: re.Match[str]) -> str:
    host = ctx.superlink.rpartition(":")[0] or ctx.superlink
    return (
        f"the SuperLink's certificate does not list the address {host} of --superlink: ask the "
        f"coordinator to issue it again with `fl-imaging-deploy ca --out certs --host {host} "
        "--force` (listing every address; a new CA, whose ca.crt every site then needs), or "
        "use an address it lists"
    )


def _wrong_ca(ctx: StartContext, _match: re.Match[str]) -> str:
    return (
        f"the SuperLink's certificate does not verify against --ca {ctx.ca} (TLS handshake "
        "failed): that CA did not sign it. Ask the coordinator for the ca.crt in the folder "
        "their `fl-imaging-deploy superlink --certs` uses"
    )


def _state_not_writable(ctx: StartContext, _match: re.Match[str]) -> str:
    return (
        f"the --state folder {ctx.state} cannot be read or written by this user: give a "
        "folder this user owns"
    )


def _unreachable(ctx: StartContext, _match: re.Match[str]) -> str:
    return (
        f"the SuperLink at {ctx.superlink} does not answer: check that it runs "
        "(`fl-imaging-deploy superlink` on the coordinator), that the address and port are "
        "right and that a firewall lets this machine reach that port"
    )


#: (Flower's line, cause) in the order they are tried; a pattern names only its own cause.
RULES: list[tuple[re.Pattern[str], Callable[[StartContext, re.Match[str]], str]]] = [
    (re.compile(r"address already in use", re.I), _port),
    (re.compile(r"Path argument `(--[\w-]+)` does not point to a file"), _missing_path),
    (re.compile(r"cadata does not contain a certificate|no start line"), _ca_not_certificate),
    (re.compile(r"Unable to parse the private key file"), _bad_key),
    (re.compile(r"Failed to activate SuperNode"), _unregistered),
    (
        re.compile(r"CERTIFICATE_VERIFY_FAILED.*(mismatch|doesn't match)"),
        _address_not_in_certificate,
    ),
    (re.compile(r"CERTIFICATE_VERIFY_FAILED|SSL/TLS handshake error"), _wrong_ca),
    (
        re.compile(r"Failed to read SuperExec auth secret|\[Errno 13\] Permission denied"),
        _state_not_writable,
    ),
    (
        re.compile(r"Connection refused|Connection attempt failed|Name or service not known"),
        _unreachable,
    ),
]


def start_cause(log: str, ctx: StartContext) -> str | None:
    """The cause (with its fix) of a start that failed, from the end of Flower's ``log``, in
    the words of ``ctx``; None when the log names no cause known here."""
    for pattern, cause in RULES:
        match = pattern.search(log)
        if match:
            return cause(ctx, match)
    return None
