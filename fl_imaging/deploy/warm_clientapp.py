"""A long-lived ClientApp process for one SuperNode (``flower-supernode --isolation process``).

Why: by default (``--isolation subprocess``) a SuperNode hands every message to a new
``flwr-clientapp`` process, which imports torch and MONAI again and decodes the site's volumes
again: seconds per message. Flower 1.41 has no long-lived ClientApp: ``flwr-clientapp`` takes
one task token, runs one message and exits (``flwr/supernode/runtime/run_clientapp.py``), and
``--isolation process`` only means that an outside ``flower-superexec`` starts those processes
(the same one per message). Warm executor pools exist in 1.41 for Kubernetes and agent apps only.

This runner (ours) is that outside executor, kept alive: it polls the SuperNode's Runtime API
for ClientApp tasks (``AcquireTask``) and runs each in this process with Flower's own steps
(pull the task's message, context and app bundle; call the ClientApp; push the reply and the
task's end state; heartbeats meanwhile). Modules stay imported between messages, so the
ClientApp's per-process cache (its ``SiteTrainers``, :mod:`fl_imaging.training.site_training`: the
decoded volumes) survives from round to round. Messages run one at a time, as with Flower's
SuperNode.

The SuperNode hands out a task as soon as it stored the message's header, while it still pulls
the message's arrays from the SuperLink; pulling them here then finds them "unavailable" and
retries. Flower's ``flwr-clientapp`` retries after 1 s, then 2 s, 4 s ... (``PULL_INITIAL_BACKOFF``
in ``flwr/supercore/constant.py``), which cost seconds per message on loopback; this runner
retries after ``--pull-backoff`` seconds (default 0.05), doubling up to 0.5 s.

It uses Flower's internal Runtime API client (``flwr.supercore.runtime``), which may change in
another Flower release: like every internal, it comes through :mod:`fl_imaging.flower.internals`,
which checks the installed flwr's version. A ClientApp that raises is answered with an
error reply, as ``flwr-clientapp`` does; the runner goes on with the next task.

A SuperNode started with ``--superexec-auth-secret-file FILE`` (``fl-imaging-deploy`` does so)
serves ``AcquireTask`` only to requests signed with that secret; give the runner the same file.
It signs them as Flower's ``flower-superexec`` does (``SuperExecAuthHttpInterceptor``: an
HMAC-SHA256 over the method, a timestamp, a nonce and the request body's hash). A SuperNode that
refuses the runner's requests stops it with a message (exit code 2).

    python -m fl_imaging.deploy.warm_clientapp --runtime-api-address 127.0.0.1:9094 \\
        --superexec-auth-secret-file node-state/superexec-auth.secret
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fl_imaging.flower.internals import RuntimeHttpClient

__all__ = ["SIGNED_METHODS", "RefusedError", "main", "serve"]

log = logging.getLogger("fl_imaging.deploy.clientapp")

#: First wait before pulling a not-yet-available object again (seconds; Flower's is 1 s).
PULL_BACKOFF = 0.05
#: Longest wait between two pulls of one object (seconds; Flower's is 10 s).
PULL_BACKOFF_CAP = 0.5
#: The Runtime API calls that a SuperNode with a SuperExec secret wants signed (as
#: ``_SUPEREXEC_AUTH_METHODS`` in ``flwr/supercore/superexec/run_superexec.py``); every other
#: call carries the task token that ``AcquireTask`` returned.
SIGNED_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})


class RefusedError(RuntimeError):
    """The SuperNode refused the runner's signed (or unsigned) ``AcquireTask``."""


def _unauthorized(exc: BaseException) -> bool:
    """True for an HTTP 401 answer (Flower's "Authentication failed.")."""
    import httpx

    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 401


def _http_client(address: str, token: str | None, secret: bytes | None = None) -> RuntimeHttpClient:
    """Flower's Runtime API client for ``address``: with the task ``token`` (a task's calls), or
    without (``AcquireTask``), then signed with ``secret`` when given."""
    from fl_imaging.flower.internals import (
        RuntimeHttpClient,
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
        make_simple_http_retry_invoker,
    )

    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    retry = make_simple_http_retry_invoker()
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
        retry.max_time = 60.0  # a task's SuperNode that is gone for a minute will not return
    else:
        # Flower's invoker answers a 401 by interrupting its own process (SIGINT) and exiting
        # silently: a refused AcquireTask is raised instead, to be reported (see serve).
        flower_giveup = retry.should_giveup
        retry.should_giveup = lambda exc: (
            _unauthorized(exc) or bool(flower_giveup is not None and flower_giveup(exc))
        )
    if secret is not None:
        interceptors.append(
            SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=SIGNED_METHODS)
        )
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=retry,
    )


