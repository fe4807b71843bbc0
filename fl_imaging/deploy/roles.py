"""What each party starts: the coordinator's SuperLink (and its list of admitted sites), and a
hospital's SuperNode after checking its data folder.

Each function builds Flower's command line, starts it through
:mod:`fl_imaging.deploy.processes` and waits until it is ready, so that a caller (the
``fl-imaging-deploy`` command, the local mode, the tests) gets a running process or an error
that says what to fix.

A SuperNode's Runtime API (plain HTTP on 127.0.0.1) hands the site's tasks to whoever asks. With
``isolation='process'`` each start writes a new random secret into the SuperNode's state folder
(mode 0600) and gives its path to ``flower-supernode --superexec-auth-secret-file`` and to the
ClientApp runner: Flower then serves ``AcquireTask`` only to requests signed with it (HMAC,
Flower's own), and every other call needs the task token that ``AcquireTask`` hands out. With
``isolation='subprocess'`` Flower ignores such a secret: the port stays open to local users.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from fl_imaging.deploy.certs import ServerCertificate
from fl_imaging.deploy.flower_home import CONNECTION, cli_home, toml_string
from fl_imaging.deploy.inputs import absolute
from fl_imaging.deploy.processes import (
    CLIENTAPP_READY,
    SUPERNODE_READY,
    ManagedProcess,
    ProcessError,
    flower_command,
    flower_env,
    start_process,
    wait_for_log,
    wait_for_port,
)

__all__ = [
    "IN_MEMORY_DATABASE",
    "ISOLATION_MODES",
    "RunnerError",
    "SUPEREXEC_SECRET_FILE",
    "SiteCheckError",
    "SuperNodeSpec",
    "check_site_folder",
    "open_runtime_api_warning",
    "register_site_keys",
    "start_superlink",
    "start_supernode",
    "supernode_command",
    "superlink_command",
    "wait_until_serving",
    "write_superexec_secret",
]

log = logging.getLogger("fl_imaging.deploy")

#: ``subprocess``: Flower's default, a new ``flwr-clientapp`` process per message; the
#: SuperNode's Runtime API stays open to local users.
#: ``process``: the SuperNode runs no ClientApp itself; fl-imaging's long-lived ClientApp
#: runner (:mod:`fl_imaging.deploy.warm_clientapp`) serves it (see that module), and only it
#: holds the secret that the Runtime API asks for.
ISOLATION_MODES = ("subprocess", "process")
_REGISTERED = re.compile(r"SuperNode (\d+) registered")
#: ``flower-superlink --database`` value that keeps the SuperLink's state (nodes, runs, messages
#: and their arrays) in memory: Flower's default. A file (SQLite) survives a restart but writes
#: every object of every message to disk.
IN_MEMORY_DATABASE = ":flwr-in-memory:"
#: The SuperNode's SuperExec secret, in its state folder (a new one at every start).
SUPEREXEC_SECRET_FILE = "superexec-auth.secret"
#: Bytes of that secret (Flower derives an HMAC-SHA256 key from it).
SUPEREXEC_SECRET_BYTES = 32


class SiteCheckError(RuntimeError):
    """The site's folder failed ``fl-imaging-data inspect``: the SuperNode does not start."""


