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

No command needs privileges; every path and port is an option. ``superlink``, ``supernode``
and ``local`` run in the foreground and stop everything they started (by PID, with children) on
Ctrl-C or SIGTERM.

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
from pathlib import Path
from types import FrameType

from fl_imaging.deploy.certs import (
    CertError,
    ServerCertificate,
    make_ca,
    make_server_certificate,
    make_site_key,
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
        f"next: fl-imaging-deploy superlink --certs {args.out} --port 9093 ..."
    )
    return 0


def _cmd_site_key(args: argparse.Namespace) -> int:
    key = make_site_key(args.out, args.name, force=args.force)
    print(
        f"private key: {key.private} (stays here; give it to fl-imaging-deploy supernode --key)\n"
        f"public key:  {key.public} (send this file to the coordinator, who registers it)"
    )
    return 0


def _certs_in(folder: Path) -> ServerCertificate:
    certs = ServerCertificate(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    missing = [str(p) for p in (certs.ca_cert, certs.cert, certs.key) if not p.is_file()]
    if missing:
        raise CertError(
            f"missing {', '.join(missing)}: create them with `fl-imaging-deploy ca --out {folder} "
            "--host <the SuperLink's address>`"
        )
    return certs


def _cmd_superlink(args: argparse.Namespace) -> int:
    certs = _certs_in(args.certs)
    link = start_superlink(certs, args.state, args.host, args.port, database=args.database)
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
    pull = sub.add_parser(
        "pull",
        help="researcher: fetch a finished run's result files from the SuperLink",
        description="Fetch the result files (metrics.csv, summary.txt, report.html, model.pt, "
        "...) a deployed run's ServerApp sent over its log, with `flwr log RUN_ID --show`, "
        "check each against the coordinator's manifest (size, SHA-256) and write them into "
        "--out. Exit 1 naming the file when any did not arrive intact.",
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
    pull.set_defaults(run=_cmd_pull)


def _check_site_files(args: argparse.Namespace) -> None:
    """Read the site's policy and its identity against the roster before anything starts: a
    wrong key or file stops here, named (PolicyError, IdentityError)."""
    from fl_imaging.site.identity import load_identity
    from fl_imaging.site.policy import load_policy

    if args.policy is not None:
        load_policy(args.policy)
    if args.roster is not None:
        load_identity(args.site_name or args.data_dir.name, args.key, args.roster)


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
    print(f"config hash (task and strategy, SHA-256): {training_config_hash(cfg)}")
    try:
        check_request(policy, cfg, training=True, masked=cfg.strategy.secagg.enabled)
    except PolicyRefusal as err:
        print(f"refused: {err}")
        return 1
    print(f"accepted by {args.policy} (rounds and privacy budget are checked as the run goes)")
    return 0


def _cmd_supernode(args: argparse.Namespace) -> int:
    _check_site_files(args)
    if not args.skip_check:
        print(f"checking {args.data_dir} (fl-imaging-data inspect) ...", flush=True)
        check_site_folder(args.data_dir, args.task, args.num_classes, args.class_names)
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
    )
    deadline = time.monotonic() + args.rejoin_wait
    while True:
        try:
            started = start_supernode(spec)
            break
        except RunnerError:  # the SuperLink accepted the node: its message says what failed
            raise
        except ProcessError as err:
            if "Failed to activate SuperNode" not in str(err) or time.monotonic() > deadline:
                raise ProcessError(
                    f"{err}\nThe SuperLink refused this SuperNode. If its public key is not "
                    "registered, ask the coordinator to run `fl-imaging-deploy register "
                    f"{args.key.with_suffix('.pub').name} ...`; after a crash, the SuperLink "
                    "counts a site as connected for up to 60 s (2 missed heartbeats): start "
                    "again then, or give --rejoin-wait 90."
                ) from None
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-imaging-deploy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ca = sub.add_parser("ca", help="coordinator: create the CA and the SuperLink's certificate")
    ca.add_argument("--out", type=Path, required=True, help="folder for ca.crt, server.pem, ...")
    ca.add_argument(
        "--host",
        action="append",
        default=[],
        help="an IP address or DNS name by which the SuperLink is reached (repeatable); "
        "127.0.0.1 and localhost are always included",
    )
    ca.add_argument("--days", type=int, default=3650, help="validity of the CA (days)")
    ca.add_argument("--force", action="store_true", help="replace existing files")
    ca.set_defaults(run=_cmd_ca)

    key = sub.add_parser("site-key", help="hospital: create this site's SuperNode key pair")
    key.add_argument("--name", required=True, help="site name, e.g. hospital-a")
    key.add_argument("--out", type=Path, default=Path("."), help="folder for NAME.key and NAME.pub")
    key.add_argument("--force", action="store_true", help="replace existing files")
    key.set_defaults(run=_cmd_site_key)

    link = sub.add_parser("superlink", help="coordinator: run the SuperLink (foreground)")
    link.add_argument("--certs", type=Path, required=True, help="folder made by `ca`")
    link.add_argument("--state", type=Path, default=Path("superlink-state"))
    link.add_argument("--host", default="0.0.0.0", help="interface to listen on")
    link.add_argument("--port", type=int, default=9093)
    link.add_argument(
        "--register", type=Path, nargs="*", default=[], help="sites' public keys to admit"
    )
    link.add_argument("--quiet", action="store_true", help="do not echo the SuperLink's log")
    link.add_argument("--database", type=Path, default=None, help=_DATABASE_HELP)
    link.set_defaults(run=_cmd_superlink)

    reg = sub.add_parser("register", help="coordinator: admit sites' public keys")
    reg.add_argument("keys", type=Path, nargs="+", help="NAME.pub files")
    reg.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    reg.add_argument("--ca", type=Path, required=True, help="the CA certificate (ca.crt)")
    reg.add_argument("--home", type=Path, default=None, help="Flower CLI home (default: temp)")
    reg.set_defaults(run=_cmd_register)

    node = sub.add_parser("supernode", help="hospital: check the data, run the SuperNode")
    node.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    node.add_argument("--ca", type=Path, required=True, help="the coordinator's ca.crt")
    node.add_argument("--key", type=Path, required=True, help="this site's private key")
    node.add_argument("--data-dir", type=Path, required=True, help="this site's folder")
    node.add_argument("--site-name", default="", help="default: the data folder's name")
    node.add_argument("--state", type=Path, default=Path("supernode-state"))
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
        "--port", type=int, default=9094, help="local port of the SuperNode's Runtime API"
    )
    node.add_argument(
        "--isolation",
        choices=ISOLATION_MODES,
        default="process",
        help=_ISOLATION_HELP,
    )
    node.add_argument("--task", choices=["segmentation", "classification"], default="segmentation")
    node.add_argument("--num-classes", type=int, default=2)
    node.add_argument("--class-names", default="")
    node.add_argument("--skip-check", action="store_true", help="do not run inspect first")
    node.add_argument(
        "--rejoin-wait",
        type=float,
        default=0.0,
        help="seconds to keep retrying when the SuperLink refuses this node (after a crash it "
        "counts the site as connected for up to 60 s)",
    )
    node.add_argument("--quiet", action="store_true", help="do not echo the SuperNode's log")
    node.set_defaults(run=_cmd_supernode)

    check = sub.add_parser(
        "check-policy", help="hospital: would this site's policy accept a run? (its config hash)"
    )
    check.add_argument("policy", type=Path, help="the site's policy file (site.yaml)")
    check.add_argument("overrides", nargs="*", help="the run's overrides, as given to fl-imaging")
    check.set_defaults(run=_cmd_check_policy)

    local = sub.add_parser("local", help="a SuperLink and N SuperNodes on this machine")
    local.add_argument("--sites", type=Path, nargs="*", help="site folders (default: demo)")
    local.add_argument("--demo", type=int, default=3, help="demo sites when no --sites")
    local.add_argument("--demo-cases", type=int, default=6)
    local.add_argument("--demo-shape", type=int, default=24)
    local.add_argument("--state", type=Path, default=None, help="default: a new temp folder")
    local.add_argument("--port", type=int, default=None, help="SuperLink port (default: free)")
    local.add_argument(
        "--isolation", choices=ISOLATION_MODES, default="process", help=_ISOLATION_HELP
    )
    local.add_argument("--task", choices=["segmentation", "classification"], default="segmentation")
    local.add_argument("--num-classes", type=int, default=2)
    local.add_argument("--skip-check", action="store_true", help="do not run inspect first")
    local.add_argument("--database", type=Path, default=None, help=_DATABASE_HELP)
    local.set_defaults(run=_cmd_local)
    _add_pull(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fl-imaging-deploy``; returns the exit code (2: a problem to fix)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        return int(args.run(args))
    except _Stop as stop:
        print(f"stopped ({stop})", file=sys.stderr)
        return 0
    except (CertError, ProcessError, SiteCheckError, ValueError) as err:
        print(f"fl-imaging-deploy: error: {err}", file=sys.stderr)
        return 2


def entry() -> None:
    """Console-script wrapper: exit with :func:`main`'s code."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
