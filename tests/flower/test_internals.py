"""The one door to Flower's internals: every name resolves in the installed flwr, a release
outside the supported range is refused with a message, and no other module goes around it."""

from __future__ import annotations

import re
from pathlib import Path

from flwr.app import Error, Message, RecordDict

from fl_imaging.flower import internals
from fl_imaging.flower.protocol import with_metadata

ROOT = Path(__file__).resolve().parents[2]
#: An import of Flower outside its public API (``flwr.app``, ``flwr.serverapp``,
#: ``flwr.clientapp`` and the secure-aggregation primitives stay direct; see internals' doc).
INTERNAL = re.compile(
    r"^\s*(from|import) flwr\.(supercore|proto|server|simulation|supernode|cli)\b"
    r"|^\s*(from|import) flwr\.common\.(?!secure_aggregation)",
    re.M,
)


def test_every_internal_resolves_in_the_installed_flower() -> None:
    assert internals.check_internals() == []


def test_a_release_outside_the_supported_range_is_named_with_what_to_do() -> None:
    assert internals.flower_version_problem("1.41.0") == ""
    assert internals.flower_version_problem("1.41.7") == ""
    for other in ("1.40.2", "1.42.0", "1.43.0", "2.0.0"):
        problem = internals.flower_version_problem(other)
        assert f"flwr {other} is installed" in problem
        assert "flwr[simulation,dp]==1.41.*" in problem and "newer Flower" in problem


def test_no_other_module_imports_flower_internals() -> None:
    offenders = []
    for folder in ("fl_imaging", "strategies", "tasks"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name != "internals.py" and INTERNAL.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == [], "import these names from fl_imaging.flower.internals"


def test_with_metadata_copies_a_reply_with_one_field_changed(task_identity: None) -> None:
    sent = Message(RecordDict(), dst_node_id=5, message_type="train", group_id="2")
    reply = Message(Error(code=0, reason="Node Unavailable"), reply_to=sent)
    renamed = with_metadata(reply, src_node_id=5, message_id="abc")
    assert (renamed.metadata.src_node_id, renamed.metadata.message_id) == (5, "abc")
    assert renamed.error.reason == "Node Unavailable"
    for field in ("run_id", "dst_node_id", "reply_to_message_id", "group_id", "message_type"):
        assert getattr(renamed.metadata, field) == getattr(reply.metadata, field)