def _pull_task_input(client, backoff: float, backoff_cap: float):  # type: ignore[no-untyped-def]
    """Flower's ``pull_task_input`` (``flwr/supernode/runtime/run_clientapp.py``): the task's
    context, run, app bundle and message, with the message's objects pulled again after
    ``backoff`` seconds (doubling up to ``backoff_cap``) while the SuperNode still fetches them."""
    from flwr.app import Message

    from fl_imaging.flower.internals import (
        Node,
        PullAppMessagesRequest,
        PullTaskInputRequest,
        TaskIdentity,
        context_from_proto,
        fab_from_proto,
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
        pull_and_inflate_object_from_tree,
        run_from_proto,
    )
    from fl_imaging.flower.protocol import with_metadata

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        max_tries_per_object=None,  # bounded by Flower's PULL_MAX_TIME instead
        initial_backoff=backoff,
        backoff_cap=max(backoff, backoff_cap),
    )
    # As flwr-clientapp does, the message is named by its object tree's id (what a reply
    # answers); built anew with Flower's public Message and Metadata, not written in place.
    return with_metadata(message, message_id=tree.object_id), context, run, fab


class _Runner:
    """Runs ClientApp tasks of one SuperNode, one at a time, in this process; pulls a message's
    objects again after ``pull_backoff`` seconds while they are not there yet."""

    def __init__(self, address: str, pull_backoff: float = PULL_BACKOFF) -> None:
        from fl_imaging.flower.internals import get_load_client_app_fn

        self.address = address
        self.pull_backoff = pull_backoff
        self.load_app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        self.installed: set[str] = set()
        self.tasks = 0

    def run_task(self, token: str) -> None:
        """Run the task of ``token``: pull its input, call the ClientApp, push the reply."""
        from flwr.app import Error, Message

        from fl_imaging.flower.internals import (
            ErrorCode,
            HeartbeatSender,
            SendTaskHeartbeatRequest,
            SubStatus,
            install_from_fab,
            push_message,
            push_task_output,
        )

        client = _http_client(self.address, token)

        def beat() -> bool:
            try:
                return bool(client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)
            except Exception:  # a missed beat is retried by the sender
                return False

        heartbeat = HeartbeatSender(beat)
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        aborted = False  # stopped (signal, SuperNode gone): nobody is left to answer
        start = time.perf_counter()
        marks = [start]  # after pulling, after the ClientApp, after pushing
        try:
            message, context, run, fab = _pull_task_input(
                client, self.pull_backoff, PULL_BACKOFF_CAP
            )
            marks.append(time.perf_counter())
            if fab.hash_str not in self.installed:
                install_from_fab(fab.content, skip_prompt=True)
                self.installed.add(fab.hash_str)
            app = self.load_app(run.fab_id, run.fab_version, fab.hash_str)
            reply = app(message=message, context=context)
            marks.append(time.perf_counter())
            status, details = SubStatus.COMPLETED, ""
        except Exception as err:  # answered with an error reply, like flwr-clientapp
            log.exception("ClientApp raised an exception")
            details = f"{type(err)}:<'{err}'>"
            if message is not None:
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                    reply_to=message,
                )
        except BaseException:
            aborted = True
            raise
        finally:
            try:
                if not aborted:
                    if reply is not None and context is not None:
                        push_message(client, reply, context)
                    push_task_output(client, context, status, details)
            finally:
                heartbeat.stop()
                client.close()
        self.tasks += 1
        kind = message.metadata.message_type if message is not None else "?"
        end = time.perf_counter()
        steps = ""
        if len(marks) == 3:
            pull, app_s, push = marks[1] - marks[0], marks[2] - marks[1], end - marks[2]
            steps = f" (pull {pull:.2f} s, ClientApp {app_s:.2f} s, push {push:.2f} s)"
        log.info("task %d (%s message) done in %.2f s%s", self.tasks, kind, end - start, steps)