def superlink_command(
    certs: ServerCertificate | None,
    state_dir: Path,
    host: str,
    port: int,
    *,
    node_auth: bool = True,
    database: Path | None = None,
) -> list[str]:
    """``flower-superlink`` with TLS (``certs``; None: plain text, loopback trials only),
    SuperNode authentication, listening on ``host:port`` (Fleet, Control and Runtime APIs share
    that one port), runtime dependency installation disabled. Its state stays in memory unless
    ``database`` names a SQLite file (kept across restarts; relative to ``state_dir``)."""
    command = [flower_command("flower-superlink")]
    if certs is None:
        command.append("--insecure")
    else:  # absolute: the SuperLink runs in its state folder
        command += [
            "--ssl-ca-certfile",
            str(absolute(certs.ca_cert)),
            "--ssl-certfile",
            str(absolute(certs.cert)),
            "--ssl-keyfile",
            str(absolute(certs.key)),
        ]
        if node_auth:
            command.append("--enable-supernode-auth")
    command += [
        "--database",
        IN_MEMORY_DATABASE if database is None else str(absolute(state_dir / database)),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    return command


def start_superlink(
    certs: ServerCertificate | None,
    state_dir: Path,
    host: str = "127.0.0.1",
    port: int = 9093,
    *,
    node_auth: bool = True,
    database: Path | None = None,
    timeout: float = 60.0,
) -> ManagedProcess:
    """Start the SuperLink (see :func:`superlink_command`; ``database``: a SQLite file instead
    of state in memory) with its Flower home and log (``superlink.log``) in ``state_dir``;
    returns once its port accepts connections. Relative paths are taken from the current
    working directory (Flower's process runs in ``state_dir``: it gets absolute ones)."""
    state_dir = absolute(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    proc = start_process(
        "superlink",
        superlink_command(certs, state_dir, host, port, node_auth=node_auth, database=database),
        state_dir / "superlink.log",
        flower_env(state_dir / "flwr-home"),
        cwd=state_dir,
    )
    try:
        wait_for_port(proc, "127.0.0.1" if host in ("0.0.0.0", "") else host, port, timeout)
    except ProcessError:
        from fl_imaging.deploy.processes import stop_process

        stop_process(proc)
        raise
    return proc


def register_site_keys(
    public_keys: list[Path], superlink: str, ca_cert: Path, home: Path
) -> dict[Path, int]:
    """Register each site's public key with the SuperLink (``flwr supernode register``), so that
    the SuperNode holding the matching private key is admitted. Returns key file -> node id.
    Raises :class:`ProcessError` with Flower's message when a key is refused."""
    env = cli_home(absolute(home), superlink, absolute(ca_cert))
    node_ids: dict[Path, int] = {}
    for key in public_keys:
        done = subprocess.run(
            [flower_command("flwr"), "supernode", "register", str(absolute(key)), CONNECTION],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        match = _REGISTERED.search(done.stdout)
        if done.returncode != 0 or not match:
            raise ProcessError(
                f"`flwr supernode register {key}` failed (exit {done.returncode}):\n"
                f"{(done.stdout + done.stderr).strip()}\nCheck that the SuperLink at "
                f"{superlink} runs with --enable-supernode-auth, that {ca_cert} signed its "
                "certificate, and that the key is an ECDSA public key "
                "(fl-imaging-deploy site-key) not registered already."
            )
        node_ids[key] = int(match.group(1))
        log.info("registered %s as SuperNode %s", key, match.group(1))
    return node_ids


def check_site_folder(
    data_dir: Path,
    task: str = "segmentation",
    num_classes: int = 2,
    class_names: str = "",
    modalities: str = "",
) -> str:
    """Run ``fl-imaging-data inspect`` on ``data_dir`` (with ``modalities``, comma-separated,
    as ``--modalities``: multi-modal cases); returns its report. Raises
    :class:`SiteCheckError` with the report when the folder is not ready."""
    command = [
        sys.executable,
        "-m",
        "fl_imaging.cli.data",  # the command, in a process of its own: it decodes every volume
        "inspect",
        str(data_dir),
        "--task",
        task,
        "--num-classes",
        str(num_classes),
    ]
    if class_names:
        command += ["--class-names", class_names]
    if modalities:
        command += ["--modalities", modalities]
    done = subprocess.run(
        command, capture_output=True, text=True, env=flower_env(Path.home() / ".flwr")
    )
    report = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise SiteCheckError(
            f"`fl-imaging-data inspect {data_dir}` found problems; the SuperNode is not "
            f"started. Fix them and start again:\n{report}"
        )
    return report


@dataclass
class SuperNodeSpec:
    """One hospital's SuperNode: its data folder and name, the SuperLink and CA certificate,
    its private key, the local port of its Runtime API (one per SuperNode on a machine), its
    state folder, and how its ClientApp runs (``isolation``, see :data:`ISOLATION_MODES`);
    ``roster``: the folder of the consortium's ``NAME.pub`` files (the other sites' keys it
    checks in secure aggregation; its private key signs its own), ``policy``: the site's policy
    file (:mod:`fl_imaging.site.policy`)."""

    data_dir: Path
    superlink: str
    ca_cert: Path | None
    private_key: Path | None
    state_dir: Path
    site_name: str = ""
    runtime_port: int = 9094
    isolation: str = "subprocess"
    site_index: int | None = None
    #: Connection attempts before the SuperNode gives up (None: Flower's default, no limit).
    max_retries: int | None = None
    roster: Path | None = None
    policy: Path | None = None
    #: The consortium's homomorphic encryption key file (``--he-key``; :mod:`fl_imaging.he`).
    he_key: Path | None = None

    @property
    def name(self) -> str:
        """The site's name: ``site_name``, else the data folder's name."""
        return self.site_name or absolute(self.data_dir).name

    def absolute(self) -> SuperNodeSpec:
        """This spec with every path absolute (taken from the current working directory): Flower
        runs the SuperNode in its state folder, where a relative path would point elsewhere."""

        def _abs(path: Path | None) -> Path | None:
            return None if path is None else absolute(path)

        return replace(
            self,
            data_dir=absolute(self.data_dir),
            ca_cert=_abs(self.ca_cert),
            private_key=_abs(self.private_key),
            state_dir=absolute(self.state_dir),
            roster=_abs(self.roster),
            policy=_abs(self.policy),
            he_key=_abs(self.he_key),
        )


def write_superexec_secret(state_dir: Path) -> Path:
    """Write a new random secret (``secrets.token_bytes``) to ``state_dir``/
    :data:`SUPEREXEC_SECRET_FILE`, readable by this user only (0600; written to a new file, then
    renamed over the old one); returns its path. Raises :class:`ProcessError` naming the file
    when it cannot be written."""
    path = state_dir / SUPEREXEC_SECRET_FILE
    tmp = ""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".superexec-auth-")  # mode 0600
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(SUPEREXEC_SECRET_BYTES))
        os.replace(tmp, path)
    except OSError as err:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise ProcessError(
            f"cannot write the SuperNode's secret {path}: {err}. Give a --state folder that "
            "this user can write."
        ) from None
    return path


def open_runtime_api_warning(spec: SuperNodeSpec) -> str | None:
    """The warning for a SuperNode whose Runtime API any local user can use (``isolation=
    'subprocess'``: Flower ignores the SuperExec secret there), or None when it is closed."""
    if spec.isolation != "subprocess":
        return None
    return (
        f"SuperNode {spec.name}: with --isolation subprocess its Runtime API (127.0.0.1:"
        f"{spec.runtime_port}) is open to every local user of this machine, who can take this "
        "site's tasks and messages (Flower ignores the SuperExec secret in that mode); "
        "--isolation process (the default) closes it"
    )


def supernode_command(spec: SuperNodeSpec) -> list[str]:
    """``flower-supernode`` for ``spec``. Its node config (``data-dir``, ``site-name``,
    ``site-index``, and what the site holds of its own: ``state-dir``, ``identity-key``,
    ``roster``, ``policy``, ``he-key``, all absolute) goes through a TOML file in the state
    folder, so any folder name works. With
    ``isolation='process'`` it also writes a new secret (:func:`write_superexec_secret`) and
    passes it with ``--superexec-auth-secret-file``: only the ClientApp runner started with the
    same file can then take the site's tasks. Every path it passes is absolute."""
    spec = spec.absolute()
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    node_config = spec.state_dir / "node-config.toml"
    lines = [
        f"data-dir = {toml_string(str(spec.data_dir))}",
        f"site-name = {toml_string(spec.name)}",
    ]
    if spec.site_index is not None:
        lines.append(f"site-index = {spec.site_index}")
    lines.append(f"state-dir = {toml_string(str(spec.state_dir))}")
    own = {
        "identity-key": spec.private_key,
        "roster": spec.roster,
        "policy": spec.policy,
        "he-key": spec.he_key,
    }
    for key, path in own.items():
        if path is not None:
            lines.append(f"{key} = {toml_string(str(path))}")
    node_config.write_text("\n".join(lines) + "\n")
    command = [
        flower_command("flower-supernode"),
        "--superlink",
        spec.superlink,
        "--node-config",
        str(node_config),
        "--host",
        "127.0.0.1",
        "--port",
        str(spec.runtime_port),
        "--isolation",
        spec.isolation,
    ]  # a SuperNode installs no dependencies unless --allow-runtime-dependency-installation
    if spec.ca_cert is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(spec.ca_cert)]
    if spec.private_key is not None:
        command += ["--auth-supernode-private-key", str(spec.private_key)]
    if spec.max_retries is not None:
        command += ["--max-retries", str(spec.max_retries)]
    if spec.isolation == "process":
        secret = write_superexec_secret(spec.state_dir)
        command += ["--superexec-auth-secret-file", str(secret)]
    return command


