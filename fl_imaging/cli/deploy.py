"""The ``fl-imaging-deploy`` command: run a federation across machines, or all of it on one.

Coordinator (the machine that runs the SuperLink)::

    fl-imaging-deploy ca --out certs --host 10.0.0.5 --host superlink.example.org
    fl-imaging-deploy superlink --certs certs --state superlink-state --host 0.0.0.0 \\
        --port 9093 --register keys/hospital-a.pub keys/hospital-b.pub
    fl-imaging-deploy register keys/hospital-c.pub --superlink 10.0.0.5:9093 --ca certs/ca.crt

Each hospital (gets ``ca.crt``, sends back only ``NAME.pub``)::

    fl-imaging-deploy site-key --name hospital-a --out keys
    fl-imaging-deploy supernode --superlink 10.0.0.5:9093 --ca ca.crt \\
        --key keys/hospital-a.key --data-dir /data/hospital-a --state node-state

Researcher::

    fl-imaging engine=deployment engine.superlink=10.0.0.5:9093 engine.root_certificates=ca.crt \\
        engine.num_sites=2 data=folders data.sites=[hospital-a,hospital-b] experiment=quick

Researcher, after the run (its result files, as the coordinator wrote them)::

    fl-imaging-deploy pull 4711 --superlink 10.0.0.5:9093 --ca ca.crt --out results

Everything on this machine (loopback), printing the ``fl-imaging`` command to run::

    fl-imaging-deploy local --sites /data/a /data/b /data/c     # or: --demo 3

No command needs privileges; every path and port is an option. Relative paths are taken from
the folder the command runs in; every path (and port) is checked before anything starts, and a
problem stops the command with exit 2 and a message naming the flag, the path and the fix.
``superlink``, ``supernode`` and ``local`` run in the foreground and stop everything they
started (by PID, with children) on Ctrl-C or SIGTERM.

A SuperNode's local Runtime API (``--port``, plain HTTP on 127.0.0.1) is closed to other local
users with ``--isolation process`` (the default): each start writes a new random secret
(``superexec-auth.secret`` in the state folder, mode 0600) that only the SuperNode and its
ClientApp process know (Flower's SuperExec authentication). With ``--isolation subprocess``
Flower ignores that secret and the port stays open: a warning says so.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType

from fl_imaging.deploy.certs import (
    CertError,
    ServerCertificate,
    make_ca,
    make_server_certificate,
    make_site_key,
)
from fl_imaging.deploy.inputs import (
    InputError,
    absolute,
    ca_certificate_file,
    certificate_file,
    existing_folder,
    free_port_or_fail,
    pem_private_key_file,
    public_key_file,
    reachable_or_fail,
    readable_file,
    site_private_key_file,
    tls_verified_or_fail,
    writable_folder,
)
from fl_imaging.deploy.processes import ManagedProcess, ProcessError, stop_all
from fl_imaging.deploy.roles import (
    ISOLATION_MODES,
    RunnerError,
    SiteCheckError,
    SuperNodeSpec,
    check_site_folder,
    register_site_keys,
    start_superlink,
    start_supernode,
)
from fl_imaging.deploy.start_errors import StartContext, start_cause

__all__ = ["entry", "main"]

log = logging.getLogger("fl_imaging.deploy")


class _Stop(Exception):
    """Raised in the main thread by SIGTERM or SIGINT: stop what was started, then exit."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _ignore_signals() -> None:
    """While stopping, a second Ctrl-C must not interrupt the stopping."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _follow(procs: list[ManagedProcess], echo: bool) -> int:
    """Wait until the first of ``procs`` exits (returns its exit code), echoing their logs to
    stdout when ``echo``. A signal ends the wait with :class:`_Stop`."""
    offsets = {p.name: 0 for p in procs}
    while True:
        if echo:
            for proc in procs:
                text = proc.log_text()
                if len(text) > offsets[proc.name]:
                    prefix = f"[{proc.name}] " if len(procs) > 1 else ""
                    for line in text[offsets[proc.name] :].splitlines():
                        print(prefix + line, flush=True)
                    offsets[proc.name] = len(text)
        for proc in procs:
            if not proc.alive():
                return int(proc.popen.returncode or 0)
        time.sleep(0.5)


def _cmd_ca(args: argparse.Namespace) -> int:
    ca_cert, _ = make_ca(args.out, days=args.days, force=args.force)
    server = make_server_certificate(args.out, args.out, args.host, force=args.force)
    print(
        f"CA: {ca_cert} (share it with every hospital and researcher) and {args.out / 'ca.key'} "
        f"(keep it secret)\nSuperLink certificate: {server.cert} and {server.key}, for "
        f"{', '.join(args.host) or 'loopback only'} (+ 127.0.0.1, localhost)\n"
        f"next: fl-imaging-deploy superlink --certs {args.typed['out']} --port 9093 ..."
    )
    return 0


def _cmd_site_key(args: argparse.Namespace) -> int:
    key = make_site_key(args.out, args.name, force=args.force)
    print(
        f"private key: {key.private} (stays here; give it to fl-imaging-deploy supernode --key)\n"
        f"public key:  {key.public} (send this file to the coordinator, who registers it)"
    )
    return 0


def _cmd_he_key(args: argparse.Namespace) -> int:
    """Make the consortium's homomorphic encryption key file (``strategy.he.enabled=true``)."""
    from fl_imaging.he.ckks import HEUnavailable
    from fl_imaging.he.keys import load_key, write_key_file

    try:
        path = write_key_file(args.out, force=args.force)
    except HEUnavailable as err:  # an ImportError: said as a problem to fix
        raise ValueError(str(err)) from None
    print(
        f"consortium key {load_key(path).key_id}: {path} (secret: copy it to every site over "
        "a channel the consortium trusts, give it to fl-imaging-deploy supernode --he-key; "
        "never to the coordinator)"
    )
    return 0


