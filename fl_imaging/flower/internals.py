"""The one door to Flower's internals: every name this toolkit takes from outside Flower's public
API (``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp``, ``flwr.clientapp.mod`` and the
secure-aggregation primitives of ``flwr.common.secure_aggregation``) comes from here.

Flower says its private APIs change even in patch releases, so importing this module checks the
installed flwr against :data:`SUPPORTED` first and stops with one message naming the version and
what to do. The names are resolved on first use (``from fl_imaging.flower.internals import Run``
imports ``flwr.supercore.run`` then, not before: the Ray backend costs seconds to import and a
ClientApp never needs it); :func:`check_internals` resolves them all at once (a test does, so a
Flower release that moved one shows every moved name together).

What each is used for, and why the public API does not do it (Flower 1.41):

Simulation engine (``fl_imaging/engines/``)
    ``run_simulation``: the in-process simulation ``fl-imaging`` runs on its own (or an existing)
    Ray cluster with apps bound to the composed config; public but deprecated in favour of
    ``flwr run``, which forwards only four Ray options (see ``engines/simulation.py``).
    ``RayBackend``: the simulation's Ray backend, patched to use the Ray we started, to shut it
    down quietly on Ctrl-C (``engines/local_ray.py``, ``engines/ray_stop.py``); no public hook.
    ``vce_api``: the simulation's message loop, whose hand-out order ``engines/message_handout.py``
    replaces (its scan of every message per site is quadratic at many sites).

ServerApp (``fl_imaging/flower/coordinator/polling.py``)
    ``Run``: the type of ``Grid.run`` / ``Grid.set_run``, which our Grid wrapper delegates;
    ``flwr.serverapp.Grid`` names it in its abstract methods but does not export it.

Sites (``compression/``, ``secagg/``, ``site/identity.py``)
    ``KEY_CLIPPING_NORM``: the train-config key under which Flower's client-side DP strategies
    send the clipping norm (read before compressing a clipped update); Flower exports only the
    mods that read it. ``bytes_to_private_key``, ``bytes_to_public_key``, ``generate_key_pairs``,
    ``private_key_to_bytes``, ``public_key_to_bytes``, ``sign_message``, ``verify_signature``:
    Flower's ECDSA helpers (``flwr.supercore.primitives.asymmetric``), which its SecAgg+ and node
    authentication use; the public secure-aggregation package has the symmetric half only.

Strategies (``strategies/decoding.py``)
    ``ErrorCode``: the code of an error reply a strategy writes for a site's undecodable update,
    so that Flower's own handling of error replies applies; ``flwr.app.Error`` takes an int and
    the codes are not exported.

The long-lived ClientApp runner (``fl_imaging/deploy/warm_clientapp.py``), which re-does the
steps of Flower's ``flwr-clientapp`` (``flwr/supernode/runtime/run_clientapp.py``) in a process
kept alive, since Flower 1.41 has no long-lived ClientApp for SuperNodes:
    ``RuntimeHttpClient``, ``RuntimeTokenHttpInterceptor``, ``RuntimeVersionHttpInterceptor``,
    ``SuperExecAuthHttpInterceptor``, ``make_simple_http_retry_invoker``: the SuperNode's Runtime
    API client, its auth and retries; ``AcquireTaskRequest``, ``PullTaskInputRequest``,
    ``PullAppMessagesRequest``, ``SendTaskHeartbeatRequest``, ``Node``: its requests;
    ``context_from_proto``, ``fab_from_proto``, ``run_from_proto``: decoding a task's input;
    ``pull_and_inflate_object_from_tree``, ``make_pull_object_fn_protobuf``,
    ``make_confirm_message_received_fn_protobuf``: pulling a message's objects (with a shorter
    back-off than Flower's); ``push_message``, ``push_task_output``: answering;
    ``HeartbeatSender``, ``TaskType``, ``SubStatus``, ``TaskIdentity``, ``install_from_fab``,
    ``get_load_client_app_fn``, ``load_superexec_auth_secret``, ``start_parent_process_monitor``:
    the rest of a task's life as ``flwr-clientapp`` lives it.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["SUPPORTED", "FlowerVersionError", "check_internals", "flower_version_problem"]

#: The flwr releases whose internals this module was checked against: [first, end), as
#: (major, minor); pyproject.toml pins the same range.
SUPPORTED = ((1, 41), (1, 42))

_INFLATABLE_PROTOBUF = "flwr.supercore.inflatable.inflatable_protobuf_utils"

#: Each internal name -> the module that defines it in the supported releases.
WHERE: dict[str, str] = {
    # simulation engine
    "run_simulation": "flwr.simulation",
    "RayBackend": "flwr.server.superlink.fleet.vce.backend.raybackend",
    "vce_api": "flwr.server.superlink.fleet.vce.vce_api",
    # ServerApp
    "Run": "flwr.supercore.run",
    # sites and strategies
    "KEY_CLIPPING_NORM": "flwr.supercore.differential_privacy",
    "bytes_to_private_key": "flwr.supercore.primitives.asymmetric",
    "bytes_to_public_key": "flwr.supercore.primitives.asymmetric",
    "generate_key_pairs": "flwr.supercore.primitives.asymmetric",
    "private_key_to_bytes": "flwr.supercore.primitives.asymmetric",
    "public_key_to_bytes": "flwr.supercore.primitives.asymmetric",
    "sign_message": "flwr.supercore.primitives.asymmetric",
    "verify_signature": "flwr.supercore.primitives.asymmetric",
    "ErrorCode": "flwr.common.constant",
    # the long-lived ClientApp runner
    "SubStatus": "flwr.common.constant",
    "RuntimeHttpClient": "flwr.supercore.runtime",
    "RuntimeTokenHttpInterceptor": "flwr.supercore.interceptors",
    "RuntimeVersionHttpInterceptor": "flwr.supercore.interceptors",
    "SuperExecAuthHttpInterceptor": "flwr.supercore.interceptors",
    "make_simple_http_retry_invoker": "flwr.supercore.retry",
    "context_from_proto": "flwr.common.serde",
    "fab_from_proto": "flwr.common.serde",
    "run_from_proto": "flwr.common.serde",
    "Node": "flwr.proto.node_pb2",
    "AcquireTaskRequest": "flwr.proto.runtime_pb2",
    "PullAppMessagesRequest": "flwr.proto.runtime_pb2",
    "PullTaskInputRequest": "flwr.proto.runtime_pb2",
    "SendTaskHeartbeatRequest": "flwr.proto.runtime_pb2",
    "make_confirm_message_received_fn_protobuf": _INFLATABLE_PROTOBUF,
    "make_pull_object_fn_protobuf": _INFLATABLE_PROTOBUF,
    "pull_and_inflate_object_from_tree": "flwr.supercore.inflatable.inflatable_utils",
    "TaskIdentity": "flwr.supercore.task_identity",
    "TaskType": "flwr.supercore.constant",
    "HeartbeatSender": "flwr.supercore.heartbeat",
    "push_message": "flwr.supernode.runtime.run_clientapp",
    "push_task_output": "flwr.supernode.runtime.run_clientapp",
    "install_from_fab": "flwr.cli.install",
    "get_load_client_app_fn": "flwr.clientapp.utils",
    "load_superexec_auth_secret": "flwr.supercore.auth",
    "start_parent_process_monitor": "flwr.supercore.app_utils",
}

#: Internal names that are modules themselves, not attributes of one.
_MODULES = {"vce_api"}


class FlowerVersionError(ImportError):
    """The installed flwr is outside :data:`SUPPORTED`; the message says what to do."""


def flower_version_problem(installed: str) -> str:
    """The message for flwr ``installed`` (e.g. ``"1.43.0"``) when it is outside
    :data:`SUPPORTED`, else ''."""
    (first, end) = SUPPORTED
    try:
        found = tuple(int(part) for part in installed.split(".")[:2])
    except ValueError:
        found = (0, 0)
    if first <= found < end:
        return ""
    wanted = f"{first[0]}.{first[1]}.*"
    return (
        f"flwr {installed} is installed, but fl-imaging uses Flower internals checked only "
        f"with flwr {wanted}: install that one (pip install 'flwr[simulation,dp]=={wanted}'), "
        "or, to move fl-imaging to a newer Flower, follow 'Moving to a newer Flower' in "
        "docs/how-to/flower-app.md (the names to check are in fl_imaging/flower/internals.py)."
    )


def _check_version() -> None:
    try:
        installed = version("flwr")
    except PackageNotFoundError:
        raise FlowerVersionError(
            "flwr is not installed: pip install -e . in the fl-imaging folder installs it"
        ) from None
    problem = flower_version_problem(installed)
    if problem:
        raise FlowerVersionError(problem)


_check_version()


def __getattr__(name: str) -> Any:
    """Resolve the internal ``name`` (a key of :data:`WHERE`) on first use."""
    if name not in WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _MODULES:
        value = importlib.import_module(WHERE[name])
    else:
        value = getattr(importlib.import_module(WHERE[name]), name)
    globals()[name] = value
    return value


def check_internals() -> list[str]:
    """Resolve every name of :data:`WHERE`; return one line per name the installed flwr does not
    have where this module looks for it (empty: all there)."""
    missing = []
    for name, module in WHERE.items():
        try:
            __getattr__(name)
        except (ImportError, AttributeError) as err:
            missing.append(f"{name} (from {module}): {err}")
    return missing
