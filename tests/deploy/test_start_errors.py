"""Flower's log lines -> the cause and fix fl-imaging-deploy prints (deploy/start_errors.py), one
test per cause. The lines are Flower 1.41's own, as flower-superlink and flower-supernode wrote
them in these cases."""

from __future__ import annotations

import pytest

from fl_imaging.deploy.start_errors import StartContext, start_cause

NODE = StartContext(
    "supernode",
    9094,
    superlink="10.0.0.5:9093",
    ca="ca.crt",
    key="keys/hospital-a.key",
    state="node-state",
)
LINK = StartContext("superlink", 9093, certs="certs", state="superlink-state")

#: Flower's closing lines when a SuperNode gets no connection (exit 305), after the reason.
_NO_CONNECTION = (
    "The SuperNode could not establish a connection to the SuperLink.\n\nFor more information, "
    "visit: <https://flower.ai/docs/framework/1.41/en/ref-exit-codes/305.html>\n"
)


def _cause(log: str, ctx: StartContext = NODE) -> str:
    cause = start_cause(log, ctx)
    assert cause is not None, log
    return cause


def test_port_in_use_names_the_port_flag() -> None:
    log = (
        "ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 9094): "
        "address already in use\nRuntimeError: SuperNode Runtime HTTP API failed to start.\n"
    )
    cause = _cause(log)
    assert "port 9094 is in use" in cause and "its own --port" in cause
    assert "this superlink its own --port" in _cause(log, LINK)


def test_missing_file_names_our_flag_not_flowers() -> None:
    cause = _cause("ERROR :     Path argument `--root-certificates` does not point to a file.")
    assert "--ca" in cause and "--root-certificates" not in cause
    cause = _cause("ERROR :  Path argument `--ssl-ca-certfile` does not point to a file.", LINK)
    assert "--certs (its ca.crt)" in cause


def test_a_key_given_as_the_ca() -> None:
    log = (
        '    verify.load_verify_locations(cadata=root_certificates.decode("ascii"))\n'
        "ssl.SSLError: no start line: cadata does not contain a certificate (_ssl.c:4020)\n"
    )
    assert _cause(log).startswith("--ca ca.crt is not a certificate")


def test_garbage_key() -> None:
    log = (
        "ERROR :     Exit Code: 302\nUnable to parse the private key file.\nNode authentication "
        "requires elliptic curve private key. Please ensure that the file path points to a valid "
        "private key file and try again.\n"
    )
    assert _cause(log).startswith("--key keys/hospital-a.key is not this site's private key")


def test_unregistered_key_only_when_the_superlink_refused_it() -> None:
    log = (
        "ERROR :     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
        f"[code: 2004] Failed to activate SuperNode.\n{_NO_CONNECTION}"
    )
    cause = _cause(log)
    assert "refused this SuperNode" in cause and "is not registered" in cause
    assert "fl-imaging-deploy register keys/hospital-a.pub --superlink 10.0.0.5:9093" in cause


def test_wrong_ca_is_a_failed_handshake() -> None:
    log = (
        "ERROR :     SSL/TLS handshake error detected.\nERROR :     Exit Code: 305\nFailed to "
        "initialize the connection to the SuperLink.\n[SSL: CERTIFICATE_VERIFY_FAILED] "
        "certificate verify failed: unable to get local issuer certificate (_ssl.c:1006)\n"
        + _NO_CONNECTION
    )
    cause = _cause(log)
    assert "does not verify against --ca ca.crt" in cause and "registered" not in cause


def test_address_missing_from_the_certificate() -> None:
    log = (
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address mismatch, "
        "certificate is not valid for '10.0.0.5'. (_ssl.c:1006)\n" + _NO_CONNECTION
    )
    assert "fl-imaging-deploy ca --out certs --host 10.0.0.5 --force" in _cause(log)


def test_state_folder_not_readable() -> None:
    log = "Failed to read SuperExec auth secret from file 'node-state/superexec-auth.secret'"
    assert _cause(log).startswith("the --state folder node-state cannot be read or written")


def test_superlink_not_reachable() -> None:
    log = (
        "WARNING :   Connection attempt failed, retrying in 0.30 seconds\nERROR :     Exit Code: "
        "305\nFailed to initialize the connection to the SuperLink.\n[Errno 111] Connection "
        f"refused\n{_NO_CONNECTION}"
    )
    cause = _cause(log)
    assert "the SuperLink at 10.0.0.5:9093 does not answer" in cause
    assert "registered" not in cause


@pytest.mark.parametrize("log", ["", "INFO :      Starting Flower SuperNode\n"])
def test_no_known_cause_is_none(log: str) -> None:
    assert start_cause(log, NODE) is None
