"""The console (fl_imaging/console/) without a federation: the view's state from events, its
drawing, which lines reach the terminal and in which form, the sites' lines from Ray's workers,
Flower's stream in a deployment, and ``fl-imaging --help``."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_runs import run_cli
from rich.console import Console

from fl_imaging.config import config_dir
from fl_imaging.console.events import (
    EPOCH,
    PROGRESS_LOGGER,
    REPLY,
    ROUND_ENDED,
    RUN_FINISHED,
    RUN_STARTED,
    SENT,
    Progress,
    progress_extra,
    progress_of,
)
from fl_imaging.console.flower_output import FLOWER_OUTPUT_LOGGER, log_flower_output, readable_line
from fl_imaging.console.live_view import LiveView, render_sites
from fl_imaging.console.record_lines import (
    MARKER,
    RecordLineFormatter,
    record_from_line,
    record_line,
)
from fl_imaging.console.run_view import DONE, FAILED, NOT_ASKED, TRAINING, WAITING, RunView
from fl_imaging.console.site_lines import SiteLineTail, send_site_lines, site_lines_into_log
from fl_imaging.console.terminal import (
    OriginTag,
    RunConsole,
    live_output,
    run_console,
    shows_line,
)

SITES = ("site-1", "site-2", "site-3")


def _started(rounds: int = 3, first: int = 0) -> RunView:
    view = RunView()
    view.apply(Progress(RUN_STARTED, first, rounds, sites=SITES))
    return view


def _send(view: RunView, phase: str = "train", nodes: tuple[int, ...] = (11, 12, 13)) -> None:
    for node in nodes:
        view.apply(Progress(SENT, node=node, phase=phase))


def _record(name: str, level: int = logging.INFO, msg: str = "hello", **extra: object):
    record = logging.LogRecord(name, level, __file__, 1, msg, None, None)
    record.__dict__.update(extra)
    return record


# --- the view's state --------------------------------------------------------------------------


def test_sites_wait_then_train_epoch_by_epoch_then_are_done() -> None:
    view = _started()
    assert {s.state for s in view.sites.values()} == {NOT_ASKED}
    _send(view)
    assert view.current_round == 1 and view.counts()[WAITING] == 3  # nodes not named yet
    view.apply(Progress(EPOCH, 1, site="site-2", node=12, epoch=2, epochs=3))
    assert view.sites["site-2"].describe() == "training, epoch 2/3"
    assert view.counts()[TRAINING] == 1 and view.counts()[WAITING] == 2
    assert 1 / 3 * (2 / 3) == pytest.approx(view.completed(), abs=0.01)
    view.apply(Progress(REPLY, site="site-2", node=12, phase="train"))
    view.apply(Progress(REPLY, site="site-1", node=11, phase="evaluate", ok=False, detail="OOM"))
    assert view.sites["site-2"].state == DONE
    assert view.sites["site-1"].state == FAILED
    assert view.sites["site-1"].describe() == "failed: OOM"
    view.apply(Progress(ROUND_ENDED, 1, 3, detail="round 1/3  train loss 0.5"))
    assert view.rounds_done == 1 and view.completed() == 1.0
    assert view.last_line == "round 1/3  train loss 0.5"


def test_a_new_round_starts_every_site_again_and_knows_their_nodes() -> None:
    view = _started()
    _send(view)
    for node, site in zip((11, 12, 13), SITES, strict=True):
        view.apply(Progress(REPLY, site=site, node=node, phase="train"))
    view.apply(Progress(ROUND_ENDED, 1, 3))
    _send(view, nodes=(11, 13))  # round 2: two sites sampled
    assert view.current_round == 2
    states = {name: s.state for name, s in view.sites.items()}
    assert states == {"site-1": WAITING, "site-2": NOT_ASKED, "site-3": WAITING}


def test_a_site_shown_for_an_unknown_node_changes_places_with_the_one_that_answers() -> None:
    view = _started()
    _send(view, nodes=(11,))  # one of three sites asked, which one is not known yet
    assert view.counts()[WAITING] == 1
    view.apply(Progress(EPOCH, 1, site="site-3", node=11, epoch=1, epochs=2))
    states = {name: s.state for name, s in view.sites.items()}
    assert states == {"site-1": NOT_ASKED, "site-2": NOT_ASKED, "site-3": TRAINING}


def test_a_resumed_run_counts_from_its_checkpoint_and_the_test_round_is_named() -> None:
    view = _started(rounds=4, first=2)
    assert view.completed() == 2.0
    _send(view)
    assert view.current_round == 3
    view.apply(Progress(ROUND_ENDED, 3, 4))
    _send(view)
    view.apply(Progress(ROUND_ENDED, 4, 4))
    _send(view, phase="evaluate")
    assert view.phase == "scoring test cases"
    view.apply(Progress(RUN_FINISHED, 4, 4))
    assert view.finished and view.completed() == 4.0


def test_events_survive_the_trip_as_json() -> None:
    event = Progress(EPOCH, 2, 5, site="a", node=7, epoch=1, epochs=3, sites=("a", "b"))
    assert Progress.from_dict(json.loads(json.dumps(event.to_dict()))) == event
    with pytest.raises(ValueError, match="unknown progress event"):
        Progress("nonsense")


# --- drawing -----------------------------------------------------------------------------------


def _text(renderable: object, width: int = 100) -> str:
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_the_sites_are_drawn_failed_and_busy_first_and_counted_beyond_the_rows() -> None:
    view = RunView()
    names = tuple(f"site-{i}" for i in range(1, 21))
    view.apply(Progress(RUN_STARTED, 0, 2, sites=names))
    view.apply(Progress(REPLY, site="site-20", node=20, phase="train", ok=False, detail="gone"))
    view.apply(Progress(EPOCH, 1, site="site-19", node=19, epoch=1, epochs=4))
    text = _text(render_sites(view, max_rows=5))
    lines = text.splitlines()
    assert lines[0] == "sites: 1 failed, 1 training, 18 not asked"
    assert lines[1].split() == ["site-20", "failed:", "gone"]
    assert lines[2].split() == ["site-19", "training,", "epoch", "1/4"]
    assert "... and 15 more" in text


def test_the_live_view_draws_the_bar_with_time_left_the_sites_and_the_last_round() -> None:
    out = io.StringIO()
    console = Console(file=out, width=110, force_terminal=True, color_system=None)
    live = LiveView(console)
    live.update(Progress(RUN_STARTED, 0, 3, sites=SITES))
    for node, site in zip((1, 2, 3), SITES, strict=True):
        live.update(Progress(SENT, node=node, phase="train"))
        live.update(Progress(EPOCH, site=site, node=node, epoch=1, epochs=2))
    live.update(Progress(ROUND_ENDED, 1, 3, detail="round 1/3  train loss 0.7 | 2.0 s"))
    live.update(Progress(SENT, node=1, phase="train"))
    text = _text(live._render(), width=110)
    assert "round 2/3 training" in text and "1/3 rounds" in text and "time left" in text
    assert "site-1  waiting" in text and "site-2  not asked" in text
    assert "last round: round 1/3  train loss 0.7 | 2.0 s" in text


def test_a_stopped_run_says_so_in_the_view() -> None:
    live = LiveView(Console(file=io.StringIO(), width=100, force_terminal=True))
    live.update(Progress(RUN_STARTED, 0, 4, sites=SITES))
    live.update(Progress(ROUND_ENDED, 1, 4, detail="round 1/4"))
    live.update(Progress(RUN_FINISHED, 1, 4, detail="interrupted (Ctrl-C) after round 1 of 4"))
    text = _text(live._render())
    assert text.startswith("stopped") and "1/4 rounds" in text


# --- which lines reach the terminal ------------------------------------------------------------


def test_our_lines_show_a_sites_info_lines_and_flowers_only_go_to_the_log() -> None:
    epoch = progress_extra(Progress(EPOCH, 1, site="a", epoch=1, epochs=2))
    ended = progress_extra(Progress(ROUND_ENDED, 1, 2, detail="round 1/2"))
    assert shows_line(_record("fl_imaging.server"), live=True)
    assert not shows_line(_record("fl_imaging.client", **epoch), live=False)
    assert not shows_line(_record("fl_imaging.client", site_worker=True), live=False)
    assert shows_line(_record("fl_imaging.client", logging.WARNING, site_worker=True), live=False)
    assert not shows_line(_record("fl_imaging.server", **ended), live=True)  # in the view
    assert shows_line(_record("fl_imaging.server", **ended), live=False)
    assert not shows_line(_record("flwr", logging.WARNING, "Manually terminating"), live=False)
    assert shows_line(_record("flwr", logging.ERROR), live=False)
    assert shows_line(_record("flwr", logging.INFO), live=False, verbose=True)
    assert not shows_line(_record(PROGRESS_LOGGER), live=False)


def test_live_only_on_two_terminals_without_no_color() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, plain = Tty(), io.StringIO()
    assert live_output(tty, tty, {"TERM": "xterm"})
    assert not live_output(tty, tty, {"TERM": "xterm", "NO_COLOR": "1"})
    assert live_output(tty, tty, {"TERM": "xterm", "NO_COLOR": ""})  # empty: unset (no-color.org)
    assert not live_output(tty, tty, {"TERM": "dumb"})
    assert not live_output(plain, tty, {}) and not live_output(tty, plain, {})


def test_plain_lines_have_no_escape_codes_warnings_and_errors_on_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    console = RunConsole(live=False)
    for record in (
        _record("fl_imaging.server", msg="round 1/2  train loss 0.5"),
        _record("fl_imaging.server", logging.WARNING, "[site a] has no test cases"),
        _record("fl_imaging", logging.ERROR, "could not write"),
        _record(PROGRESS_LOGGER, **progress_extra(Progress(RUN_STARTED, 0, 2))),
    ):
        console.handle(record)
    out, err = capsys.readouterr()
    assert out == "round 1/2  train loss 0.5\n"
    assert err == "warning: [site a] has no test cases\nerror: could not write\n"
    assert "\x1b" not in out + err and console.view is None


def test_the_console_sets_flowers_terminal_handler_aside_and_back() -> None:
    import flwr.app  # noqa: F401  (Flower's logger gets its handler on import)

    flwr = logging.getLogger("flwr")
    before = list(flwr.handlers)
    with run_console() as console:
        assert not any(type(h).__name__ == "ConsoleHandler" for h in flwr.handlers)
        assert console in logging.getLogger().handlers
        assert console in logging.getLogger(PROGRESS_LOGGER).handlers
    assert flwr.handlers == before and console not in logging.getLogger().handlers


def test_main_log_names_the_process_of_a_sites_line_and_drops_blank_lines() -> None:
    tag = OriginTag()
    site = _record("fl_imaging.client", origin="pid 12 on host")
    assert tag.filter(site) and site.origin_tag == "[pid 12 on host]"
    mine = _record("fl_imaging")
    assert tag.filter(mine) and mine.origin_tag == ""
    assert not tag.filter(_record("flwr", msg="   "))


# --- the sites' lines, from Ray's workers -------------------------------------------------------


@pytest.fixture
def captured() -> Iterator[list[logging.LogRecord]]:
    """Every record that reaches the root logger and the progress logger meanwhile."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    loggers = (logging.getLogger(), logging.getLogger(PROGRESS_LOGGER))
    for logger in loggers:
        logger.addHandler(keep)
    yield records
    for logger in loggers:
        logger.removeHandler(keep)


