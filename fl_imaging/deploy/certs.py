"""TLS certificates for the SuperLink and authentication keys for the SuperNodes.

The coordinator makes a private certificate authority (``ca.crt``, ``ca.key``) and with it the
SuperLink's server certificate (``server.pem``, ``server.key``), whose subject alternative names
list every address the SuperNodes and researchers use to reach it (IP addresses and DNS names;
``127.0.0.1`` and ``localhost`` are always added, since Flower's own helper processes connect to
the SuperLink on loopback). Hospitals receive ``ca.crt`` only.

Each hospital makes its SuperNode key pair (ECDSA P-384 in OpenSSH format, as
``ssh-keygen -t ecdsa -b 384`` writes it) and hands over the public key only; the coordinator
registers it with ``flwr supernode register``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "ALWAYS_IN_SAN",
    "CertError",
    "ServerCertificate",
    "SiteKey",
    "make_ca",
    "make_server_certificate",
    "make_site_key",
    "split_san",
    "verify_server_certificate",
]

#: Names always put into the server certificate: Flower's helper processes (the SuperExec that
#: starts each ServerApp) connect to the SuperLink through loopback.
ALWAYS_IN_SAN = ("127.0.0.1", "localhost")
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"


class CertError(ValueError):
    """A certificate or key that cannot be made or used; the message says what to do."""


@dataclass(frozen=True)
class ServerCertificate:
    """Files of the SuperLink's TLS identity: CA certificate, server certificate and key."""

    ca_cert: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class SiteKey:
    """A SuperNode's key pair: ``private`` stays at the hospital, ``public`` is registered."""

    private: Path
    public: Path


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    """Write ``data`` to ``path``; secrets are created readable by their owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if secret:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(path, 0o600)
    else:
        path.write_bytes(data)


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise CertError(
            f"{', '.join(existing)} already exist(s): keep them, or pass --force to replace "
            "them (every certificate or registration made from the old files stops working)"
        )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(
    out_dir: Path, *, name: str = "fl-imaging CA", days: int = 3650, force: bool = False
) -> tuple[Path, Path]:
    """Create a certificate authority in ``out_dir``: ``ca.crt`` (to share with every site and
    researcher) and ``ca.key`` (secret, mode 0600). Returns (certificate, key) paths.

    The key is ECDSA P-384; the certificate is valid for ``days`` days. Raises
    :class:`CertError` when the files exist and ``force`` is False.
    """
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    _refuse_overwrite([cert_path, key_path], force)
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    _write(key_path, _key_pem(key), secret=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), secret=False)
    return cert_path, key_path


IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def split_san(names: list[str]) -> tuple[list[IP], list[str]]:
    """Split host names into IP addresses and DNS names (``ALWAYS_IN_SAN`` added, duplicates
    dropped, order kept). Raises :class:`CertError` for an empty or malformed name."""
    ips: list[IP] = []
    dns: list[str] = []
    for raw in [*names, *ALWAYS_IN_SAN]:
        name = raw.strip().strip("[]")
        malformed = any(c in name for c in " /:@") and not _is_ip(name)
        if not name or malformed:
            raise CertError(
                f"{raw!r} is not a host name or IP address: give the SuperLink's address "
                "without port or scheme, e.g. --host 10.0.0.5 --host superlink.hospital.org"
            )
        if _is_ip(name):
            ip = ipaddress.ip_address(name)
            if ip not in ips:
                ips.append(ip)
        elif name.lower() not in dns:
            dns.append(name.lower())
    return ips, dns


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def make_server_certificate(
    ca_dir: Path,
    out_dir: Path,
    hosts: list[str],
    *,
    days: int = 825,
    force: bool = False,
) -> ServerCertificate:
    """Issue the SuperLink's certificate with the CA in ``ca_dir`` (``ca.crt``, ``ca.key``).

    ``hosts`` are the IP addresses and DNS names by which SuperNodes and researchers reach the
    SuperLink; each goes into the certificate's subject alternative names (a TLS client refuses
    a server whose address is not listed there), with ``127.0.0.1`` and ``localhost``. Writes
    ``server.pem`` and ``server.key`` (0600) into ``out_dir`` and copies ``ca.crt`` there, so
    the folder holds the three files ``flower-superlink`` needs. Raises :class:`CertError` when
    the CA is missing or the files exist and ``force`` is False.
    """
    ca_cert_path, ca_key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    if not ca_cert_path.is_file() or not ca_key_path.is_file():
        raise CertError(
            f"no CA in {ca_dir} ({CA_CERT} and {CA_KEY}): create it first with "
            f"`fl-imaging-deploy ca --out {ca_dir}`"
        )
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{ca_key_path} is not an EC private key made by `fl-imaging-deploy ca`")
    cert_path, key_path = out_dir / SERVER_CERT, out_dir / SERVER_KEY
    _refuse_overwrite([cert_path, key_path], force)
    ips, dns = split_san(hosts)
    key = ec.generate_private_key(ec.SECP384R1())
    common = hosts[0].strip("[]") if hosts else "localhost"
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ip) for ip in ips] + [x509.DNSName(d) for d in dns]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(key_path, _key_pem(key), secret=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), secret=False)
    copied_ca = out_dir / CA_CERT
    if copied_ca.resolve() != ca_cert_path.resolve():
        _write(copied_ca, ca_cert_path.read_bytes(), secret=False)
    return ServerCertificate(ca_cert=copied_ca, cert=cert_path, key=key_path)


def verify_server_certificate(ca_cert: Path, cert: Path, host: str | None = None) -> None:
    """Check that ``cert`` was signed by the CA in ``ca_cert``, is valid now and, with ``host``,
    lists that host in its subject alternative names. Raises :class:`CertError` saying which
    check failed."""
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(cert.read_bytes())
    try:
        server.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as err:
        raise CertError(f"{cert} was not issued by the CA in {ca_cert}: {err}") from None
    except InvalidSignature:
        raise CertError(f"{cert} was not issued by the CA in {ca_cert} (bad signature)") from None
    now = dt.datetime.now(dt.UTC)
    if not server.not_valid_before_utc <= now <= server.not_valid_after_utc:
        raise CertError(
            f"{cert} is valid from {server.not_valid_before_utc} to "
            f"{server.not_valid_after_utc} only: issue a new one with "
            "`fl-imaging-deploy ca --out FOLDER --host ADDRESS --force` (a new CA: send its "
            "ca.crt to every site)"
        )
    if host is not None:
        san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        names += [d.lower() for d in san.get_values_for_type(x509.DNSName)]
        wanted = host.strip("[]").lower()
        if _is_ip(wanted):
            wanted = str(ipaddress.ip_address(wanted))
        if wanted not in names:
            raise CertError(
                f"{cert} does not list {host} (it lists {', '.join(names)}): issue it again "
                f"with `fl-imaging-deploy ca --out FOLDER --host {host} --force` (a new CA: send "
                "its ca.crt to every site)"
            )


def make_site_key(out_dir: Path, name: str, *, force: bool = False) -> SiteKey:
    """Create a SuperNode key pair for site ``name`` in ``out_dir``: ``NAME.key`` (private,
    OpenSSH format, mode 0600: keep it at the site) and ``NAME.pub`` (``ecdsa-sha2-nistp384 ...
    NAME``: hand it to the coordinator). ECDSA P-384, as ``ssh-keygen -t ecdsa -b 384``."""
    if not name or any(c in name for c in "/\\ \n"):
        raise CertError(f"site name {name!r}: use a plain name such as hospital-a")
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    _refuse_overwrite([private_path, public_path], force)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(private_path, private, secret=True)
    _write(public_path, public + f" {name}\n".encode(), secret=False)
    return SiteKey(private=private_path, public=public_path)
