"""What an admin types into ``fl-imaging-deploy``: paths resolved against the folder the command
runs in and checked before anything starts (deploy/inputs.py, the checks of cli/deploy.py), one
test per documented wrong input, in-process (argparse and the checks, no Flower process) except
the unregistered key, which only a real SuperLink can refuse."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_runs import run_cli

from fl_imaging.cli.deploy import _parser, check_inputs
from fl_imaging.deploy.certs import make_ca, make_server_certificate, make_site_key
from fl_imaging.deploy.inputs import InputError
from fl_imaging.deploy.local import LocalFederation
from fl_imaging.deploy.processes import free_port
from fl_imaging.deploy.roles import SuperNodeSpec, superlink_command, supernode_command


@pytest.fixture
def listener() -> Iterator[str]:
    """Something that accepts connections on 127.0.0.1 (a stand-in for a SuperLink's port):
    its HOST:PORT."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def admin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The admin's folder, the working directory: ``certs/`` (CA and the SuperLink's
    certificate), ``keys/hospital-a.{key,pub}``, ``data/hospital-a/``."""
    make_ca(tmp_path / "certs")
    make_server_certificate(tmp_path / "certs", tmp_path / "certs", ["127.0.0.1"])
    make_site_key(tmp_path / "keys", "hospital-a")
    (tmp_path / "data" / "hospital-a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@contextlib.contextmanager
def _tls_server(admin: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """A TLS server on the loopback address ``host`` with the SuperLink's certificate of
    ``admin`` (signed by its CA; it lists 127.0.0.1 and localhost): it completes each handshake
    and closes, a stand-in for a SuperLink; yields its HOST:PORT; its thread stops on leaving."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(admin / "certs" / "server.pem", admin / "certs" / "server.key")
    done = threading.Event()
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen()
    sock.settimeout(0.2)

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            try:
                conn.settimeout(5)
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()  # a client that refused the certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"{host}:{sock.getsockname()[1]}"
    finally:
        done.set()
        thread.join(timeout=5)
        sock.close()


@pytest.fixture
def tls_listener(admin: Path) -> Iterator[str]:
    """:func:`_tls_server` on 127.0.0.1 for the test: its HOST:PORT."""
    with _tls_server(admin) as address:
        yield address


def _checked(*argv: str) -> argparse.Namespace:
    args = _parser().parse_args(list(argv))
    check_inputs(args)
    return args


def _supernode(superlink: str, *changed: str) -> list[str]:
    """``supernode`` arguments with relative paths, ``changed`` (flag, value pairs) replacing
    or adding to them."""
    given = {
        "--superlink": superlink,
        "--ca": "certs/ca.crt",
        "--key": "keys/hospital-a.key",
        "--data-dir": "data/hospital-a",
        "--state": "node-state",
        "--port": str(free_port()),
    }
    given.update(dict(zip(changed[::2], changed[1::2], strict=True)))
    return ["supernode", *(part for item in given.items() for part in item)]


def _refused(argv: list[str]) -> str:
    with pytest.raises(InputError) as caught:
        _checked(*argv)
    return str(caught.value)


def test_missing_certificate_names_flag_typed_and_absolute_path_and_fix(
    admin: Path, listener: str
) -> None:
    message = _refused(_supernode(listener, "--ca", "ca.crt"))
    assert message.startswith(f"--ca ca.crt ({admin / 'ca.crt'}): no such file.")
    assert "Give the CA certificate (ca.crt) that the coordinator shared." in message
    (admin / "certs" / "server.pem").unlink()
    message = _refused(["superlink", "--certs", "certs", "--port", str(free_port())])
    assert f"--certs certs/server.pem ({admin / 'certs' / 'server.pem'}): no such file" in message
    assert "fl-imaging-deploy ca --out certs" in message


def test_ca_that_is_a_key(admin: Path, listener: str) -> None:
    message = _refused(_supernode(listener, "--ca", "keys/hospital-a.key"))
    assert message.startswith("--ca keys/hospital-a.key (")
    assert "is a private key, not a certificate" in message
    message = _refused(_supernode(listener, "--ca", "keys/hospital-a.pub"))
    assert "is a SuperNode's public key, not a certificate" in message


def test_garbage_key_and_the_public_key_given_as_key(admin: Path, listener: str) -> None:
    (admin / "keys" / "garbage.key").write_text("not a key\n")
    message = _refused(_supernode(listener, "--key", "keys/garbage.key"))
    assert "--key keys/garbage.key (" in message and "is not an OpenSSH private key" in message
    message = _refused(_supernode(listener, "--key", "keys/hospital-a.pub"))
    assert "is the public key (.pub), not the private key" in message
    message = _refused(_supernode(listener, "--key", "certs/ca.crt"))
    assert "is a certificate, not a private key" in message
    message = _refused(["register", "keys/hospital-a.key", "--superlink", listener, "--ca", "x"])
    assert "is a private key: send and register the .pub" in message


