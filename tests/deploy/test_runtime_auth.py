"""The SuperNode's local Runtime API (plain HTTP on 127.0.0.1) is closed to local processes that
lack its secret: ``--isolation process`` gives ``flower-supernode`` and fl-imaging's ClientApp
runner a new random secret at every start (Flower's SuperExec authentication); a client without
it is refused, the runner with it is served. ``--isolation subprocess`` leaves the port open
(Flower ignores the secret there), with a warning.

The process test starts SuperNodes whose SuperLink is not there (their Runtime API serves
anyway) and stops each by PID; the round trip with the secret on is in test_deployment.py.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest
from runtime_intruder import (
    AUTHENTICATION_FAILED,
    acquire_plain,
    acquire_with_flower,
    pull_input_with_made_up_token,
)

from fl_imaging.deploy import warm_clientapp
from fl_imaging.deploy.processes import (
    ManagedProcess,
    flower_env,
    free_port,
    start_process,
    stop_all,
    wait_for_log,
    wait_for_port,
)
from fl_imaging.deploy.roles import (
    SUPEREXEC_SECRET_FILE,
    SuperNodeSpec,
    open_runtime_api_warning,
    start_supernode,
    supernode_command,
)

_FLAG = "--superexec-auth-secret-file"
#: The runner's log line once the SuperNode answered its first (signed) ``AcquireTask``.
_ACCEPTED_SIGNED = re.compile(
    re.escape("the SuperNode accepts this runner's requests (signed with the SuperExec secret)")
)


def _spec(tmp_path: Path, name: str, isolation: str) -> SuperNodeSpec:
    (tmp_path / "data" / name).mkdir(parents=True, exist_ok=True)
    return SuperNodeSpec(
        data_dir=tmp_path / "data" / name,
        superlink=f"127.0.0.1:{free_port()}",  # nobody there: the SuperNode keeps retrying
        ca_cert=None,
        private_key=None,
        state_dir=tmp_path / name,
        runtime_port=free_port(),
        isolation=isolation,
    )


def test_process_isolation_gives_each_start_a_new_private_secret(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "a", "process")
    command = supernode_command(spec)
    secret = Path(command[command.index(_FLAG) + 1])
    assert secret == spec.state_dir / SUPEREXEC_SECRET_FILE
    assert secret.stat().st_mode & 0o777 == 0o600
    first = secret.read_bytes()
    assert len(first) == 32
    supernode_command(spec)  # the next start
    assert secret.read_bytes() != first and secret.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in spec.state_dir.iterdir()) == [
        "node-config.toml",
        SUPEREXEC_SECRET_FILE,
    ]  # no temporary file left
    assert open_runtime_api_warning(spec) is None

    open_spec = _spec(tmp_path, "b", "subprocess")
    assert _FLAG not in supernode_command(open_spec)  # Flower would ignore it
    assert not (open_spec.state_dir / SUPEREXEC_SECRET_FILE).exists()
    warning = open_runtime_api_warning(open_spec)
    assert warning is not None
    assert f"127.0.0.1:{open_spec.runtime_port}" in warning and "every local user" in warning


def test_runner_signs_what_flower_protects_and_refuses_an_unusable_secret_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flwr.supercore.superexec.run_superexec import _SUPEREXEC_AUTH_METHODS

    assert warm_clientapp.SIGNED_METHODS == _SUPEREXEC_AUTH_METHODS  # what flower-superexec signs
    empty = tmp_path / "empty.secret"
    empty.write_bytes(b"")
    for path, says in ((empty, "must not be empty"), (tmp_path / "gone", "Failed to read")):
        code = warm_clientapp.main([_FLAG, str(path), "--preload", "json"])
        err = capsys.readouterr().err
        assert code == 2 and says in err and _FLAG in err, err
    assert "gone" in err


def _runner(spec: SuperNodeSpec, *extra: str) -> ManagedProcess:
    command = [sys.executable, "-m", "fl_imaging.deploy.warm_clientapp", "--preload", "json"]
    command += ["--runtime-api-address", f"127.0.0.1:{spec.runtime_port}", *extra]
    log_path = spec.state_dir / f"runner-{len(list(spec.state_dir.glob('runner-*')))}.log"
    return start_process("runner", command, log_path, flower_env(spec.state_dir / "home"))


@pytest.mark.slow
def test_runtime_api_serves_only_requests_signed_with_the_supernodes_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    closed = _spec(tmp_path, "closed", "process")
    control = _spec(tmp_path, "control", "process")  # the same, with the secret left out
    opened = _spec(tmp_path, "open", "subprocess")
    started: list[ManagedProcess] = []
    try:
        command = supernode_command(closed)
        secret = Path(command[command.index(_FLAG) + 1]).read_bytes()
        started.append(
            start_process(
                "closed", command, closed.state_dir / "supernode.log", flower_env(tmp_path / "h1")
            )
        )
        command = supernode_command(control)
        index = command.index(_FLAG)
        started.append(
            start_process(
                "control",
                command[:index] + command[index + 2 :],
                control.state_dir / "supernode.log",
                flower_env(tmp_path / "h2"),
            )
        )
        with caplog.at_level(logging.WARNING, logger="fl_imaging.deploy"):
            started += start_supernode(opened, wait=False)
        assert open_runtime_api_warning(opened) in caplog.text
        for proc, spec in zip(started, (closed, control, opened), strict=True):
            wait_for_port(proc, "127.0.0.1", spec.runtime_port, timeout=90)
        address = {s.name: f"127.0.0.1:{s.runtime_port}" for s in (closed, control, opened)}

        # Without the secret: refused by Flower's SuperExec authentication (401, code 1008).
        for attempt in (
            acquire_plain(address["closed"]),
            acquire_with_flower(address["closed"], None),
            acquire_with_flower(address["closed"], b"a guessed secret"),
            pull_input_with_made_up_token(address["closed"]),  # no task token without the secret
        ):
            assert (attempt.status, attempt.code) == (401, AUTHENTICATION_FAILED), attempt
        assert "SuperExec authentication failed" in started[0].log_text()
        # With it (signed by Flower's interceptor, as our runner signs): served.
        assert acquire_with_flower(address["closed"], secret).status == 200
        # The control, and subprocess isolation: the same intruder is served (the port is open).
        assert acquire_plain(address["control"]).status == 200
        assert acquire_plain(address["open"]).status == 200

        # fl-imaging's runner: refused with a message without the secret, served with it.
        refused = _runner(closed)
        started.append(refused)
        refused.popen.wait(timeout=60)
        assert refused.popen.returncode == 2, refused.log_text()
        assert "refused this runner's AcquireTask (unsigned)" in refused.log_text()
        assert f"give this runner its {_FLAG}" in refused.log_text()
        served = _runner(closed, _FLAG, str(closed.state_dir / SUPEREXEC_SECRET_FILE))
        started.append(served)
        wait_for_log(served, _ACCEPTED_SIGNED, timeout=60)
        assert served.alive()
    finally:
        stop_all(started, grace=10)
    assert not any(p.alive() for p in started)
