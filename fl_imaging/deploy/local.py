"""A whole deployment on one machine, on loopback: a coordinator and N hospitals.

:func:`start_local` does what the coordinator and each hospital would do on their own machines:
a CA and the SuperLink's certificate, one key pair per site (public keys registered), the
SuperLink with TLS and SuperNode authentication, then one SuperNode per site folder (each
checked with ``fl-imaging-data inspect`` first). Everything lives in one state folder; the
returned :class:`LocalFederation` knows every process and stops them all (by PID, children
too). Used by ``fl-imaging-deploy local``, the tests and the deployment benchmark.
"""

from __future__ import annotations

import logging
import shlex
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fl_imaging.deploy.certs import (
    ServerCertificate,
    make_ca,
    make_server_certificate,
    make_site_key,
)
from fl_imaging.deploy.processes import (
    ManagedProcess,
    ProcessError,
    free_port,
    stop_all,
    stop_process,
)
from fl_imaging.deploy.roles import (
    SuperNodeSpec,
    check_site_folder,
    register_site_keys,
    start_superlink,
    start_supernode,
    wait_until_serving,
)

__all__ = ["LocalFederation", "start_local"]

log = logging.getLogger("fl_imaging.deploy")


@dataclass
class LocalFederation:
    """A running loopback federation: the SuperLink's address, the CA certificate, one
    :class:`SuperNodeSpec` per site and every process started (SuperLink first)."""

    state_dir: Path
    superlink: str
    ca_cert: Path
    specs: dict[str, SuperNodeSpec]
    superlink_process: ManagedProcess
    site_processes: dict[str, list[ManagedProcess]] = field(default_factory=dict)

    @property
    def processes(self) -> list[ManagedProcess]:
        """Every process of the federation, in start order."""
        procs = [self.superlink_process]
        for started in self.site_processes.values():
            procs += started
        return procs

    def fl_imaging_args(self, *overrides: str) -> list[str]:
        """The ``fl-imaging`` overrides that run an experiment on this federation: the
        deployment engine, the SuperLink, its CA certificate and the sites (``data=folders``
        with the site names; their folders stay with the SuperNodes)."""
        names = ",".join(self.specs)
        return [
            "engine=deployment",
            f"engine.superlink={self.superlink}",
            f"engine.root_certificates={self.ca_cert}",
            f"engine.num_sites={len(self.specs)}",
            "data=folders",
            f"data.sites=[{names}]",
            *overrides,
        ]

    def command_line(self, *overrides: str) -> str:
        """The ``fl-imaging`` command to type, quoted for a POSIX shell."""
        return shlex.join(["fl-imaging", *self.fl_imaging_args(*overrides)])

    def kill_site(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Simulate a crash: send ``sig`` to site ``name``'s SuperNode only (its helpers notice
        and exit by themselves), then make sure nothing of it is left."""
        started = self.site_processes.get(name, [])
        if not started:
            raise KeyError(f"no running SuperNode for site {name!r}")
        started[0].popen.send_signal(sig)
        started[0].popen.wait(timeout=30)
        stop_all(started)
        self.site_processes[name] = []

    def start_site(self, name: str, timeout: float = 120.0) -> list[ManagedProcess]:
        """(Re)start site ``name``'s SuperNode. After a crash the SuperLink refuses it until the
        old connection's heartbeats expired (up to 60 s): it is retried until ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                started = start_supernode(self.specs[name])
                break
            except ProcessError as err:
                if "Failed to activate SuperNode" not in str(err) or time.monotonic() > deadline:
                    raise
                log.info("site %s: the SuperLink still counts it as connected; retrying", name)
                time.sleep(5)
        self.site_processes[name] = started
        return started

    def stop(self) -> None:
        """Stop every process: SuperNodes first, then the SuperLink (each by PID, with its
        children)."""
        for name in reversed(list(self.site_processes)):
            stop_all(self.site_processes.pop(name))
        stop_process(self.superlink_process)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_local(
    sites: list[Path],
    state_dir: Path,
    *,
    port: int | None = None,
    isolation: str = "process",
    check: bool = True,
    task: str = "segmentation",
    num_classes: int = 2,
    database: Path | None = None,
    timeout: float = 120.0,
    policies: dict[str, Path] | None = None,
    he_key: Path | None = None,
) -> LocalFederation:
    """Start a coordinator and one SuperNode per folder of ``sites`` on 127.0.0.1.

    ``state_dir`` receives ``certs/`` (CA, server certificate), ``keys/`` (one key pair per
    site, named after its folder), ``superlink/`` and ``sites/NAME/`` (state and logs). The
    SuperLink listens on ``port`` (default: a free one); each SuperNode's Runtime API gets a free
    port. ``isolation`` says how SuperNodes run their ClientApp (default ``process``: one
    long-lived process each, see :mod:`fl_imaging.deploy.warm_clientapp`, the only holder of its
    SuperNode's secret, so that no other local process can take the site's tasks; ``subprocess``:
    Flower's default, which leaves each Runtime API port open to local users). With ``check``,
    each folder must pass ``fl-imaging-data inspect`` (``task``, ``num_classes``) first. The
    SuperLink keeps its state in memory unless ``database`` names a SQLite file (relative paths:
    in ``state_dir/superlink``). ``policies``: a site policy file by site name. Every site's
    roster is ``keys/`` (the consortium's public keys); ``he_key``: the consortium's homomorphic
    encryption key file every SuperNode is given (``--he-key``; None: none). Everything
    started is stopped again when a step fails.
    """
    sites = [Path(s).resolve() for s in sites]
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"site folder names must be unique, they name the sites: {names}")
    if check:
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(lambda s: check_site_folder(s, task, num_classes), sites))
        log.info("every site folder passed fl-imaging-data inspect")
    state_dir = state_dir.resolve()
    certs_dir = state_dir / "certs"
    if not (certs_dir / "server.pem").is_file():
        make_ca(certs_dir, force=True)
        make_server_certificate(certs_dir, certs_dir, ["127.0.0.1"], force=True)
    certs = ServerCertificate(
        certs_dir / "ca.crt", certs_dir / "server.pem", certs_dir / "server.key"
    )
    keys = {name: make_site_key(state_dir / "keys", name, force=True) for name in names}
    port = port or free_port()
    address = f"127.0.0.1:{port}"
    link = start_superlink(
        certs, state_dir / "superlink", "127.0.0.1", port, database=database, timeout=timeout
    )
    federation = LocalFederation(state_dir, address, certs.ca_cert, {}, link)
    try:
        register_site_keys(
            [keys[n].public for n in names], address, certs.ca_cert, state_dir / "flwr-cli"
        )
        for index, (name, folder) in enumerate(zip(names, sites, strict=True)):
            federation.specs[name] = SuperNodeSpec(
                data_dir=folder,
                superlink=address,
                ca_cert=certs.ca_cert,
                private_key=keys[name].private,
                state_dir=state_dir / "sites" / name,
                runtime_port=free_port(),
                isolation=isolation,
                site_index=index,
                roster=state_dir / "keys",
                policy=(policies or {}).get(name),
                he_key=he_key,
            )
        # Start every SuperNode, then wait for them together (each takes seconds to start):
        # ready means each site can take a message (its ClientApp runner's imports done).
        pending: dict[str, list[ManagedProcess]] = {}
        for name, spec in federation.specs.items():
            pending[name] = start_supernode(spec, timeout=timeout, wait=False)
            federation.site_processes[name] = pending[name]
        for started in pending.values():
            wait_until_serving(started, timeout)
    except BaseException:
        federation.stop()
        raise
    return federation