class RunnerError(ProcessError):
    """A site's ClientApp runner exited or did not become ready (its SuperNode was accepted)."""


def wait_until_serving(started: list[ManagedProcess], timeout: float = 60.0) -> None:
    """Wait until the site started by :func:`start_supernode` (``started``) can take a message:
    the SuperLink accepted its SuperNode (Flower logs ``SuperNode ID: N``) and, with
    ``isolation='process'``, its ClientApp runner has imported the ClientApp and the SuperNode
    answered it (the runner imports torch and MONAI first: seconds, which a run submitted
    earlier would wait for in its first round). Raises :class:`ProcessError` (with the log's
    end) when the SuperNode exits or ``timeout`` seconds pass, :class:`RunnerError` when the
    runner does."""
    wait_for_log(started[0], SUPERNODE_READY, timeout)
    for runner in started[1:]:
        _wait_for_runner(runner, timeout)


def _wait_for_runner(runner: ManagedProcess, timeout: float) -> None:
    try:
        wait_for_log(runner, CLIENTAPP_READY, timeout)
    except ProcessError as err:
        raise RunnerError(
            f"the SuperNode started, but its ClientApp runner cannot take tasks: {err}",
            err.log_text,
        ) from None


def start_supernode(
    spec: SuperNodeSpec, *, timeout: float = 60.0, wait: bool = True
) -> list[ManagedProcess]:
    """Start the SuperNode of ``spec`` (log ``supernode.log`` in its state folder). With
    ``isolation='process'`` also starts fl-imaging's long-lived ClientApp runner against the
    SuperNode's Runtime API, with the SuperNode's secret (see :func:`supernode_command`). With
    ``wait``, returns once the site can take a message (:func:`wait_until_serving`). Returns the
    processes started, SuperNode first. Raises :class:`ProcessError` (with the log's end) when
    the SuperLink refuses the SuperNode or the SuperNode its runner. With
    ``isolation='subprocess'`` logs :func:`open_runtime_api_warning`. Relative paths in
    ``spec`` are taken from the current working directory (:meth:`SuperNodeSpec.absolute`)."""
    if spec.isolation not in ISOLATION_MODES:
        raise ProcessError(
            f"isolation={spec.isolation!r}: allowed values are {', '.join(ISOLATION_MODES)}"
        )
    spec = spec.absolute()
    warning = open_runtime_api_warning(spec)
    if warning is not None:
        log.warning(warning)
    env = flower_env(spec.state_dir / "flwr-home")
    command = supernode_command(spec)
    node = start_process(
        f"supernode {spec.name}",
        command,
        spec.state_dir / "supernode.log",
        env,
        cwd=spec.state_dir,
    )
    started = [node]
    try:
        if wait:
            wait_for_log(node, SUPERNODE_READY, timeout)
        if spec.isolation == "process":
            started.append(
                start_process(
                    f"clientapp {spec.name}",
                    [
                        sys.executable,
                        "-m",
                        "fl_imaging.deploy.warm_clientapp",
                        "--runtime-api-address",
                        f"127.0.0.1:{spec.runtime_port}",
                        "--parent-pid",
                        str(node.pid),
                        "--superexec-auth-secret-file",
                        command[command.index("--superexec-auth-secret-file") + 1],
                    ],
                    spec.state_dir / "clientapp.log",
                    env,
                    cwd=spec.state_dir,
                )
            )
            if wait:
                _wait_for_runner(started[1], timeout)
    except ProcessError:
        from fl_imaging.deploy.processes import stop_all

        stop_all(started)
        raise
    return started