def serve(
    runtime_api_address: str,
    poll_seconds: float = 0.1,
    pull_backoff: float = PULL_BACKOFF,
    secret: bytes | None = None,
) -> None:
    """Serve ClientApp tasks from the SuperNode at ``runtime_api_address`` until stopped,
    polling for a new task every ``poll_seconds`` (requests signed with ``secret``, the
    SuperNode's SuperExec secret, when given); a message's objects that the SuperNode does not
    hold yet are pulled again after ``pull_backoff`` seconds (doubling, at most 0.5 s). Raises
    :class:`RefusedError` when the SuperNode refuses the runner's requests (401)."""
    import httpx

    from fl_imaging.flower.internals import AcquireTaskRequest, TaskType

    runner = _Runner(runtime_api_address, pull_backoff)
    acquirer = _http_client(runtime_api_address, None, secret)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    signed = "signed with the SuperExec secret" if secret is not None else "unsigned"
    log.info("serving ClientApp tasks of the SuperNode at %s (%s)", runtime_api_address, signed)
    accepted = False
    try:
        while True:
            try:
                response = acquirer.AcquireTask(request)
            except httpx.HTTPStatusError as err:
                if not _unauthorized(err):
                    raise
                hint = (
                    "check that this runner has the SuperNode's current secret (a new one at "
                    "every start: restart both together)"
                    if secret is not None
                    else "the SuperNode wants signed requests: give this runner its "
                    "--superexec-auth-secret-file"
                )
                raise RefusedError(
                    f"the SuperNode at {runtime_api_address} refused this runner's AcquireTask "
                    f"({signed}): {err.response.text.strip()}; {hint}"
                ) from None
            if not accepted:
                accepted = True
                log.info("the SuperNode accepts this runner's requests (%s)", signed)
            if response.HasField("task") and response.token:
                runner.run_task(response.token)
            else:
                time.sleep(poll_seconds)
    finally:
        acquirer.close()


def _stop(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m fl_imaging.deploy.warm_clientapp``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m fl_imaging.deploy.warm_clientapp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--runtime-api-address",
        default="127.0.0.1:9094",
        help="the SuperNode's Runtime API (its --host and --port), default 127.0.0.1:9094",
    )
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit when this process (the SuperNode) is gone",
    )
    parser.add_argument(
        "--superexec-auth-secret-file",
        default=None,
        help="the file holding the secret given to flower-supernode --superexec-auth-secret-file "
        "(read as raw bytes); without it requests are unsigned, which such a SuperNode refuses",
    )
    parser.add_argument("--poll-seconds", type=float, default=0.1)
    parser.add_argument(
        "--pull-backoff",
        type=float,
        default=PULL_BACKOFF,
        help="seconds before pulling a message's objects again while the SuperNode still "
        f"fetches them (default {PULL_BACKOFF}; doubles up to {PULL_BACKOFF_CAP} s; "
        "flwr-clientapp waits 1 s, doubling up to 10 s)",
    )
    parser.add_argument(
        "--preload",
        action="append",
        default=None,
        help="modules to import before the first message (default: fl-imaging's ClientApp, "
        "with torch and MONAI), so that round 1 does not wait for them; repeatable",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    secret = None
    if args.superexec_auth_secret_file is not None:
        from fl_imaging.flower.internals import load_superexec_auth_secret

        try:  # Flower's own reader, as flower-supernode reads the same file
            secret = load_superexec_auth_secret(args.superexec_auth_secret_file)
        except ValueError as err:
            print(
                f"{parser.prog}: error: {err}; give the file that flower-supernode got with "
                "--superexec-auth-secret-file",
                file=sys.stderr,
            )
            return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    for module in args.preload or ["fl_imaging.flower.site.client_app"]:
        start = time.perf_counter()
        importlib.import_module(module)
        log.info("imported %s in %.1f s", module, time.perf_counter() - start)
    signal.signal(signal.SIGTERM, _stop)
    if args.parent_pid is not None:
        from fl_imaging.flower.internals import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    try:
        serve(args.runtime_api_address, args.poll_seconds, args.pull_backoff, secret)
    except RefusedError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
