"""What an admin types into ``fl-imaging-deploy``: paths resolved against the folder the command
runs in, and checked before any process starts.

Flower's processes run inside their state folder, so a relative path handed on to them would
point elsewhere: every path is made absolute here, at parse time. Each check raises
:class:`InputError` with the flag, the path as typed, the absolute path and what to do, e.g.::

    --ca certs/ca.crt: no such file (/home/admin/certs/ca.crt). Give the CA certificate
    (ca.crt) the coordinator shared.

The checks read files the way Flower does (``cryptography``): a certificate is PEM X.509, a
SuperNode's private key is an OpenSSH EC key, a public key an OpenSSH EC public key.
"""

from __future__ import annotations

import datetime
import errno
import os
import socket
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "InputError",
    "absolute",
    "ca_certificate_file",
    "certificate_file",
    "existing_folder",
    "free_port_or_fail",
    "pem_private_key_file",
    "public_key_file",
    "readable_file",
    "reachable_or_fail",
    "site_private_key_file",
    "tls_verified_or_fail",
    "writable_folder",
]


class InputError(ValueError):
    """A path, file or port given on the command line that cannot work; the message names the
    flag, the value as typed (and its absolute path) and the fix."""


def absolute(typed: Path | str) -> Path:
    """``typed`` (``~`` expanded) as an absolute path against the current working directory,
    without following symbolic links."""
    return Path(os.path.abspath(Path(typed).expanduser()))


def _fail(flag: str, typed: Path | str, problem: str, fix: str) -> InputError:
    path = absolute(typed)
    shown = f"{typed}" if str(typed) == str(path) else f"{typed} ({path})"
    return InputError(f"{flag} {shown}: {problem}. {fix}")


def readable_file(flag: str, typed: Path | str, fix: str) -> Path:
    """The absolute path of ``typed`` when it is a file this user can read. Raises
    :class:`InputError` (``flag``, ``typed``, ``fix``) when it is missing, a folder or not
    readable."""
    path = absolute(typed)
    if path.is_dir():
        raise _fail(flag, typed, "is a folder, not a file", fix)
    if not path.is_file():
        raise _fail(flag, typed, "no such file", fix)
    if not os.access(path, os.R_OK):
        raise _fail(flag, typed, "this user cannot read it (permissions)", fix)
    return path


def _is_private_key(data: bytes) -> bool:
    """True when ``data`` is a private key (PEM or OpenSSH), in any algorithm."""
    for load in (serialization.load_pem_private_key, serialization.load_ssh_private_key):
        try:
            load(data, password=None)
            return True
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
    return b"PRIVATE KEY-----" in data


def certificate_file(flag: str, typed: Path | str, fix: str) -> Path:
    """The absolute path of ``typed`` when it holds a PEM X.509 certificate (``ca.crt``,
    ``server.pem``). Raises :class:`InputError` when it is missing, unreadable, a private or
    public key, or anything else."""
    path = readable_file(flag, typed, fix)
    data = path.read_bytes()
    try:
        x509.load_pem_x509_certificate(data)
        return path
    except ValueError:
        pass
    if _is_private_key(data):
        raise _fail(flag, typed, "is a private key, not a certificate", fix)
    if data.startswith((b"ecdsa-", b"ssh-")):
        raise _fail(flag, typed, "is a SuperNode's public key, not a certificate", fix)
    raise _fail(flag, typed, "is not a PEM certificate (no BEGIN CERTIFICATE block)", fix)


def ca_certificate_file(flag: str, typed: Path | str, fix: str) -> Path:
    """The absolute path of ``typed`` when it holds a CA's certificate (PEM X.509 with the
    basic constraint ``CA:TRUE``, as ``fl-imaging-deploy ca`` writes ``ca.crt``) that is valid
    now. Raises :class:`InputError` for what :func:`certificate_file` refuses, a certificate
    that is not a CA's (the SuperLink's own ``server.pem``), and one expired or not yet valid."""
    path = certificate_file(flag, typed, fix)
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise _fail(
            flag,
            typed,
            "is a certificate, but not a CA's (no basic constraint CA:TRUE: the SuperLink's own "
            "server.pem?), so it cannot verify the SuperLink",
            fix,
        )
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc < now:
        day = cert.not_valid_after_utc.date().isoformat()
        raise _fail(flag, typed, f"this CA certificate expired on {day}", fix)
    if cert.not_valid_before_utc > now:
        day = cert.not_valid_before_utc.isoformat(timespec="minutes")
        raise _fail(
            flag, typed, f"this CA certificate is valid only from {day} (check this clock)", fix
        )
    return path


def site_private_key_file(flag: str, typed: Path | str, fix: str) -> Path:
    """The absolute path of ``typed`` when it holds a SuperNode's private key as Flower reads
    it: OpenSSH format, elliptic curve (``fl-imaging-deploy site-key``, ``ssh-keygen -t ecdsa
    -b 384``). Raises :class:`InputError` for a certificate, a public key or anything else."""
    path = readable_file(flag, typed, fix)
    data = path.read_bytes()
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        if b"BEGIN CERTIFICATE" in data:
            raise _fail(flag, typed, "is a certificate, not a private key", fix) from None
        if data.startswith((b"ecdsa-", b"ssh-")):
            raise _fail(flag, typed, "is the public key (.pub), not the private key", fix) from None
        raise _fail(flag, typed, f"is not an OpenSSH private key ({err})", fix) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise _fail(flag, typed, f"is a {type(key).__name__}, not an elliptic-curve key", fix)
    return path


