"""A local process that tries to take a SuperNode's ClientApp tasks from its Runtime API
(127.0.0.1, plain HTTP), as any user of a hospital machine could: used by the tests that check
that the SuperNode's SuperExec secret keeps it out. One request per call, no retries (Flower's
retry invoker answers a 401 by interrupting its own process: not in a test)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    AcquireTaskResponse,
    PullTaskInputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import (
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.runtime import RuntimeHttpClient

#: Flower's ``ApiErrorCode.RUNTIME_AUTHENTICATION_FAILED`` (HTTP 401, "Authentication failed.").
AUTHENTICATION_FAILED = 1008
_PROTOBUF = {"content-type": "application/protobuf", "accept": "application/protobuf"}


@dataclass
class Answer:
    """What the Runtime API answered: the HTTP status, Flower's error code (None on success)
    and, for a successful ``AcquireTask``, whether a task (with its token) was handed out."""

    status: int
    code: int | None = None
    got_task: bool = False


def _error(response: httpx.Response) -> Answer:
    try:
        code = json.loads(response.text).get("code")
    except (json.JSONDecodeError, AttributeError):
        code = None
    return Answer(response.status_code, code)


def plain_post(address: str, path: str, body: bytes, token: str | None = None) -> Answer:
    """POST ``body`` (a serialized protobuf request) to ``http://ADDRESS/v1/runtime/PATH`` with
    plain httpx, no signature (``token``: a made-up task token as a bearer header)."""
    headers = dict(_PROTOBUF)
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    response = httpx.post(
        f"http://{address}/v1/runtime/{path}", content=body, headers=headers, timeout=10
    )
    if response.status_code != 200:
        return _error(response)
    if path == "acquire-task":
        res = AcquireTaskResponse.FromString(response.content)
        return Answer(200, got_task=res.HasField("task") and bool(res.token))
    return Answer(200)


def acquire_plain(address: str) -> Answer:
    """An unsigned ``AcquireTask`` for ClientApp tasks, in plain HTTP."""
    body = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    return plain_post(address, "acquire-task", body.SerializeToString(deterministic=True))


def pull_input_with_made_up_token(address: str) -> Answer:
    """``PullTaskInput`` (a task's message, context and app) with a token nobody handed out."""
    return plain_post(
        address, "pull-task-input", PullTaskInputRequest().SerializeToString(), "0" * 32
    )


def acquire_with_flower(address: str, secret: bytes | None) -> Answer:
    """``AcquireTask`` with Flower's own Runtime API client, signed with ``secret`` by Flower's
    ``SuperExecAuthHttpInterceptor`` when given (as ``flower-superexec`` does)."""
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    if secret is not None:
        interceptors.append(
            SuperExecAuthHttpInterceptor(
                master_secret=secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}
            )
        )
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None, interceptors=interceptors
    )
    try:
        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    except httpx.HTTPStatusError as err:
        return _error(err.response)
    finally:
        client.close()
    return Answer(200, got_task=res.HasField("task") and bool(res.token))
