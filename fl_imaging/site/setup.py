"""What a site holds of its own, found from where it runs: its state folder, its policy, its
identity and roster, its privacy ledger and its record.

- **Deployment**: the SuperNode's node config (written by ``fl-imaging-deploy supernode``):
  ``state-dir`` (its ``--state`` folder), ``policy`` (``--policy``), ``identity-key`` (its
  ``--key``, the key pair the SuperLink registered) and ``roster`` (``--roster``: the folder of
  the consortium's ``NAME.pub`` files). Nothing of it comes from the coordinator.
- **Simulation**: one folder per site under ``site.state_dir`` (``<name>-<8 hex digits of the
  data folder's SHA-256>``, so that two runs on the same data share a ledger and two sites of
  the same name on other data do not), the policy ``site.policies[name]`` or ``site.policy``, a
  key pair made in the site's folder on first use, and the roster of every simulated site's
  public key. The config is the coordinator's, but a simulation has one owner: it stands in for
  the hospitals' own files so that tests and benchmarks can give each site a policy.
"""

from __future__ import annotations

import fcntl
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from fl_imaging.config import RunConfig, SiteConfig
from fl_imaging.he.keys import SIMULATED_KEY_FILE, ConsortiumKey
from fl_imaging.privacy.ledger import LEDGER_FILE, SiteLedger
from fl_imaging.review.site_record import RECORD_FILE, SiteRecord
from fl_imaging.site.identity import (
    SiteIdentity,
    ensure_identity,
    identity_in,
    load_identity,
    roster_of,
)
from fl_imaging.site.policy import SitePolicy, load_policy
from fl_imaging.training.site_training import SiteRef

__all__ = [
    "SiteSetup",
    "SiteSetupError",
    "absolute_site_paths",
    "check_site_policies",
    "site_state_folder",
    "site_state_root",
]

#: The node config keys a SuperNode's site setup is read from.
NODE_KEYS = ("state-dir", "policy", "identity-key", "roster", "he-key")


class SiteSetupError(RuntimeError):
    """A site cannot find what it needs of its own (identity, roster); names what to give."""


def site_state_root(cfg: RunConfig) -> Path:
    """The folder holding every simulated site's state folder: ``site.state_dir``, else
    ``site-state`` beside the run folder."""
    if cfg.site.state_dir:
        return Path(cfg.site.state_dir)
    return Path(cfg.run_dir).parent / "site-state"


def absolute_site_paths(cfg: RunConfig) -> SiteConfig:
    """``cfg.site`` with its state folder (:func:`site_state_root`) and policy files made
    absolute, from the folder the run is started in."""
    site = cfg.site

    def absolute(path: str) -> str:
        return str(Path(path).resolve())

    return replace(
        site,
        state_dir=absolute(str(site_state_root(cfg))),
        policy=absolute(site.policy) if site.policy else None,
        policies={name: absolute(path) for name, path in site.policies.items()},
    )


def check_site_policies(cfg: RunConfig) -> None:
    """Read every simulated site's policy file (``site.policy``, ``site.policies``) before the
    run. Raises :class:`~fl_imaging.config.ConfigError` naming the file and the key."""
    from fl_imaging.config import ConfigError
    from fl_imaging.site.policy import PolicyError

    for path in {cfg.site.policy, *cfg.site.policies.values()} - {None}:
        try:
            load_policy(path)
        except PolicyError as err:
            raise ConfigError(str(err)) from None


def site_state_folder(root: Path, name: str, data_folder: Path) -> Path:
    """A simulated site's state folder under ``root``: ``<name>-<sha8 of its data folder>``."""
    digest = hashlib.sha256(str(Path(data_folder).resolve()).encode()).hexdigest()[:8]
    return Path(root) / f"{name}-{digest}"


