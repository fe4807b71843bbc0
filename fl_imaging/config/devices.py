"""Where a site computes: ``task.device`` resolved on the site's own machine, mixed precision
(``task.amp``), the device a training reply reports, and the GPU checks made before a simulation.

``task.device`` is resolved where a task is built to train or score (a site's trainer, the
baselines, the benchmark's scoring, ``fl-imaging-predict``), never on the coordinator for a
deployed site: in a deployment each SuperNode's machine decides. The coordinator only builds the
model, on the CPU. Mixed precision follows MONAI's trainers (``torch.autocast`` in float16 and
``torch.amp.GradScaler``) and runs on CUDA only; on a CPU it is ignored, with one warning per site.

torch is imported inside the functions, so that the config checks (which use
:func:`device_spec_problem`) stay free of it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from fl_imaging.config.errors import ConfigError
from fl_imaging.config.schema import RunConfig, TaskConfig

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEVICE_METRIC",
    "MIXED_PRECISION_METRIC",
    "SITE_ONLY_METRICS",
    "check_simulation_devices",
    "device_code",
    "device_metrics",
    "device_name",
    "device_spec_problem",
    "resolve_device",
    "site_device",
]

log = logging.getLogger("fl_imaging")

#: Training-reply metric: the device the site trained on, -1 for ``cpu``, N for ``cuda:N`` (as
#: the site's process numbers its GPUs: under Ray, among the GPUs Ray gave it).
DEVICE_METRIC = "device"
#: Training-reply metric: 1 when the site trained with mixed precision (``task.amp`` on CUDA).
MIXED_PRECISION_METRIC = "mixed_precision"
#: Reply metrics that describe one site only: no aggregate (site ``all``) is recorded for them.
SITE_ONLY_METRICS = (DEVICE_METRIC, MIXED_PRECISION_METRIC)

_SPEC = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def device_spec_problem(spec: str) -> str | None:
    """Why ``spec`` is no valid ``task.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``), as a
    message naming the key; None when it is valid. Checks the spelling only: whether the GPU
    exists is for the machine that trains (:func:`resolve_device`)."""
    if _SPEC.fullmatch(spec):
        return None
    return (
        f"task.device={spec}: allowed values are auto (a GPU when torch sees one, else the CPU), "
        "cpu, cuda (the first GPU) and cuda:N (GPU number N, from 0)"
    )


def resolve_device(spec: str, where: str = "this machine") -> torch.device:
    """The torch device ``spec`` (a ``task.device`` value) names on this machine.

    Args:
        spec: ``auto`` (``cuda:0`` when torch sees a CUDA GPU, else ``cpu``), ``cpu``, ``cuda``
            (the same as ``cuda:0``: the first GPU this process sees; under Ray with
            ``engine.gpus_per_client`` > 0, the GPU Ray gave it) or ``cuda:N``.
        where: who resolves it, for the message (``site hospital-1``, ``fl-imaging-predict``).

    Returns:
        ``torch.device("cpu")`` or ``torch.device("cuda", N)`` (always with its index).

    Raises:
        ConfigError: for a misspelt ``spec``, or ``cuda``/``cuda:N`` when torch sees no CUDA GPU
            here or fewer than N + 1; the message names ``where`` and the key.
    """
    import torch

    if (problem := device_spec_problem(spec)) is not None:
        raise ConfigError(f"[{where}] {problem}")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = (
            "this torch is a CPU-only build"
            if torch.version.cuda is None
            else "no GPU is visible (driver, CUDA_VISIBLE_DEVICES)"
        )
        raise ConfigError(
            f"[{where}] task.device={spec}, but torch sees no CUDA GPU on this machine ({why}): "
            "set task.device=auto (a GPU where there is one) or cpu, or train there with a GPU "
            "and a CUDA build of torch"
        )
    index = int(spec.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"[{where}] task.device={spec}, but torch sees {count} CUDA GPU(s) on this machine "
            f"(cuda:0 to cuda:{count - 1}): set task.device=cuda or auto, or a number below {count}"
        )
    return torch.device("cuda", index)


def site_device(cfg: TaskConfig, where: str) -> torch.device:
    """:func:`resolve_device` of ``cfg.device`` for ``where`` (``site hospital-1``, ``pooled
    baseline``: named in a refusal), with one warning when ``cfg.amp`` is on but the device is
    a CPU (mixed precision is then ignored)."""
    device = resolve_device(cfg.device, where)
    if cfg.amp and device.type != "cuda":
        log.warning(
            "[%s] task.amp=true is ignored on %s: mixed precision runs on CUDA only; training "
            "and scoring run in float32",
            where,
            device,
        )
    return device


def device_code(device: torch.device) -> float:
    """The :data:`DEVICE_METRIC` of ``device``: -1.0 for a CPU, N for ``cuda:N``."""
    return -1.0 if device.type != "cuda" else float(device.index or 0)


def device_name(code: float) -> str:
    """The device a :data:`DEVICE_METRIC` value stands for: ``cpu`` or ``cuda:N``."""
    return "cpu" if code < 0 else f"cuda:{int(code)}"


def device_metrics(device: torch.device, amp: bool) -> dict[str, float]:
    """What a site's training reply says about where it trained: :data:`DEVICE_METRIC` and
    :data:`MIXED_PRECISION_METRIC` (``amp``: whether mixed precision was on)."""
    return {DEVICE_METRIC: device_code(device), MIXED_PRECISION_METRIC: float(amp)}


class _Row(Protocol):
    round: int
    site: str
    metric: str
    value: float


def devices_line(rows: Iterable[_Row]) -> str:
    """One line for summary.txt naming the device each site trained on, e.g. ``devices:
    site-1 cpu, site-2 cuda:0 (mixed precision)`` (devices joined with ``/`` when a site used
    several); empty when no reply said (runs of earlier versions, baselines)."""
    used: dict[str, set[str]] = {}
    mixed: set[str] = set()
    for row in rows:
        if row.metric == DEVICE_METRIC and row.site != "all":
            used.setdefault(row.site, set()).add(device_name(row.value))
        elif row.metric == MIXED_PRECISION_METRIC and row.value >= 1:
            mixed.add(row.site)
    if not used:
        return ""
    parts = [
        f"{site} {'/'.join(sorted(names))}" + (" (mixed precision)" if site in mixed else "")
        for site, names in sorted(used.items())
    ]
    return "devices: " + ", ".join(parts)


def check_simulation_devices(cfg: RunConfig) -> None:
    """Before a simulation on this machine (no ``engine.ray_address``: a cluster's GPUs are used
    as they are), refuse what would make it fail or hang: ``engine.gpus_per_client`` > 0 when
    torch sees no GPU (Ray would wait for ever for a GPU actor), ``task.device=cuda[:N]`` that
    no GPU here matches (every site would fail); warn when the sites will use a GPU that Ray
    does not share out (``engine.gpus_per_client`` = 0). Raises :class:`ConfigError`."""
    import torch

    if cfg.engine.ray_address:
        return
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    share = cfg.engine.gpus_per_client
    if share > 0 and gpus == 0:
        raise ConfigError(
            f"engine.gpus_per_client={share:g}, but torch sees no CUDA GPU on this machine: Ray "
            "would wait for ever for a GPU to start the sites on; set engine.gpus_per_client=0 "
            "(and task.device=auto or cpu)"
        )
    device = resolve_device(cfg.task.device, "simulation on this machine")
    if device.type == "cuda" and 0 < share and (device.index or 0) >= math.ceil(share):
        raise ConfigError(
            f"task.device={cfg.task.device} with engine.gpus_per_client={share:g}: Ray shows each "
            f"site actor only the {math.ceil(share)} GPU(s) it gave it, numbered from cuda:0; "
            "set task.device=cuda (or auto)"
        )
    if device.type == "cuda" and share == 0:
        log.warning(
            "task.device=%s with engine.gpus_per_client=0: every site actor uses %s without Ray "
            "sharing it out, so the sites running together share its memory uncounted; set "
            "engine.gpus_per_client (e.g. 0.5: two sites per GPU)",
            cfg.task.device,
            device,
        )