def _explained(err: ProcessError, ctx: StartContext) -> ProcessError:
    """``err`` with the cause Flower's log names (:func:`start_cause`) in front, or as it is
    when the log names none."""
    cause = start_cause(err.log_text, ctx)
    if cause is None:
        return err
    return ProcessError(f"the {ctx.role} did not start: {cause}.\n{err}", err.log_text)


def _cmd_superlink(args: argparse.Namespace) -> int:
    certs = args.server_certificate
    ctx = StartContext("superlink", args.port, certs=args.typed["certs"], state=args.typed["state"])
    try:
        link = start_superlink(certs, args.state, args.host, args.port, database=args.database)
    except ProcessError as err:
        raise _explained(err, ctx) from None
    try:
        address = f"{'127.0.0.1' if args.host in ('0.0.0.0', '') else args.host}:{args.port}"
        if args.register:
            register_site_keys(args.register, address, certs.ca_cert, args.state / "flwr-cli")
        print(
            f"SuperLink on {args.host}:{args.port} (TLS, SuperNode authentication), state and "
            f"log in {args.state}; Ctrl-C stops it",
            flush=True,
        )
        return _follow([link], echo=not args.quiet)
    finally:
        _ignore_signals()
        stop_all([link])


def _cmd_register(args: argparse.Namespace) -> int:
    home = args.home or Path(tempfile.mkdtemp(prefix="flwr-cli-"))
    ids = register_site_keys(args.keys, args.superlink, args.ca, home)
    for key, node_id in ids.items():
        print(f"{key}: SuperNode {node_id} registered")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from fl_imaging.deploy.pull import pull_results
    from fl_imaging.review.result_transfer import ResultTransferError

    out = args.out or Path(f"run-{args.run_id}")
    receiver = pull_results(args.run_id, args.superlink, args.ca, out)
    try:
        names = receiver.finish()
    except ResultTransferError as err:
        print(f"fl-imaging-deploy: error: {err}", file=sys.stderr)
        return 1
    print(f"run {args.run_id}: {len(names)} file(s) in {out}, SHA-256 checked: {', '.join(names)}")
    for reason in receiver.withheld:
        print(f"not sent by the coordinator: {reason}", file=sys.stderr)
    return 0