def test_a_record_line_comes_back_as_the_record_it_was() -> None:
    event = Progress(EPOCH, 3, site="site-1", node=4, epoch=2, epochs=3)
    record = _record("fl_imaging.client", logging.WARNING, "[site %s] x", **progress_extra(event))
    record.args = ("site-1",)
    back = record_from_line(MARKER + record_line(record))
    assert back is not None
    assert (back.name, back.levelno, back.getMessage()) == (record.name, 30, "[site site-1] x")
    assert back.created == record.created and progress_of(back) == event
    assert back.origin.startswith(f"pid {record.process} on ")
    assert record_from_line("INFO :  [ROUND 1/3]") is None
    assert record_from_line("{not json") is None


def test_every_line_a_worker_logs_reaches_this_process_in_order(
    tmp_path: Path, captured: list[logging.LogRecord]
) -> None:
    folder = tmp_path / "site-lines"
    folder.mkdir()
    worker = logging.getLogger("fl_imaging.client")
    root, flwr = logging.getLogger(), logging.getLogger("flwr")
    saved, flwr_saved = root.handlers[:], (flwr.handlers[:], flwr.level)
    levels = {n: logging.getLogger(n).level for n in ("fl_imaging", "fl_imaging.client")}
    try:
        send_site_lines(folder, worker)
        send_site_lines(folder, worker)  # once per process
        ours = [h for h in root.handlers if h not in saved]
        assert len(ours) == 1
        event = Progress(EPOCH, 1, site="site-1", node=3, epoch=1, epochs=2)
        worker.info("[site site-1] round 1 epoch 1/2: loss 0.9", extra=progress_extra(event))
        logging.getLogger("flwr").warning("Manually terminating ClientAppActor")
        tail = SiteLineTail(folder)
        files = list(folder.glob("*.jsonl"))
        with files[0].open("a") as stream:
            stream.write('{"name": "fl_imaging.client", "levelno": 20')  # half written
        root.handlers[:] = saved  # this process is the coordinator again
        captured.clear()
        assert tail.read() == 2
    finally:  # the test's process is not a worker: everything back as it was
        for handler in root.handlers[:]:
            if handler not in saved:
                root.removeHandler(handler)
                handler.close()
        flwr.handlers[:] = flwr_saved[0]
        flwr.setLevel(flwr_saved[1])
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        logging.captureWarnings(False)
    messages = [r.getMessage() for r in captured]
    assert messages == [
        "[site site-1] round 1 epoch 1/2: loss 0.9",
        "Manually terminating ClientAppActor",
    ]
    assert progress_of(captured[0]) == event and all(r.site_worker for r in captured)
    with files[0].open("a") as stream:
        stream.write(', "created": 1.0, "msg": "late"}\n')
    captured.clear()
    assert tail.read() == 1 and captured[0].getMessage() == "late"