def pem_private_key_file(flag: str, typed: Path | str, fix: str) -> Path:
    """The absolute path of ``typed`` when it holds an unencrypted PEM private key (the
    SuperLink's ``server.key``). Raises :class:`InputError` otherwise."""
    path = readable_file(flag, typed, fix)
    try:
        serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise _fail(flag, typed, f"is not a PEM private key ({err})", fix) from None
    return path


def public_key_file(flag: str, typed: Path | str, fix: str) -> Path:
    """The absolute path of ``typed`` when it holds a SuperNode's public key as Flower
    registers it (OpenSSH, elliptic curve: ``NAME.pub``). Raises :class:`InputError` for a
    private key or anything else."""
    path = readable_file(flag, typed, fix)
    data = path.read_bytes()
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        if _is_private_key(data):
            raise _fail(flag, typed, "is a private key: send and register the .pub", fix) from None
        raise _fail(flag, typed, f"is not an OpenSSH public key ({err})", fix) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise _fail(flag, typed, f"is a {type(key).__name__}, not an elliptic-curve key", fix)
    return path


def existing_folder(flag: str, typed: Path | str, fix: str) -> Path:
    """The absolute path of ``typed`` when it is a folder this user can read. Raises
    :class:`InputError` when it is missing, a file or unreadable."""
    path = absolute(typed)
    if path.is_file():
        raise _fail(flag, typed, "is a file, not a folder", fix)
    if not path.is_dir():
        raise _fail(flag, typed, "no such folder", fix)
    if not os.access(path, os.R_OK | os.X_OK):
        raise _fail(flag, typed, "this user cannot read the folder (permissions)", fix)
    return path


def writable_folder(flag: str, typed: Path | str, fix: str) -> Path:
    """The absolute path of ``typed`` once it exists (created with its parents) and this user
    can write a file into it (a temporary file is written and removed). Raises
    :class:`InputError` when it is a file or cannot be created or written."""
    path = absolute(typed)
    if path.exists() and not path.is_dir():
        raise _fail(flag, typed, "is a file, not a folder", fix)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise _fail(flag, typed, f"cannot be written by this user ({err.strerror})", fix) from None
    return path


def free_port_or_fail(flag: str, host: str, port: int, fix: str) -> None:
    """Check that ``port`` on ``host`` can be listened on now (bind, then release). Raises
    :class:`InputError` naming ``flag`` when something listens there already or the port is
    not allowed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and gRPC do
        try:
            sock.bind((host or "0.0.0.0", port))
        except OSError as err:
            problem = (
                f"{host}:{port} is in use already (another program, or another SuperNode or "
                "SuperLink of this machine, listens there)"
                if err.errno == errno.EADDRINUSE
                else f"cannot listen on {host}:{port} ({err.strerror})"
            )
            raise InputError(f"{flag} {port}: {problem}. {fix}") from None


def reachable_or_fail(flag: str, address: str, fix: str, timeout: float = 5.0) -> None:
    """Check that something accepts TCP connections at ``address`` (``HOST:PORT``). Raises
    :class:`InputError` naming ``flag`` when the address is malformed or nothing answers
    within ``timeout`` seconds."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InputError(f"{flag} {address}: not HOST:PORT (e.g. 10.0.0.5:9093). {fix}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise InputError(
            f"{flag} {address}: the SuperLink does not answer ({reason}). {fix}"
        ) from None


def tls_verified_or_fail(
    flag: str, address: str, ca: Path, ca_typed: str, timeout: float = 5.0
) -> None:
    """Check that the server at ``address`` (``HOST:PORT``, reachable) completes a TLS
    handshake whose certificate the CA certificate ``ca`` (``--ca ca_typed``) verifies for
    ``HOST``, as a SuperNode's connection will (Python's ``ssl``, OpenSSL's verification).
    Raises :class:`InputError` naming ``flag``: a certificate another CA signed, one that does
    not list ``HOST``, a server that does not speak TLS or does not finish within ``timeout``
    seconds."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection((host, int(port)), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return
    except ssl.SSLCertVerificationError as err:
        reason = err.verify_message or str(err)
        if "mismatch" in reason:
            problem = (
                f"the SuperLink's certificate does not list the address {host} ({reason}). Ask "
                f"the coordinator to issue it again with `fl-imaging-deploy ca --out certs "
                f"--host {host} --force` (listing every address; a new CA, whose ca.crt every "
                "site then needs), or use an address it lists"
            )
        else:
            problem = (
                f"the SuperLink's certificate does not verify against --ca {ca_typed} "
                f"({reason}): that CA did not sign it. Ask the coordinator for the ca.crt in the "
                "folder their `fl-imaging-deploy superlink --certs` uses"
            )
    except ssl.SSLError as err:
        problem = (
            f"what answers there does not speak TLS ({err.reason or err}): a SuperLink started "
            "without TLS, or another service on that port. Check the address and port with "
            "the coordinator"
        )
    except (TimeoutError, OSError) as err:
        problem = (
            f"the TLS handshake did not finish ({err.strerror or type(err).__name__}): another "
            "service on that port, or the SuperLink is overloaded. Check the address and port"
        )
    raise InputError(f"{flag} {address}: {problem}.")
