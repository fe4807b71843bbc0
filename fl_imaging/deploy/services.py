"""systemd units for a real deployment: the SuperLink and a hospital's SuperNode as services that
restart, start at boot and log to the journal (``fl-imaging-deploy service superlink|supernode``).

A unit runs the same role command an admin would type (``fl-imaging-deploy superlink ...`` or
``fl-imaging-deploy supernode ...``, every path made absolute), from the virtual environment's
``bin``, as an ordinary user (``User=``), in the state folder, with ``Restart=always``.

One unit per SuperNode, running ``fl-imaging-deploy supernode``, not one unit for
``flower-supernode`` and another for the ClientApp runner (:mod:`fl_imaging.deploy.warm_clientapp`):

* the two belong together: each start writes a new SuperExec secret that only that SuperNode and
  that runner know, and the runner watches its SuperNode's PID (``--parent-pid``). A second unit
  can know neither; a runner restarted alone holds an old secret, a SuperNode restarted alone
  has no runner (half a site: connected, taking no tasks);
* ``fl-imaging-deploy supernode`` already supervises both: when either exits (a crash, a kill by
  PID) it stops the other and exits with a non-zero code, and systemd starts the whole site
  again after ``RestartSec``; it waits until the site can take a message before saying
  "connected", and retries while the SuperLink still counts a crashed site as connected
  (``--rejoin-wait``, which the unit sets to at least :data:`REJOIN_WAIT_S`);
* everything runs in the unit's control group, Flower's helpers too (they start sessions of
  their own), so ``systemctl stop`` and a restart leave nothing behind. ``KillMode=mixed``: the
  SIGTERM goes to the role command, which stops its processes in order (the SuperNode first
  says goodbye to the SuperLink, so it can rejoin at once); whatever is left after
  ``TimeoutStopSec`` is killed.

``Restart=always`` rather than ``on-failure``: a Flower process that exits with code 0 still
leaves the site down. ``StartLimitBurst`` starts in ``StartLimitIntervalSec`` end the loop for a
fault that a restart cannot fix (an unregistered key: ``systemctl status`` then shows the
error, ``systemctl reset-failed`` and ``start`` after fixing it).

Hardening that leaves the role working: no new privileges, the whole file system read-only
(``ProtectSystem=strict``, home folders read-only) except the state folder and the folders
given as writable, a private ``/tmp``. Devices stay visible (a site may train on a GPU).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "REJOIN_WAIT_S",
    "RESTART_POLICIES",
    "ServiceError",
    "ServiceSpec",
    "exec_quote",
    "flower_binaries",
    "render_unit",
    "resolve_user",
    "role_arguments",
    "role_service",
    "unit_name",
    "venv_command",
    "write_units",
]

#: Seconds a restarted SuperNode keeps retrying while the SuperLink refuses it: after a crash the
#: SuperLink counts the site as connected until 2 heartbeats (2 x 30 s) are missed.
REJOIN_WAIT_S = 90.0
#: Restart= values a unit may get.
RESTART_POLICIES = ("always", "on-failure")
#: Flower's commands each role starts (found in the venv's bin, else on PATH).
ROLE_BINARIES = {
    "superlink": ("flower-superlink", "flower-superexec", "flwr"),
    "supernode": ("flower-supernode",),
}
#: The rest of a service's PATH after the folders of the venv and Flower's commands.
SYSTEM_PATH = ("/usr/local/bin", "/usr/bin", "/bin")
#: Characters an ExecStart= word may hold unquoted.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


class ServiceError(ValueError):
    """A unit cannot be made from these flags (missing venv, user or file): says what to fix."""


@dataclass(frozen=True)
class ServiceSpec:
    """One systemd service: its unit ``name`` (without ``.service``), a one-line
    ``description``, the program (``executable``, absolute) and its ``arguments``, the ``user``
    it runs as, its ``working_directory``, the folders it may write (``writable``; every other
    path is read-only) and those it reads (``read_only``, listed for the reader), the folders of
    its ``PATH`` (first), extra ``environment`` variables, the log files the role keeps besides
    the journal, and its restart policy (``restart``: one of :data:`RESTART_POLICIES`,
    ``restart_sec`` seconds between an exit and the next start, at most ``start_limit_burst``
    starts in ``start_limit_interval_s`` seconds)."""

    name: str
    description: str
    executable: Path
    arguments: tuple[str, ...]
    user: str
    working_directory: Path
    writable: tuple[Path, ...]
    read_only: tuple[Path, ...] = ()
    path_dirs: tuple[Path, ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    log_files: tuple[Path, ...] = ()
    restart: str = "always"
    restart_sec: int = 10
    start_limit_burst: int = 5
    start_limit_interval_s: int = 600
    stop_timeout_s: int = 90
    generated_by: str = field(default="fl-imaging-deploy service")

    def __post_init__(self) -> None:
        if self.restart not in RESTART_POLICIES:
            raise ServiceError(f"restart={self.restart!r}: use one of {RESTART_POLICIES}")
        for path in (self.executable, self.working_directory, *self.writable, *self.read_only):
            if not path.is_absolute():
                raise ServiceError(f"{path}: a unit needs absolute paths")

    @property
    def file_name(self) -> str:
        """The unit file's name: ``NAME.service``."""
        return f"{self.name}.service"