def test_a_certificate_that_is_not_a_ca_and_an_expired_ca(admin: Path, listener: str) -> None:
    """The SuperLink's own server.pem given as --ca, and a CA certificate past its date: each
    refused with its own cause before anything starts."""
    message = _refused(_supernode(listener, "--ca", "certs/server.pem"))
    assert message.startswith("--ca certs/server.pem (") and "not a CA's" in message
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "old CA")])
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    old = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(past)
        .not_valid_after(past + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    (admin / "old-ca.crt").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    message = _refused(_supernode(listener, "--ca", "old-ca.crt"))
    assert "--ca old-ca.crt (" in message and "expired on 2020-01-31" in message


def test_the_superlink_is_checked_over_tls_before_the_supernode_starts(
    admin: Path, listener: str, tls_listener: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """What answers at --superlink is asked for its certificate before flower-supernode
    starts: something that accepts connections but never answers a TLS handshake, a
    certificate another CA signed, and one that does not list the address typed each get
    their own cause; the right CA and address pass."""
    message = _refused(_supernode(listener))
    assert message.startswith(f"--superlink {listener}: the TLS handshake did not finish")
    other = tmp_path_factory.mktemp("other-ca")
    make_ca(other)
    message = _refused(_supernode(tls_listener, "--ca", str(other / "ca.crt")))
    assert f"does not verify against --ca {other / 'ca.crt'}" in message
    assert "that CA did not sign it" in message
    with _tls_server(admin, "127.0.0.2") as unlisted:  # loopback, not in the certificate
        message = _refused(_supernode(unlisted))
    assert "the SuperLink's certificate does not list the address 127.0.0.2" in message
    assert "fl-imaging-deploy ca --out certs --host 127.0.0.2 --force" in message
    assert _checked(*_supernode(tls_listener)).ca == admin / "certs" / "ca.crt"


def test_port_taken(admin: Path, listener: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = str(taken.getsockname()[1])
        message = _refused(_supernode(listener, "--port", port))
        assert message.startswith(f"--port {port}: 127.0.0.1:{port} is in use already")
        assert "Give this SuperNode its own --port" in message
        argv = ["superlink", "--certs", "certs", "--host", "127.0.0.1", "--port", port]
        assert _refused(argv).startswith(f"--port {port}: 127.0.0.1:{port} is in use already")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a folder of mode 0555")
def test_state_folder_unwritable(admin: Path, listener: str) -> None:
    (admin / "locked").mkdir(mode=0o555)
    message = _refused(_supernode(listener, "--state", "locked/node-state"))
    assert message.startswith("--state locked/node-state (")
    assert "cannot be written by this user" in message


def test_state_folder_that_cannot_be_created(admin: Path, listener: str) -> None:
    """A --state below a file cannot be created, even by root (the chmod test's case)."""
    (admin / "notes.txt").write_text("")
    message = _refused(_supernode(listener, "--state", "notes.txt/node-state"))
    assert message.startswith("--state notes.txt/node-state (") and "cannot be written" in message
    assert "is a file, not a folder" in _refused(_supernode(listener, "--state", "notes.txt"))


def test_superlink_not_reachable(admin: Path) -> None:
    message = _refused(_supernode(f"127.0.0.1:{free_port()}"))
    assert "the SuperLink does not answer (Connection refused)" in message
    assert "not HOST:PORT" in _refused(_supernode("10.0.0.5"))


def test_relative_paths_from_another_folder_reach_flower_absolute(
    admin: Path, tls_listener: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From another working directory, ``../admin/...`` paths are checked there and Flower's
    processes (which run in their state folder) get them absolute."""
    elsewhere = admin / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    args = _checked(
        "supernode",
        "--superlink",
        tls_listener,
        "--ca",
        "../certs/ca.crt",
        "--key",
        "../keys/hospital-a.key",
        "--data-dir",
        "../data/hospital-a",
        "--roster",
        "../keys",
        "--port",
        str(free_port()),
    )
    assert args.ca == admin / "certs" / "ca.crt" and args.key == admin / "keys" / "hospital-a.key"
    assert args.state == elsewhere / "supernode-state" and args.state.is_dir()
    assert args.typed["ca"] == "../certs/ca.crt"
    # The library takes relative paths too: Flower's command holds only absolute ones.
    spec = SuperNodeSpec(
        data_dir=Path("../data/hospital-a"),
        superlink=tls_listener,
        ca_cert=Path("../certs/ca.crt"),
        private_key=Path("../keys/hospital-a.key"),
        state_dir=Path("node-a"),
        isolation="process",
    )
    command = supernode_command(spec)
    for flag in (
        "--root-certificates",
        "--auth-supernode-private-key",
        "--node-config",
        "--superexec-auth-secret-file",
    ):
        path = Path(command[command.index(flag) + 1])
        assert path.is_absolute() and path.is_file(), (flag, path)
    assert (
        f'state-dir = "{elsewhere / "node-a"}"'
        in (elsewhere / "node-a/node-config.toml").read_text()
    )
    args = _checked(
        "superlink", "--certs", "../certs", "--state", "link", "--port", str(free_port())
    )
    link = superlink_command(args.server_certificate, Path("link"), "127.0.0.1", 9093)
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert (
            Path(link[link.index(flag) + 1])
            == admin / "certs" / Path(link[link.index(flag) + 1]).name
        )


def test_help_of_every_role_ends_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    for role in ("ca", "site-key", "superlink", "register", "supernode", "check-policy", "local"):
        with pytest.raises(SystemExit):
            _parser().parse_args([role, "--help"])
        text = capsys.readouterr().out
        assert f"example:\n  fl-imaging-deploy {role}" in text, role
        assert "Relative paths are taken from the folder the command runs in." in text
        if role == "supernode":
            assert "Two SuperNodes on one host each need their own --port" in text
            assert "--num-classes" in text


def test_a_wrong_input_exits_2_with_the_message(tmp_path: Path) -> None:
    """The command itself: exit 2, the message on stderr, nothing started."""
    done = run_cli(
        "fl-imaging-deploy",
        *_supernode("127.0.0.1:9", "--ca", "missing.crt"),
        cwd=tmp_path,
        expect=2,
    )
    assert f"error: --ca missing.crt ({tmp_path / 'missing.crt'}): no such file" in done.stderr
    assert "started" not in done.stderr


@pytest.mark.parametrize(
    ("changed", "cause"),
    [
        (("--ca", "missing.crt"), "--ca missing.crt ({admin}/missing.crt): no such file"),
        (
            ("--key", "keys/garbage.key"),
            "--key keys/garbage.key ({admin}/keys/garbage.key): is not an OpenSSH private key",
        ),
        (
            ("--ca", "keys/hospital-a.key"),
            "--ca keys/hospital-a.key ({admin}/keys/hospital-a."
            "key): is a private key, not a certificate",
        ),
    ],
    ids=["missing-ca", "garbage-key", "key-as-ca"],
)
def test_each_wrong_supernode_file_names_its_own_cause_as_a_command(
    admin: Path, tls_listener: str, changed: tuple[str, str], cause: str
) -> None:
    """``fl-imaging-deploy supernode`` itself, against a TLS stand-in for the SuperLink: a
    missing CA file, a garbage key and the key given as the CA each stop it with exit 2 and
    their own cause (not "the SuperLink refused this SuperNode"); nothing starts."""
    (admin / "keys" / "garbage.key").write_text("not a key\n")
    done = run_cli("fl-imaging-deploy", *_supernode(tls_listener, *changed), cwd=admin, expect=2)
    assert cause.format(admin=admin) in done.stderr
    assert "refused this SuperNode" not in done.stderr and "Traceback" not in done.stderr
    assert not (admin / "node-state" / "supernode.log").exists()


@pytest.mark.slow
def test_unregistered_key_is_named_as_such(federation: LocalFederation, tmp_path: Path) -> None:
    """A real SuperLink (the session's) refuses a key it never registered: the message says so
    and names the .pub to send; relative paths."""
    make_site_key(tmp_path / "keys", "stranger")
    (tmp_path / "ca.crt").write_bytes(federation.ca_cert.read_bytes())
    data = next(iter(federation.specs.values())).data_dir
    argv = _supernode(
        federation.superlink,
        "--ca",
        "ca.crt",
        "--key",
        "keys/stranger.key",
        "--data-dir",
        str(data),
        "--state",
        "stranger-state",
    )
    done = run_cli("fl-imaging-deploy", *argv, "--skip-check", "--quiet", cwd=tmp_path, expect=2)
    assert "the public key of --key keys/stranger.key is not registered" in done.stderr
    assert "fl-imaging-deploy register keys/stranger.pub" in done.stderr
