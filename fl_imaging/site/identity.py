"""A site's long-term identity: the key that signs what it tells the other sites through the
coordinator, and the roster of the consortium's public keys it checks the others against.

Secure aggregation's keys are new every round and travel through the coordinator, so a
coordinator could hand a site its own public key in another site's name and read that site's
shares (:mod:`fl_imaging.secagg.site`). Every round's keys are therefore signed by the
site that made them, and every site checks each other site's signature against the public key
its own roster holds for that site's name: a key that no roster entry signed is refused.

- **Deployment**: the identity is the SuperNode's own key pair (``fl-imaging-deploy site-key``:
  ECDSA P-384, OpenSSH format, the key the SuperLink registered); the roster is a folder of the
  consortium's ``NAME.pub`` files (the same public keys the coordinator registers), handed to
  every site with the consortium's provisioning, not through the coordinator at run time.
- **Simulation**: each simulated site gets a key pair of its own in its state folder on first
  use, and the engine hands every site the roster of the run's sites.

The signatures are Flower's (``flwr.supercore.primitives.asymmetric``: ECDSA with SHA-256, on
``cryptography``); the key files are read and written by ``cryptography``. Ours: which bytes are
signed (:func:`signed_bytes`) and the roster's layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fl_imaging.flower.internals import sign_message, verify_signature

__all__ = [
    "IdentityError",
    "SiteIdentity",
    "ensure_identity",
    "load_identity",
    "load_roster",
    "signed_bytes",
]

#: Name of a simulated site's key pair in its state folder (``identity.key``, ``identity.pub``).
IDENTITY = "identity"


class IdentityError(ValueError):
    """A key or roster file that cannot be used, or a signature that does not verify; the
    message names the file or the site, and what to do."""


def signed_bytes(*fields: object) -> bytes:
    """The bytes a signature covers: each field's ``repr`` (bytes as hex), joined by NUL, so
    that no two different field lists give the same bytes."""
    parts = [f.hex() if isinstance(f, bytes) else repr(f) for f in fields]
    return "\0".join(parts).encode()


@dataclass(frozen=True)
class SiteIdentity:
    """One site's signing key (``private_key``) under its ``name``, and the ``roster``: every
    consortium site's public key by name (this site's own included)."""

    name: str
    private_key: ec.EllipticCurvePrivateKey
    roster: Mapping[str, ec.EllipticCurvePublicKey]

    def sign(self, data: bytes) -> bytes:
        """This site's signature (ECDSA, DER bytes) of ``data``."""
        return sign_message(self.private_key, data)

    def verify(self, site: str, data: bytes, signature: bytes) -> None:
        """Check that ``site`` (by the roster's public key for that name) signed ``data``.
        Raises :class:`IdentityError` naming the site when the roster has no such site or the
        signature does not verify."""
        public = self.roster.get(site)
        if public is None:
            raise IdentityError(
                f"site {site} is not in this site's roster ({', '.join(sorted(self.roster))}): "
                "its keys cannot be checked, so they are refused"
            )
        if not verify_signature(public, data, signature):
            raise IdentityError(
                f"the keys sent in the name of site {site} are not signed by {site}'s key in "
                "this site's roster: substituted or damaged on the way, so they are refused"
            )


def _public_of(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (OSError, ValueError) as err:
        raise IdentityError(
            f"{path}: not a readable OpenSSH public key ({err}); use the NAME.pub files that "
            "`fl-imaging-deploy site-key` writes"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise IdentityError(f"{path}: not an ECDSA key; use `fl-imaging-deploy site-key`")
    return key


def _private_of(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise IdentityError(
            f"{path}: cannot read this site's private key ({err}); give the key made by "
            "`fl-imaging-deploy site-key`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{path}: not an ECDSA key; use `fl-imaging-deploy site-key`")
    return key


def load_roster(folder: Path) -> dict[str, ec.EllipticCurvePublicKey]:
    """The roster in ``folder``: every ``NAME.pub`` file (OpenSSH ECDSA public key) as site
    ``NAME``. Raises :class:`IdentityError` naming the folder when it is missing or holds no
    key, or a file that is not such a key."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IdentityError(
            f"roster folder {folder} does not exist: it holds the consortium's NAME.pub files "
            "(one per site), given to every site with the provisioning"
        )
    roster = {path.stem: _public_of(path) for path in sorted(folder.glob("*.pub"))}
    if not roster:
        raise IdentityError(f"roster folder {folder} holds no NAME.pub file")
    return roster


def load_identity(name: str, private_key: Path, roster: Path) -> SiteIdentity:
    """Site ``name``'s identity from its private key file (OpenSSH, as ``fl-imaging-deploy
    site-key`` writes it) and the roster folder. Raises :class:`IdentityError` when a file
    cannot be read, or when the roster's key for ``name`` is not this private key's."""
    key = _private_of(Path(private_key))
    keys = load_roster(roster)
    own = keys.get(name)
    if own is None:
        raise IdentityError(
            f"the roster {roster} has no {name}.pub: the other sites could not check this "
            f"site's keys; add this site's public key to the roster of every site"
        )
    if own.public_numbers() != key.public_key().public_numbers():
        raise IdentityError(
            f"{roster}/{name}.pub is not the public key of {private_key}: give this site's own "
            "key pair, or correct the roster"
        )
    return SiteIdentity(name, key, keys)


def ensure_identity(folder: Path, name: str) -> Path:
    """A simulated site's key pair in its state ``folder`` (``identity.key``, ``identity.pub``),
    made on first use and kept; returns the public key's path."""
    from fl_imaging.deploy.certs import make_site_key

    public = Path(folder) / f"{IDENTITY}.pub"
    if not public.is_file():
        make_site_key(Path(folder), IDENTITY, force=True)
    return public


def roster_of(publics: Mapping[str, Path]) -> dict[str, ec.EllipticCurvePublicKey]:
    """A roster from public key files by site name (simulation: the run's sites)."""
    return {name: _public_of(Path(path)) for name, path in publics.items()}


def identity_in(
    folder: Path, name: str, roster: Mapping[str, ec.EllipticCurvePublicKey]
) -> SiteIdentity:
    """A simulated site's identity: its key pair in its state ``folder`` (see
    :func:`ensure_identity`) and the run's ``roster``."""
    return SiteIdentity(name, _private_of(Path(folder) / f"{IDENTITY}.key"), dict(roster))