def test_the_folder_of_the_sites_lines_is_read_at_the_end_and_removed(
    tmp_path: Path, captured: list[logging.LogRecord]
) -> None:
    record = _record("fl_imaging.client", msg="[site b] round 2 epoch 3/3")
    with site_lines_into_log(tmp_path) as folder:
        (folder / "host-1.jsonl").write_text(record_line(record) + "\n")
    assert not folder.exists()
    assert [r.getMessage() for r in captured] == ["[site b] round 2 epoch 3/3"]


def test_a_worker_without_the_run_folder_logs_to_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fl_imaging.console import site_lines

    to_stderr: list[logging.Logger] = []
    monkeypatch.setattr(site_lines, "show_progress", to_stderr.append)
    logger = logging.getLogger("fl_imaging.client")
    before = logging.getLogger().handlers[:]
    send_site_lines(tmp_path / "elsewhere", logger)  # another machine: no such folder
    send_site_lines(None, logger)  # a deployed site
    assert to_stderr == [logger, logger] and logging.getLogger().handlers == before


# --- a deployment's stream ---------------------------------------------------------------------


def test_flowers_stream_is_logged_our_records_as_they_were_and_the_rest_without_colour(
    captured: list[logging.LogRecord],
) -> None:
    ours = _record("fl_imaging.server", msg="round 1/2  train loss 0.5")
    ours.__dict__.update(progress_extra(Progress(ROUND_ENDED, 1, 2, detail="round 1/2")))
    marked = RecordLineFormatter().format(ours)
    lines = [
        marked + "\n",
        "\x1b[92mINFO \x1b[0m:      \t├── Number of rounds: 2\n",
        "\x1b[91mERROR \x1b[0m:     ServerApp raised an exception\n",
        "Successfully started run 42\n",
        "\n",
    ]
    for line in lines:
        log_flower_output(line)
    assert [(r.name, r.levelno, r.getMessage()) for r in captured] == [
        ("fl_imaging.server", logging.INFO, "round 1/2  train loss 0.5"),
        (FLOWER_OUTPUT_LOGGER, logging.INFO, "├── Number of rounds: 2"),
        (FLOWER_OUTPUT_LOGGER, logging.ERROR, "ServerApp raised an exception"),
        (FLOWER_OUTPUT_LOGGER, logging.INFO, "Successfully started run 42"),
    ]
    assert progress_of(captured[0]) == Progress(ROUND_ENDED, 1, 2, detail="round 1/2")
    assert readable_line(marked) == "round 1/2  train loss 0.5"
    assert readable_line(lines[2]) == "ERROR :     ServerApp raised an exception"


# --- fl-imaging --help -------------------------------------------------------------------------


def _help(tmp_path: Path) -> str:
    """What ``fl-imaging --help`` prints, run as its own process: Hydra reconfigures logging
    for the help, which in this process would close the handlers other libraries (absl) made
    on pytest's captured stderr."""
    return run_cli("fl-imaging", "--help", cwd=tmp_path).stdout


def test_help_says_what_the_tool_does_lists_every_choice_and_is_short(tmp_path: Path) -> None:
    text = _help(tmp_path)
    assert len(text.splitlines()) < 80
    assert "powered by Hydra" not in text and "== Config ==" not in text
    assert text.startswith("fl-imaging: train a MONAI imaging model")
    groups = ("task", "data", "strategy", "engine", "attack", "tracking", "experiment")
    listed = {line.split()[0] for line in text.splitlines() if line.startswith("  ")}
    assert set(groups) <= listed and "base" not in listed and "bench" not in listed
    for group in groups:
        for option in sorted((config_dir() / group).glob("*.yaml")):
            assert option.stem in text, f"{group}={option.stem} is not in fl-imaging --help"
    for command in ("data", "predict", "deploy", "bench", "audit"):
        assert f"fl-imaging-{command} " in text