def _add_pull(sub: argparse._SubParsersAction) -> None:
    """The ``pull`` subcommand: a finished run's result files, from the SuperLink."""
    pull = _sub(
        sub,
        "pull",
        "researcher: fetch a finished run's result files from the SuperLink",
        "fl-imaging-deploy pull 4821 --superlink 10.0.0.5:9093 --ca certs/ca.crt --out run-4821",
        note="Fetches the result files (metrics.csv, summary.txt, report.html, model.pt, ...) a "
        "deployed run's ServerApp sent over its log,\nwith `flwr log RUN_ID --show`, checks each "
        "against the coordinator's manifest (size, SHA-256) and writes them into --out.\nExit 1 "
        "naming the file when any did not arrive intact.",
    )
    pull.add_argument("run_id", type=int, help="the Flower run id (fl-imaging logs it; flwr ls)")
    pull.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    pull.add_argument(
        "--ca",
        type=Path,
        default=None,
        help="the coordinator's ca.crt (without: plain text, loopback trials only)",
    )
    pull.add_argument(
        "--out", type=Path, default=None, help="folder for the files (default: run-RUN_ID)"
    )
    pull.set_defaults(run=_cmd_pull, check=_check_pull)


def _check_site_files(args: argparse.Namespace) -> None:
    """Read the site's policy and its identity against the roster before anything starts: a
    wrong key or file stops here, named (PolicyError, IdentityError)."""
    from fl_imaging.site.identity import load_identity
    from fl_imaging.site.policy import load_policy

    if args.policy is not None:
        load_policy(args.policy)
    if args.roster is not None:
        load_identity(args.site_name or args.data_dir.name, args.key, args.roster)
    if args.he_key is not None:
        from fl_imaging.he.ckks import HEUnavailable
        from fl_imaging.he.keys import load_key

        try:
            load_key(args.he_key)
        except HEUnavailable as err:
            raise ValueError(str(err)) from None


def _cmd_check_policy(args: argparse.Namespace) -> int:
    """Print the config hash of a run (``-- overrides``) and whether the policy accepts it."""
    from fl_imaging.config.compose import check_overrides
    from fl_imaging.site.policy import (
        PolicyRefusal,
        check_request,
        load_policy,
        training_config_hash,
    )

    policy = load_policy(args.policy)
    cfg = check_overrides(list(args.overrides))
    if cfg.task.bundle is not None:  # task=bundle: its files read as data, nothing of it run
        from tasks.bundle_files import with_bundle_settings

        cfg = replace(cfg, task=with_bundle_settings(cfg.task))
        print(f"bundle {cfg.task.bundle} (SHA-256): {cfg.task.bundle_sha256}")
    print(f"config hash (task and strategy, SHA-256): {training_config_hash(cfg)}")
    try:
        check_request(
            policy,
            cfg,
            training=True,
            masked=cfg.strategy.secagg.enabled,
            encrypted=cfg.strategy.he.enabled,
        )
    except PolicyRefusal as err:
        print(f"refused: {err}")
        return 1
    policy_typed = args.typed["policy"]
    print(f"accepted by {policy_typed} (rounds and privacy budget are checked as the run goes)")
    return 0


def _cmd_supernode(args: argparse.Namespace) -> int:
    _check_site_files(args)
    if not args.skip_check:
        print(f"checking {args.data_dir} (fl-imaging-data inspect) ...", flush=True)
        check_site_folder(
            args.data_dir, args.task, args.num_classes, args.class_names, args.modalities
        )
    spec = SuperNodeSpec(
        data_dir=args.data_dir,
        superlink=args.superlink,
        ca_cert=args.ca,
        private_key=args.key,
        state_dir=args.state,
        site_name=args.site_name,
        runtime_port=args.port,
        isolation=args.isolation,
        roster=args.roster,
        policy=args.policy,
        he_key=args.he_key,
    )
    ctx = StartContext(
        "supernode",
        args.port,
        superlink=args.superlink,
        ca=args.typed["ca"],
        key=args.typed["key"],
        state=args.typed["state"],
    )
    deadline = time.monotonic() + args.rejoin_wait
    while True:
        try:
            started = start_supernode(spec)
            break
        except RunnerError:  # the SuperLink accepted the node: its message says what failed
            raise
        except ProcessError as err:
            refused = "Failed to activate SuperNode" in err.log_text
            if not refused or time.monotonic() > deadline:
                raise _explained(err, ctx) from None
            print("refused for now (still counted as connected?): retrying in 10 s", flush=True)
            time.sleep(10)
    try:
        print(
            f"SuperNode {spec.name} connected to {args.superlink}, reading {args.data_dir}; "
            "Ctrl-C stops it",
            flush=True,
        )
        return _follow(started, echo=not args.quiet)
    finally:
        _ignore_signals()
        stop_all(started)