def unit_name(role: str, site: str = "") -> str:
    """The unit name for ``role`` (``fl-imaging-superlink``, ``fl-imaging-supernode-SITE``),
    characters systemd does not take in a unit name replaced by ``-``."""
    stem = f"fl-imaging-{role}" + (f"-{site}" if site else "")
    return re.sub(r"[^A-Za-z0-9:_.-]", "-", stem)


def exec_quote(word: str) -> str:
    """``word`` as one word of a systemd command line (ExecStart=, Environment=, path lists):
    as it is when plain, else in double quotes with ``\\`` and ``"`` escaped; ``%`` and ``$``
    doubled (systemd would expand them). Raises :class:`ServiceError` for a newline."""
    if "\n" in word or "\r" in word:
        raise ServiceError(f"{word!r}: a unit's command line cannot hold a line break")
    text = word.replace("%", "%%").replace("$", "$$")
    if word and _PLAIN_WORD.fullmatch(word):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _words(paths: Sequence[Path], prefix: str = "") -> str:
    """``paths`` as one line of a path list (ReadWritePaths=), each with ``prefix``."""
    return " ".join(exec_quote(prefix + str(p)) for p in paths)


def render_unit(spec: ServiceSpec) -> str:
    """The text of ``spec``'s unit file: a header comment (how to install it, where its logs
    go), ``[Unit]`` (after the network is up, start limits), ``[Service]`` (user, folder,
    environment, command, restart, stop, journal, hardening) and ``[Install]``
    (``WantedBy=multi-user.target``: started at boot once enabled)."""
    header = [
        f"# {spec.file_name}: made by `{spec.generated_by}`; to change a flag, make it",
        "# again rather than edit this file. Install and start it (as root):",
        f"#   cp {spec.file_name} /etc/systemd/system/ && systemctl daemon-reload",
        f"#   systemctl enable --now {spec.name}",
        f"# Logs (the role's lines and Flower's): journalctl -u {spec.name} -f",
        *(f"# The role also appends them to {p}" for p in spec.log_files),
    ]
    environment = [("PATH", ":".join([*map(str, spec.path_dirs), *SYSTEM_PATH]))]
    environment += [("PYTHONUNBUFFERED", "1"), *spec.environment]
    service = [
        "Type=simple",
        f"User={spec.user}",
        f"WorkingDirectory={str(spec.working_directory).replace('%', '%%')}",
        *(f"Environment={exec_quote(f'{key}={value}')}" for key, value in environment),
        "ExecStart=" + " ".join(exec_quote(w) for w in (str(spec.executable), *spec.arguments)),
        f"Restart={spec.restart}",
        f"RestartSec={spec.restart_sec}",
        "KillMode=mixed",
        f"TimeoutStopSec={spec.stop_timeout_s}",
        "StandardOutput=journal",
        "StandardError=journal",
        f"SyslogIdentifier={spec.name}",
        "UMask=0077",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        f"ReadWritePaths={_words(spec.writable)}",
        # "-": a file gone missing is reported by the role, not as a namespace failure
        *([f"ReadOnlyPaths={_words(spec.read_only, '-')}"] if spec.read_only else []),
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
    ]
    unit = [
        f"Description={spec.description}",
        "Wants=network-online.target",
        "After=network-online.target",
        f"StartLimitIntervalSec={spec.start_limit_interval_s}",
        f"StartLimitBurst={spec.start_limit_burst}",
    ]
    sections = [
        "\n".join(header),
        "[Unit]\n" + "\n".join(unit),
        "[Service]\n" + "\n".join(service),
        "[Install]\nWantedBy=multi-user.target",
    ]
    return "\n\n".join(sections) + "\n"