@dataclass(frozen=True)
class SiteSetup:
    """One site's own setup (see the module): its ``name``, state ``folder``, ``policy``, and
    where its identity comes from: ``identity_key`` and ``roster`` (a folder of ``NAME.pub``) in
    a deployment, or ``simulated_sites`` (name -> state folder of every simulated site);
    ``simulated``: whether the site is simulated on the coordinator's machine (set from the
    site's own node config, never from the coordinator's request)."""

    name: str
    folder: Path
    policy: SitePolicy
    identity_key: Path | None = None
    roster: Path | None = None
    simulated_sites: tuple[tuple[str, Path], ...] = ()
    simulated: bool = False
    #: The consortium's HE key file (deployment: ``he-key``, from ``--he-key``; simulation:
    #: ``site.he_key`` or one made in the sites' state folder); None: none given.
    he_key: Path | None = None
    #: Whether ``he_key`` is simulation's own, made on first use.
    he_key_made_here: bool = False

    @classmethod
    def of(cls, node_config: dict, cfg: RunConfig, site: SiteRef) -> SiteSetup:
        """The setup of ``site`` from its node config (deployment) or ``cfg.site`` (simulation).
        Raises :class:`~fl_imaging.site.policy.PolicyError` for a policy file that cannot be
        used."""
        if not site.simulated:
            folder = Path(str(node_config.get("state-dir", site.folder / ".fl-imaging-site")))
            policy = node_config.get("policy")
            key, roster = node_config.get("identity-key"), node_config.get("roster")
            he_key = node_config.get("he-key")
            return cls(
                site.name,
                folder,
                load_policy(str(policy) if policy else None),
                Path(str(key)) if key else None,
                Path(str(roster)) if roster else None,
                he_key=Path(str(he_key)) if he_key else None,
            )
        root = site_state_root(cfg)
        sites = tuple(
            (Path(p).name, site_state_folder(root, Path(p).name, Path(p))) for p in cfg.data.sites
        )
        policy = cfg.site.policies.get(site.name, cfg.site.policy)
        return cls(
            site.name,
            site_state_folder(root, site.name, site.folder),
            load_policy(policy),
            simulated_sites=sites,
            simulated=True,
            he_key=Path(cfg.site.he_key) if cfg.site.he_key else root / SIMULATED_KEY_FILE,
            he_key_made_here=not cfg.site.he_key,
        )

    def ledger(self) -> SiteLedger:
        """The site's privacy ledger (:mod:`fl_imaging.privacy.ledger`)."""
        return SiteLedger(self.folder / LEDGER_FILE, self.name)

    def record(self) -> SiteRecord:
        """The site's record of requests and replies (:mod:`fl_imaging.review.site_record`)."""
        return SiteRecord(self.folder / RECORD_FILE, self.name)

    def identity(self) -> SiteIdentity:
        """The site's signing key and roster. Simulation: every simulated site's key pair, made
        on first use (under a lock: workers may race). Raises :class:`SiteSetupError` in a
        deployment started without ``--key`` or ``--roster``, and
        :class:`~fl_imaging.site.identity.IdentityError` for key files that cannot be used."""
        if self.simulated_sites:
            root = self.folder.parent
            root.mkdir(parents=True, exist_ok=True)
            with (root / ".identities.lock").open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                publics = {name: ensure_identity(f, name) for name, f in self.simulated_sites}
            return identity_in(self.folder, self.name, roster_of(publics))
        if self.identity_key is None or self.roster is None:
            raise SiteSetupError(
                f"[site {self.name}] secure aggregation needs this site's identity: start its "
                "SuperNode with --key (its key pair) and --roster (the folder of the "
                "consortium's NAME.pub files), so that it can sign its keys and check the "
                "other sites'"
            )
        return load_identity(self.name, self.identity_key, self.roster)

    def he_context(self) -> ConsortiumKey:
        """The consortium's key, its secret CKKS context and id (:mod:`fl_imaging.he.keys`):
        simulation's key made on first use when ``site.he_key`` is not given. Raises
        :class:`SiteSetupError` in a deployment started without ``--he-key``, and
        :class:`~fl_imaging.he.keys.HEKeyError` for a key file that cannot be used."""
        from fl_imaging.he.keys import ensure_key_file, load_key

        if self.he_key is None:
            raise SiteSetupError(
                f"[site {self.name}] homomorphic encryption needs the consortium's key: start "
                "its SuperNode with --he-key FILE (fl-imaging-deploy he-key makes one; every "
                "site gets a copy, the coordinator none)"
            )
        if self.he_key_made_here:
            ensure_key_file(self.he_key)
        return load_key(self.he_key)