_SERVICE_HELP = """\
Print (or write with --out) the systemd unit that runs `fl-imaging-deploy ROLE` as a service:
restarted 10 s after it exits, started at boot once enabled, logging to the journal, as an
ordinary user, with the file system read-only except the state folder. ROLE's own flags follow
ROLE, as `fl-imaging-deploy ROLE --help` lists them, and are checked as ROLE checks them (the
certificates; the site's key, policy, roster and folder). Paths become absolute from the
current folder. A SuperNode is one unit: `fl-imaging-deploy supernode` stops the SuperNode and
its ClientApp runner together when either exits, and systemd starts both again.

  fl-imaging-deploy service supernode --user flsite --venv /opt/fl-imaging/venv --out units \\
      --superlink 10.0.0.5:9093 --ca ca.crt --key keys/hospital-a.key --data-dir /data/a \\
      --state /srv/fl/node-state
"""


def _add_service_options(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """The options of ``service`` itself (not ROLE's); with ``suppress``, no defaults (to pick
    them out of the flags after ROLE)."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--user", default=default(None), help="the account the service runs as (default: you)"
    )
    parser.add_argument(
        "--venv",
        type=Path,
        default=default(Path(sys.prefix)),
        help="the virtual environment fl-imaging and flwr are installed in (default: this one)",
    )
    parser.add_argument(
        "--out", type=Path, default=default(None), help="write NAME.service here (default: print)"
    )
    parser.add_argument(
        "--writable",
        type=Path,
        action="append",
        default=default([]),
        help="another folder the service may write, e.g. the run folders a SuperLink's "
        "ServerApp writes (repeatable)",
    )


def _cmd_service(args: argparse.Namespace) -> int:
    """Make the unit of ``args.role`` from the role's flags after it (see :data:`_SERVICE_HELP`)."""
    import shlex

    from fl_imaging.deploy.services import render_unit, resolve_user, role_service, write_units

    inner = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_service_options(inner, suppress=True)
    own, rest = inner.parse_known_args(args.role_flags)
    for name, value in vars(own).items():
        setattr(args, name, args.writable + value if name == "writable" else value)
    role = _parser().parse_args([args.role, *rest])
    check_inputs(role, network=False)  # the unit's own start checks ports and the SuperLink
    if role.command != "superlink":
        _check_site_files(role)
        if not role.skip_check:
            print(f"checking {role.data_dir} (fl-imaging-data inspect) ...", file=sys.stderr)
            check_site_folder(
                role.data_dir, role.task, role.num_classes, role.class_names, role.modalities
            )
    for folder in args.writable:
        if not folder.is_dir():
            raise ValueError(f"{folder} (--writable) is not a folder: create it first")
    user = resolve_user(args.user)
    internal = ("command", "run", "check", "typed", "network_checks", "server_certificate")
    values = {k: v for k, v in vars(role).items() if k not in internal}
    spec = role_service(
        role.command, values, user=user.pw_name, venv=args.venv, writable=args.writable
    )
    state = spec.working_directory
    state.mkdir(parents=True, exist_ok=True)
    if state.stat().st_uid != user.pw_uid:
        print(
            f"note: {state} belongs to another user: "
            f"chown -R {user.pw_name} {shlex.quote(str(state))}",
            file=sys.stderr,
        )
    if args.out is None:
        print(render_unit(spec), end="")
        return 0
    for path in write_units([spec], args.out):
        print(
            f"wrote {path}; as root: cp {path} /etc/systemd/system/ && systemctl daemon-reload "
            f"&& systemctl enable --now {spec.name}; logs: journalctl -u {spec.name} -f"
        )
    return 0


def _cmd_local(args: argparse.Namespace) -> int:
    from fl_imaging.deploy.local import start_local

    state = args.state or Path(tempfile.mkdtemp(prefix="fl-imaging-local-"))
    sites: list[Path] = list(args.sites or [])
    if not sites:
        from fl_imaging.data.demo import make_demo_data

        sites = make_demo_data(
            state / "demo-data",
            num_sites=args.demo,
            cases_per_site=args.demo_cases,
            shape=(args.demo_shape,) * 3,
            dicom_sites=(),
        )
    print(f"starting a SuperLink and {len(sites)} SuperNode(s) on 127.0.0.1, state in {state}")
    federation = start_local(
        sites,
        state,
        port=args.port,
        isolation=args.isolation,
        check=not args.skip_check,
        task=args.task,
        num_classes=args.num_classes,
        database=args.database,
    )
    try:
        print("\nready. Logs:")
        for proc in federation.processes:
            print(f"  {proc.name:24} pid {proc.pid:7}  {proc.log_path}")
        edge = args.demo_shape
        overrides = (
            [] if args.sites else ["experiment=quick", f"task.roi_size=[{edge},{edge},{edge}]"]
        )
        print(f"\nrun an experiment on it:\n  {federation.command_line(*overrides)}\n")
        print("Ctrl-C (or SIGTERM) stops everything.", flush=True)
        while True:
            for name, started in federation.site_processes.items():
                for proc in started:
                    if not proc.alive() and proc.popen.returncode is not None:
                        print(
                            f"{proc.name} exited ({proc.popen.returncode}); see {proc.log_path}",
                            flush=True,
                        )
                federation.site_processes[name] = [p for p in started if p.alive()]
            if not federation.superlink_process.alive():
                print(f"the SuperLink exited; see {federation.superlink_process.log_path}")
                return 1
            time.sleep(1.0)
    finally:
        _ignore_signals()
        print("stopping every process ...", flush=True)
        federation.stop()


_DATABASE_HELP = (
    "keep the SuperLink's state (registered sites, runs, messages) in this SQLite file, relative "
    "to --state, so that it survives a restart; default: in memory (faster: every array of "
    "every message is written otherwise)"
)


_ISOLATION_HELP = (
    "process (default): one long-lived ClientApp process per SuperNode (data decoded once), the "
    "only holder of the SuperNode's secret, so other local users cannot take the site's tasks "
    "from its --port; subprocess: Flower's default, a new process per message, and that port is "
    "open to every local user (Flower ignores the secret then)"
)

_PATHS_NOTE = "Relative paths are taken from the folder the command runs in."
_CA_FIX = "Give the CA certificate (ca.crt) that the coordinator shared."
_KEY_FIX = (
    "Give this site's private key NAME.key, made by `fl-imaging-deploy site-key --name NAME "
    "--out keys` (its .pub goes to the coordinator)."
)
_PUB_FIX = "Give a site's public key NAME.pub, made by `fl-imaging-deploy site-key`."
_REACH_FIX = (
    "Check that the SuperLink runs (`fl-imaging-deploy superlink` on the coordinator), its "
    "address and port, and that no firewall blocks that port from this machine."
)


def _folder_fix(flag: str) -> str:
    return f"Give a {flag} folder this user can create and write."


def _check_ca(args: argparse.Namespace) -> None:
    args.out = writable_folder("--out", args.out, _folder_fix("--out"))


def _check_site_key(args: argparse.Namespace) -> None:
    args.out = writable_folder("--out", args.out, _folder_fix("--out"))


def _check_he_key(args: argparse.Namespace) -> None:
    args.out = absolute(args.out)
    writable_folder("--out", args.out.parent, _folder_fix("--out"))


def _check_superlink(args: argparse.Namespace) -> None:
    typed = args.certs
    fix = f"Create its files with `fl-imaging-deploy ca --out {typed} --host <SuperLink address>`."
    folder = existing_folder("--certs", typed, fix)
    args.server_certificate = ServerCertificate(
        ca_certificate_file("--certs", typed / "ca.crt", fix),
        certificate_file("--certs", typed / "server.pem", fix),
        pem_private_key_file("--certs", typed / "server.key", fix),
    )
    args.certs = folder
    args.state = writable_folder("--state", args.state, _folder_fix("--state"))
    args.register = [public_key_file("--register", key, _PUB_FIX) for key in args.register]
    if not args.network_checks:
        return
    free_port_or_fail(
        "--port",
        args.host,
        args.port,
        "Stop what listens there, or give --port another number (and the sites the new one).",
    )


def _check_register(args: argparse.Namespace) -> None:
    args.keys = [public_key_file("NAME.pub", key, _PUB_FIX) for key in args.keys]
    args.ca = ca_certificate_file("--ca", args.ca, "Give the CA certificate, certs/ca.crt.")
    if args.home is not None:
        args.home = writable_folder("--home", args.home, _folder_fix("--home"))
    reachable_or_fail("--superlink", args.superlink, _REACH_FIX)
    tls_verified_or_fail("--superlink", args.superlink, args.ca, args.typed["ca"])


def _check_supernode(args: argparse.Namespace) -> None:
    args.ca = ca_certificate_file("--ca", args.ca, _CA_FIX)
    args.key = site_private_key_file("--key", args.key, _KEY_FIX)
    args.data_dir = existing_folder(
        "--data-dir", args.data_dir, "Give this site's data folder (fl-imaging-data inspect)."
    )
    args.state = writable_folder("--state", args.state, _folder_fix("--state"))
    if args.roster is not None:
        args.roster = existing_folder(
            "--roster", args.roster, "Give the folder of the consortium's NAME.pub files."
        )
    if args.policy is not None:
        args.policy = readable_file("--policy", args.policy, "Give this site's site.yaml.")
    if args.he_key is not None:
        args.he_key = readable_file(
            "--he-key", args.he_key, "Give the consortium's key file (fl-imaging-deploy he-key)."
        )
    if not args.network_checks:
        return
    free_port_or_fail(
        "--port",
        "127.0.0.1",
        args.port,
        f"Give this SuperNode its own --port, e.g. --port {args.port + 1} (two SuperNodes on "
        "one host each need their own).",
    )
    reachable_or_fail("--superlink", args.superlink, _REACH_FIX)
    tls_verified_or_fail("--superlink", args.superlink, args.ca, args.typed["ca"])


def _check_check_policy(args: argparse.Namespace) -> None:
    args.policy = readable_file("policy", args.policy, "Give this site's site.yaml.")


def _check_local(args: argparse.Namespace) -> None:
    fix = "Give site folders that exist (or --demo N for demo data)."
    args.sites = [existing_folder("--sites", site, fix) for site in args.sites or []]
    if args.state is not None:
        args.state = writable_folder("--state", args.state, _folder_fix("--state"))
    if args.port is not None:
        free_port_or_fail("--port", "127.0.0.1", args.port, "Give another --port, or none.")


def _check_pull(args: argparse.Namespace) -> None:
    if args.ca is not None:
        args.ca = ca_certificate_file("--ca", args.ca, "Give the CA certificate, certs/ca.crt.")
    if args.out is not None:
        args.out = writable_folder("--out", args.out, _folder_fix("--out"))
    reachable_or_fail("--superlink", args.superlink, _REACH_FIX)
    if args.ca is not None:
        tls_verified_or_fail("--superlink", args.superlink, args.ca, args.typed["ca"])


def _check_service(args: argparse.Namespace) -> None:
    # the role's own flags are checked by _cmd_service, with the role's checks
    if args.out is not None:
        args.out = writable_folder("--out", args.out, _folder_fix("--out"))


def check_inputs(args: argparse.Namespace, network: bool = True) -> None:
    """Resolve every path of ``args`` against the current working directory and check it (and,
    with ``network``, that the ports are free and the SuperLink answers) for the subcommand:
    the paths as typed go to ``args.typed`` (flag -> text), the absolute ones replace them.
    Raises :class:`InputError` naming the flag, the path and the fix."""
    args.typed = {k: str(v) for k, v in vars(args).items() if isinstance(v, Path)}
    args.network_checks = network
    args.check(args)


def _sub(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    name: str,
    help_text: str,
    example: str,
    note: str = "",
) -> argparse.ArgumentParser:
    """A subcommand whose help ends with ``note`` (if any), the note on relative paths and one
    example."""
    epilog = "\n\n".join(filter(None, [note, _PATHS_NOTE, f"example:\n  {example}"]))
    return sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-imaging-deploy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ca = _sub(
        sub,
        "ca",
        "coordinator: create the CA and the SuperLink's certificate",
        "fl-imaging-deploy ca --out certs --host 10.0.0.5 --host superlink.example.org",
    )
    ca.add_argument(
        "--out", type=Path, required=True, help="folder for ca.crt, ca.key, server.pem, server.key"
    )
    ca.add_argument(
        "--host",
        action="append",
        default=[],
        help="an IP address or DNS name by which the SuperLink is reached (repeatable); "
        "127.0.0.1 and localhost are always included",
    )
    ca.add_argument("--days", type=int, default=3650, help="validity of the CA (days)")
    ca.add_argument("--force", action="store_true", help="replace existing files")
    ca.set_defaults(run=_cmd_ca, check=_check_ca)

    key = _sub(
        sub,
        "site-key",
        "hospital: create this site's SuperNode key pair",
        "fl-imaging-deploy site-key --name hospital-a --out keys",
    )
    key.add_argument("--name", required=True, help="site name, e.g. hospital-a")
    key.add_argument(
        "--out", type=Path, default=Path("."), help="folder for NAME.key and NAME.pub (default: .)"
    )
    key.add_argument("--force", action="store_true", help="replace existing files")
    key.set_defaults(run=_cmd_site_key, check=_check_site_key)

    he_key = _sub(
        sub,
        "he-key",
        "consortium: create the homomorphic encryption key every site holds",
        "fl-imaging-deploy he-key --out consortium.he-key",
        note="The file holds the secret key: copy it to every site over a channel the "
        "consortium trusts (as the sites' certificates), never to the coordinator.",
    )
    he_key.add_argument("--out", type=Path, required=True, help="the key file to write")
    he_key.add_argument("--force", action="store_true", help="replace an existing file")
    he_key.set_defaults(run=_cmd_he_key, check=_check_he_key)

    link = _sub(
        sub,
        "superlink",
        "coordinator: run the SuperLink (foreground)",
        "fl-imaging-deploy superlink --certs certs --state superlink-state --host 0.0.0.0 "
        "--port 9093 \\\n      --register keys/hospital-a.pub keys/hospital-b.pub",
    )
    link.add_argument(
        "--certs", type=Path, required=True, help="folder made by `ca` (ca.crt, server.pem, ...)"
    )
    link.add_argument(
        "--state",
        type=Path,
        default=Path("superlink-state"),
        help="folder for the SuperLink's log and Flower home (default: superlink-state)",
    )
    link.add_argument(
        "--host", default="0.0.0.0", help="interface to listen on (default: 0.0.0.0, all)"
    )
    link.add_argument(
        "--port",
        type=int,
        default=9093,
        help="port of the SuperLink, for SuperNodes and researchers alike (default: 9093)",
    )
    link.add_argument(
        "--register",
        type=Path,
        nargs="*",
        default=[],
        help="sites' public keys (NAME.pub) to admit",
    )
    link.add_argument("--quiet", action="store_true", help="do not echo the SuperLink's log")
    link.add_argument("--database", type=Path, default=None, help=_DATABASE_HELP)
    link.set_defaults(run=_cmd_superlink, check=_check_superlink)

    reg = _sub(
        sub,
        "register",
        "coordinator: admit sites' public keys to a running SuperLink",
        "fl-imaging-deploy register keys/hospital-c.pub --superlink 10.0.0.5:9093 "
        "--ca certs/ca.crt",
    )
    reg.add_argument("keys", type=Path, nargs="+", help="NAME.pub files")
    reg.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    reg.add_argument("--ca", type=Path, required=True, help="the CA certificate (certs/ca.crt)")
    reg.add_argument("--home", type=Path, default=None, help="Flower CLI home (default: temp)")
    reg.set_defaults(run=_cmd_register, check=_check_register)

    node = _sub(
        sub,
        "supernode",
        "hospital: check the data, run the SuperNode (foreground)",
        "fl-imaging-deploy supernode --superlink 10.0.0.5:9093 --ca ca.crt "
        "--key keys/hospital-a.key \\\n      --data-dir /data/hospital-a --num-classes 2 "
        "--state node-state --port 9094",
        note="Two SuperNodes on one host each need their own --port (and --state).",
    )
    node.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    node.add_argument("--ca", type=Path, required=True, help="the coordinator's ca.crt")
    node.add_argument("--key", type=Path, required=True, help="this site's private key NAME.key")
    node.add_argument("--data-dir", type=Path, required=True, help="this site's data folder")
    node.add_argument("--site-name", default="", help="default: the data folder's name")
    node.add_argument(
        "--state",
        type=Path,
        default=Path("supernode-state"),
        help="the site's own folder: privacy ledger, site record, logs, secret (keep it across "
        "restarts; default: supernode-state)",
    )
    node.add_argument(
        "--roster",
        type=Path,
        default=None,
        help="folder of the consortium's NAME.pub files (needed for secure aggregation)",
    )
    node.add_argument(
        "--policy", type=Path, default=None, help="this site's policy file (site.yaml)"
    )
    node.add_argument(
        "--he-key",
        type=Path,
        default=None,
        help="the consortium's homomorphic encryption key file (fl-imaging-deploy he-key; "
        "needed for strategy.he.enabled=true)",
    )
    node.add_argument(
        "--port",
        type=int,
        default=9094,
        help="local port (127.0.0.1) of the SuperNode's Runtime API; each SuperNode on a host "
        "needs its own (default: 9094)",
    )
    node.add_argument(
        "--isolation",
        choices=ISOLATION_MODES,
        default="process",
        help=_ISOLATION_HELP,
    )
    node.add_argument(
        "--task",
        choices=["segmentation", "classification"],
        default="segmentation",
        help="the consortium's task, for the data check (default: segmentation)",
    )
    node.add_argument(
        "--num-classes",
        type=int,
        default=2,
        help="classes of the task, background included, for the data check (default: 2)",
    )
    node.add_argument(
        "--class-names", default="", help="comma-separated class names, for the data check"
    )
    node.add_argument(
        "--modalities",
        default="",
        help="multi-modal cases: the consortium's data.modalities, comma-separated (e.g. "
        "t1,t1c,t2,flair: images/MODALITY/CASE_ID.nii.gz), for the data check",
    )
    node.add_argument("--skip-check", action="store_true", help="do not run inspect first")
    node.add_argument(
        "--rejoin-wait",
        type=float,
        default=0.0,
        help="seconds to keep retrying when the SuperLink refuses this node (after a crash it "
        "counts the site as connected for up to 60 s)",
    )
    node.add_argument("--quiet", action="store_true", help="do not echo the SuperNode's log")
    node.set_defaults(run=_cmd_supernode, check=_check_supernode)

    check = _sub(
        sub,
        "check-policy",
        "hospital: would this site's policy accept a run? (its config hash)",
        "fl-imaging-deploy check-policy site.yaml experiment=quick",
    )
    check.add_argument("policy", type=Path, help="the site's policy file (site.yaml)")
    check.add_argument("overrides", nargs="*", help="the run's overrides, as given to fl-imaging")
    check.set_defaults(run=_cmd_check_policy, check=_check_check_policy)

    local = _sub(
        sub,
        "local",
        "a SuperLink and N SuperNodes on this machine (loopback)",
        "fl-imaging-deploy local --demo 3",
    )
    local.add_argument("--sites", type=Path, nargs="*", help="site folders (default: demo)")
    local.add_argument("--demo", type=int, default=3, help="demo sites when no --sites")
    local.add_argument("--demo-cases", type=int, default=6, help="cases per demo site")
    local.add_argument("--demo-shape", type=int, default=24, help="edge of a demo volume (voxels)")
    local.add_argument("--state", type=Path, default=None, help="default: a new temp folder")
    local.add_argument("--port", type=int, default=None, help="SuperLink port (default: free)")
    local.add_argument(
        "--isolation", choices=ISOLATION_MODES, default="process", help=_ISOLATION_HELP
    )
    local.add_argument(
        "--task",
        choices=["segmentation", "classification"],
        default="segmentation",
        help="the task, for the data check (default: segmentation)",
    )
    local.add_argument(
        "--num-classes", type=int, default=2, help="classes, for the data check (default: 2)"
    )
    local.add_argument("--skip-check", action="store_true", help="do not run inspect first")
    local.add_argument("--database", type=Path, default=None, help=_DATABASE_HELP)
    local.set_defaults(run=_cmd_local, check=_check_local)
    _add_service_parser(sub)
    _add_pull(sub)
    return parser


def _add_service_parser(sub: argparse._SubParsersAction) -> None:
    """The ``service`` subcommand (see :data:`_SERVICE_HELP`)."""
    service = sub.add_parser(
        "service",
        help="coordinator or hospital: the systemd unit that runs superlink or supernode",
        description=_SERVICE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_service_options(service)
    service.add_argument("role", choices=["superlink", "supernode"])
    service.add_argument(
        "role_flags",
        nargs=argparse.REMAINDER,
        metavar="ROLE FLAGS",
        help="the flags of `fl-imaging-deploy ROLE` (and the options above)",
    )
    service.set_defaults(run=_cmd_service, check=_check_service)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fl-imaging-deploy``; returns the exit code (2: a problem to fix)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        check_inputs(args)
        return int(args.run(args))
    except _Stop as stop:
        print(f"stopped ({stop})", file=sys.stderr)
        return 0
    except (CertError, InputError, ProcessError, SiteCheckError, ValueError) as err:
        print(f"fl-imaging-deploy: error: {err}", file=sys.stderr)
        return 2


def entry() -> None:
    """Console-script wrapper: exit with :func:`main`'s code."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