def write_units(specs: Sequence[ServiceSpec], out: Path) -> list[Path]:
    """Write each spec's unit file into ``out`` (created); returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in specs:
        path = out / spec.file_name
        path.write_text(render_unit(spec))
        written.append(path)
    return written


def venv_command(venv: Path, name: str = "fl-imaging-deploy") -> Path:
    """``venv/bin/name``, absolute (``venv``: the virtual environment fl-imaging is installed
    in). Raises :class:`ServiceError` when it is not an executable file there."""
    command = venv.resolve() / "bin" / name
    if not (command.is_file() and os.access(command, os.X_OK)):
        raise ServiceError(
            f"{command} not found: give --venv the virtual environment fl-imaging is installed "
            f"in (python -m venv {venv} && {venv}/bin/pip install fl-imaging)"
        )
    return command


def flower_binaries(role: str, venv: Path) -> list[Path]:
    """The folders of Flower's commands that ``role`` starts (:data:`ROLE_BINARIES`): the
    venv's ``bin`` when they are there, else where ``PATH`` finds them; the venv's ``bin``
    first. Raises :class:`ServiceError` naming a command found in neither."""
    folders = [venv.resolve() / "bin"]
    for name in ROLE_BINARIES[role]:
        if (folders[0] / name).is_file():
            continue
        found = shutil.which(name)
        if found is None:
            raise ServiceError(
                f"`{name}` is not in {folders[0]} nor on PATH: install flwr 1.41 into {venv} "
                f"({venv}/bin/pip install 'flwr[simulation]>=1.41,<1.42')"
            )
        folder = Path(found).resolve().parent
        if folder not in folders:
            folders.append(folder)
    return folders


def resolve_user(user: str | None) -> pwd.struct_passwd:
    """The account a service runs as: ``user``, else the one running this command. Raises
    :class:`ServiceError` for an unknown account or root (a service needs no privileges)."""
    try:
        entry = pwd.getpwnam(user) if user else pwd.getpwuid(os.getuid())
    except KeyError:
        raise ServiceError(
            f"no user {user!r} on this machine: create it first (useradd --system --create-home "
            f"{user}) or give --user an existing account"
        ) from None
    if entry.pw_uid == 0:
        raise ServiceError(
            "the service would run as root: give --user an ordinary account that owns the state "
            "folder (no role needs privileges)"
        )
    return entry


def role_arguments(
    values: dict[str, object], relative_to: dict[str, str] | None = None
) -> list[str]:
    """The command-line flags that give back ``values`` (a role's parsed arguments, by
    destination name: ``data_dir`` -> ``--data-dir``), every path absolute: resolved from the
    current folder, or, for a name in ``relative_to``, joined to the (absolute) path of the
    flag it names (``{"database": "state"}``). ``True`` gives the bare flag; ``False``, ``None``
    and ``""`` give nothing; a list gives the flag and each item."""
    relative_to = relative_to or {}

    def absolute(name: str, value: Path) -> str:
        base = relative_to.get(name)
        if base is not None:
            return str((Path(str(values[base])).resolve() / value).resolve())
        return str(value.resolve())

    args: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is None or value is False or value == "" or value == []:
            continue
        if value is True:
            args.append(flag)
        elif isinstance(value, list | tuple):
            args.append(flag)
            args += [absolute(name, v) if isinstance(v, Path) else str(v) for v in value]
        elif isinstance(value, Path):
            args += [flag, absolute(name, value)]
        else:
            args += [flag, str(value)]
    return args


#: Flags of each role whose path is relative to another flag's path, not to the current folder.
RELATIVE_FLAGS = {"superlink": {"database": "state"}, "supernode": {}}
#: Flags of each role that name files or folders the service only reads.
READ_FLAGS = {
    "superlink": ("certs", "register"),
    "supernode": ("ca", "key", "data_dir", "roster", "policy", "he_key"),
}
#: Log files each role appends to in its state folder.
ROLE_LOGS = {"superlink": ("superlink.log",), "supernode": ("supernode.log", "clientapp.log")}


def _paths(value: object) -> list[Path]:
    items = value if isinstance(value, list | tuple) else [value]
    return [Path(v).resolve() for v in items if isinstance(v, Path)]


def role_service(
    role: str,
    values: dict[str, object],
    *,
    user: str,
    venv: Path,
    writable: Sequence[Path] = (),
    restart: str = "always",
    restart_sec: int = 10,
) -> ServiceSpec:
    """The service that runs ``fl-imaging-deploy ROLE`` (``superlink`` or ``supernode``) with
    the role's parsed flags ``values`` (by destination name; ``state`` is the state folder),
    as ``user``, from ``venv``. It may write the state folder and ``writable`` (e.g. the run
    folders a SuperLink's ServerApp writes) and reads the role's certificates, keys and site
    folder. A SuperNode's ``rejoin_wait`` is raised to :data:`REJOIN_WAIT_S`, so that a restart
    after a crash waits for the SuperLink to let the old connection go. Raises
    :class:`ServiceError` when the venv lacks fl-imaging or Flower's commands, or (SuperLink)
    when ``register`` and ``database`` are both given: a kept database still holds the keys at
    the next start, and registering a key twice fails."""
    values = dict(values)
    for name in READ_FLAGS[role]:
        for path in _paths(values.get(name)):
            if not path.exists():
                flag = "--" + name.replace("_", "-")
                raise ServiceError(f"{path} ({flag}) not found: the service would not start")
    if role == "supernode":
        values["rejoin_wait"] = max(float(values.get("rejoin_wait") or 0.0), REJOIN_WAIT_S)
    if role == "superlink" and values.get("register") and values.get("database"):
        raise ServiceError(
            "--register with --database: the database keeps the admitted keys, and the "
            "service's next start would register them again, which the SuperLink refuses "
            "(Public key already in use). Register them once with `fl-imaging-deploy register` "
            "and leave --register out of the service"
        )
    state = Path(str(values["state"])).resolve()
    site = ""
    if role == "supernode":
        site = str(values.get("site_name") or Path(str(values["data_dir"])).resolve().name)
    read_only: list[Path] = []
    for name in READ_FLAGS[role]:
        read_only += _paths(values.get(name))
    rw = [state, *(Path(p).resolve() for p in writable)]
    database = values.get("database")
    if isinstance(database, Path):
        folder = (state / database).resolve().parent
        if folder != state and not folder.is_relative_to(state):
            rw.append(folder)
    if role == "superlink":
        description = (
            f"fl-imaging SuperLink on {values.get('host')}:{values.get('port')} (state {state})"
        )
    else:
        description = (
            f"fl-imaging SuperNode {site} (site folder {Path(str(values['data_dir'])).resolve()}, "
            f"SuperLink {values.get('superlink')})"
        )
    cache = state / "cache"
    return ServiceSpec(
        name=unit_name(role, site),
        description=description,
        executable=venv_command(venv),
        arguments=(role, *role_arguments(values, RELATIVE_FLAGS[role])),
        user=user,
        working_directory=state,
        writable=tuple(dict.fromkeys(rw)),
        read_only=tuple(dict.fromkeys(read_only)),
        path_dirs=tuple(flower_binaries(role, venv)),
        environment=(("XDG_CACHE_HOME", str(cache)), ("MPLCONFIGDIR", str(cache / "matplotlib"))),
        log_files=tuple(state / name for name in ROLE_LOGS[role]),
        restart=restart,
        restart_sec=restart_sec,
        generated_by=f"fl-imaging-deploy service {role}",
    )
