"""What an admin types into ``fl-imaging-deploy``: paths resolved against the folder the command
runs in and checked before anything starts (deploy/inputs.py, the checks of cli/deploy.py), one
test per documented wrong input, in-process (argparse and the checks, no Flower process) except
the unregistered key, which only a real SuperLink can refuse."""

from __future__ import annotations

import argparse
import os
import socket
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
    admin: Path, listener: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From another working directory, ``../admin/...`` paths are checked there and Flower's
    processes (which run in their state folder) get them absolute."""
    elsewhere = admin / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    args = _checked(
        "supernode",
        "--superlink",
        listener,
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
        superlink=listener,
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
