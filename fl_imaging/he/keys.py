"""The consortium's HE key file: made once, given to every site out of band, never to the
coordinator.

One CKKS secret key serves the whole consortium (every site must decrypt the same sum). It is
made by ``fl-imaging-deploy he-key FILE`` (at one site, or by whoever provisions the
consortium's certificates) and copied to each site over a channel the consortium already
trusts (as the sites' certificates are); each SuperNode is started with ``--he-key FILE``. The
file holds the TenSEAL context with its secret key; it is written owner-readable only (0600).
In simulation every site reads ``site.he_key``, or a key made on first use in the sites' state
folder (``site.state_dir``), never in the run folder the coordinator writes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_imaging.common.atomic import write_atomically
from fl_imaging.he.ckks import HEError, context_from, new_secret_context, secret_context_bytes

__all__ = [
    "SIMULATED_KEY_FILE",
    "ConsortiumKey",
    "HEKeyError",
    "ensure_key_file",
    "load_key",
    "write_key_file",
]

#: The simulated sites' key file, in the sites' state folder.
SIMULATED_KEY_FILE = "he-consortium.key"


@dataclass(frozen=True)
class ConsortiumKey:
    """The consortium's key as a site holds it: the secret TenSEAL ``context`` and ``key_id``,
    16 hex digits naming it in messages (from a SHA-256 of the key file: the same at every
    site holding the file; TenSEAL's own serialisation of a loaded context varies, so it
    cannot name the key)."""

    context: Any
    key_id: str


_LOADED: dict[tuple[str, float], ConsortiumKey] = {}


class HEKeyError(ValueError):
    """A key file that is missing, unreadable or no secret CKKS context; names the file."""


def write_key_file(path: Path, *, force: bool = False) -> Path:
    """Make a new consortium key and write it to ``path`` (mode 0600). Refuses to overwrite an
    existing file unless ``force``. Returns ``path``."""
    path = Path(path)
    if path.exists() and not force:
        raise HEKeyError(
            f"{path} exists: a new key would lock the sites holding the old one out of the "
            "next run's sum; give another path (or --force to replace it)"
        )
    data = secret_context_bytes(new_secret_context())
    write_atomically(path, lambda handle: handle.write(data))
    os.chmod(path, 0o600)
    return path


def ensure_key_file(path: Path) -> Path:
    """The key file at ``path``, made on first use (simulation: the sites race, so under a
    lock beside it). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with (path.parent / ".he-key.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            write_key_file(path)
    return path


def load_key(path: Path) -> ConsortiumKey:
    """The consortium's key in the key file ``path`` (kept loaded while the file is
    unchanged). Raises :class:`HEKeyError` naming the file when it is missing, unreadable or
    holds no secret key."""
    path = Path(path)
    try:
        stamp = (str(path.resolve()), path.stat().st_mtime)
    except OSError:
        raise HEKeyError(
            f"homomorphic encryption key {path}: no such file; give this site the "
            "consortium's key file (fl-imaging-deploy he-key makes one)"
        ) from None
    if stamp in _LOADED:
        return _LOADED[stamp]
    try:
        data = path.read_bytes()
        context = context_from(data)
    except (OSError, HEError) as err:
        raise HEKeyError(f"homomorphic encryption key {path}: cannot be used ({err})") from None
    if not context.has_secret_key():
        raise HEKeyError(
            f"homomorphic encryption key {path}: holds no secret key (a coordinator's public "
            "context?); give the consortium's key file"
        )
    digest = hashlib.sha256(b"fl-imaging consortium key id\0" + data).hexdigest()[:16]
    _LOADED[stamp] = key = ConsortiumKey(context, digest)
    return key
