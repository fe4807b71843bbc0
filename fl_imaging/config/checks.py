"""The value rules of the config that its types cannot express (ranges, combinations).

:func:`config_problems` lists every broken rule of a typed
:class:`~fl_imaging.config.schema.RunConfig`,
each naming the key, its value and what is allowed; :func:`fl_imaging.config.validate_config`
raises them together.
"""

from __future__ import annotations

from fl_imaging.config.devices import device_spec_problem
from fl_imaging.config.schema import (
    CHOICE_NULLS,
    CHOICES,
    CompressionMode,
    DataName,
    DPMode,
    ModelName,
    PartitionName,
    RunConfig,
    StrategyConfig,
    TaskName,
)
from fl_imaging.config.strategy_checks import strategy_rule_problems

__all__ = ["choice_problems", "config_problems", "in_channels_problem"]


def in_channels_problem(modalities: list[str] | tuple[str, ...], in_channels: int) -> str | None:
    """One sentence when ``task.in_channels`` differs from the number of ``modalities``
    (``data.modalities``, stacked as channels), naming both values and the override to set;
    None when they agree or no modality is listed."""
    if not modalities or len(modalities) == in_channels:
        return None
    return (
        f"data.modalities lists {len(modalities)} modalities ({', '.join(modalities)}), stacked "
        f"as {len(modalities)} channels, but task.in_channels={in_channels}: set "
        f"task.in_channels={len(modalities)}"
    )


def _modalities_problems(modalities: list[str]) -> list[str]:
    """``data.modalities``: folder names (no path separator, not hidden), each listed once."""
    problems = [
        f"data.modalities: {m!r} is not a folder name; name each modality by its folder under "
        "images/, e.g. [t1,t1c,t2,flair]"
        for m in modalities
        if not m or "/" in m or "\\" in m or m.startswith(".") or m != m.strip()
    ]
    repeated = sorted({m for m in modalities if modalities.count(m) > 1})
    if repeated:
        problems.append(f"data.modalities lists {', '.join(repeated)} more than once")
    return problems


def choice_problems(run: RunConfig) -> list[str]:
    """One message for each key of :data:`~fl_imaging.config.schema.CHOICES` whose value in
    ``run`` is not one of its words, naming the key, the value and every allowed value (null
    too, where the key may be null)."""
    problems: list[str] = []
    for key, allowed in CHOICES.items():
        node: object = run
        for part in key.split("."):
            node = getattr(node, part)
        if node in allowed or (node is None and key in CHOICE_NULLS):
            continue
        null = f"null ({CHOICE_NULLS[key]}), " if key in CHOICE_NULLS else ""
        problems.append(f"{key}={node}: allowed values are {null}{', '.join(allowed)}")
    return problems


def config_problems(run: RunConfig) -> list[str]:
    """Every value rule ``run`` breaks, one message each (empty when none)."""
    problems: list[str] = choice_problems(run)
    task, data, engine = run.task, run.data, run.engine
    if task.spatial_dims not in (2, 3):
        problems.append(f"task.spatial_dims={task.spatial_dims}: allowed values are 2 and 3")
    if len(task.roi_size) != task.spatial_dims:
        problems.append(
            f"task.roi_size={task.roi_size} has {len(task.roi_size)} entries but "
            f"task.spatial_dims={task.spatial_dims}: give one size per spatial axis"
        )
    if min(task.roi_size, default=1) < 1:
        problems.append(
            f"task.roi_size={task.roi_size}: every size (voxels) must be 1 or more, e.g. [32,32,32]"
        )
    if task.spacing is not None and len(task.spacing) != task.spatial_dims:
        problems.append(f"task.spacing={task.spacing}: give one spacing (mm) per spatial axis")
    if task.spacing is not None and min(task.spacing, default=1.0) <= 0:
        problems.append(
            f"task.spacing={task.spacing}: every spacing (mm) must be positive, e.g. [1,1,1], "
            "or null to keep each image's own"
        )
    if task.bundle is not None and not task.bundle.strip():
        problems.append(
            "task.bundle is empty: task=bundle needs the MONAI bundle folder, task.bundle=PATH"
        )
    if task.in_channels < 1:
        problems.append(f"task.in_channels={task.in_channels}: must be 1 or more")
    problems += _modalities_problems(list(data.modalities))
    if data.modalities and data.name not in (DataName.demo, DataName.folders):
        problems.append(
            f"data.modalities={list(data.modalities)} with data={data.name.value}: multi-modal "
            "cases are read from site folders (data=folders) or written by the demo (data=demo); "
            "a public dataset is read in its own layout: set data.modalities=[]"
        )
    if (channels := in_channels_problem(list(data.modalities), task.in_channels)) is not None:
        problems.append(channels)
    if task.sw_batch_size < 1 or not 0.0 <= task.sw_overlap < 1.0:
        problems.append(
            f"task.sw_batch_size={task.sw_batch_size}, task.sw_overlap={task.sw_overlap}: the "
            "batch size must be 1 or more and the overlap in [0, 1)"
        )
    if task.num_classes < 2:
        problems.append(f"task.num_classes={task.num_classes}: must be 2 or more")
    if not task.model.channels or min(task.model.channels) < 1:
        problems.append(f"task.model.channels={task.model.channels}: give positive widths")
    seg_models, cls_models = (
        {ModelName.unet, ModelName.segresnet},
        {
            ModelName.densenet,
            ModelName.resnet,
        },
    )
    allowed_models = seg_models if task.name == TaskName.segmentation else cls_models
    if task.model.name not in allowed_models:
        problems.append(
            f"task.model.name={task.model.name.value} does not fit task {task.name.value}: "
            f"allowed values are {', '.join(sorted(m.value for m in allowed_models))}"
        )
    if task.model.name == ModelName.unet and len(task.model.channels) < 2:
        problems.append("task.model.channels: the U-Net needs at least 2 levels, e.g. [8,16,32]")
    if task.model.name == ModelName.resnet and len(task.model.channels) != 4:
        problems.append(
            f"task.model.channels={task.model.channels}: the ResNet needs exactly 4 widths, "
            "e.g. [8,16,32,64]"
        )
    for name, value in (
        ("task.local_epochs", task.local_epochs),
        ("task.batch_size", task.batch_size),
        ("engine.cpus_per_client", engine.cpus_per_client),
    ):
        if value < 1:
            problems.append(f"{name}={value}: must be 1 or more")
    problems += _evaluation_only_problems(run)
    if (problem := device_spec_problem(task.device)) is not None:
        problems.append(problem)
    if not engine.gpus_per_client >= 0:
        problems.append(
            f"engine.gpus_per_client={engine.gpus_per_client}: must be 0 (no GPU reserved) or "
            "more; fractions share one GPU between sites, e.g. 0.5"
        )
    if task.optimizer.lr <= 0:
        problems.append(f"task.optimizer.lr={task.optimizer.lr}: must be positive")
    if not 0.0 < data.val_fraction < 1.0:
        problems.append(f"data.val_fraction={data.val_fraction}: must be between 0 and 1")
    if not 0.0 <= data.public_fraction < 1.0:
        problems.append(f"data.public_fraction={data.public_fraction}: must be in [0, 1)")
    elif data.public_fraction and data.name in (DataName.demo, DataName.folders):
        problems.append(
            f"data.public_fraction={data.public_fraction} holds out cases of a public dataset "
            f"(data=hippocampus, mednist, adrenal3d); data={data.name.value} has no pool to hold "
            "them out from: keep it 0, or give the public model with task.model.init=PATH"
        )
    if not 0.0 <= data.test_fraction < 1.0 or data.val_fraction + data.test_fraction >= 1.0:
        problems.append(
            f"data.test_fraction={data.test_fraction}: must be in [0, 1) and leave training "
            f"cases next to data.val_fraction={data.val_fraction}"
        )
    if data.num_sites < 1:
        problems.append(f"data.num_sites={data.num_sites}: must be 1 or more")
    if data.max_cases is not None and data.max_cases < data.num_sites:
        problems.append(f"data.max_cases={data.max_cases}: must be at least data.num_sites")
    dp = run.strategy.dp
    if dp.mode != DPMode.none and (
        dp.noise_multiplier < 0 or dp.clipping_norm <= 0 or not 0 < dp.target_delta < 1
    ):
        problems.append(
            "strategy.dp: noise_multiplier must be >= 0, clipping_norm > 0 and target_delta in "
            "(0, 1)"
        )
    if dp.max_epsilon is not None and dp.max_epsilon <= 0:
        problems.append(f"strategy.dp.max_epsilon={dp.max_epsilon}: must be positive")
    attack = run.attack
    if not 0.0 <= attack.fraction < 1.0 or attack.scale <= 0 or attack.norm <= 0:
        problems.append("attack: fraction must be in [0, 1), scale and norm positive")
    part = data.partition
    if part.alpha <= 0:
        problems.append(f"data.partition.alpha={part.alpha}: must be positive (e.g. 0.5)")
    if part.name == PartitionName.sizes and (
        len(part.sizes) != data.num_sites or min(part.sizes, default=0) <= 0
    ):
        problems.append(
            f"data.partition.sizes={part.sizes}: give one positive size (cases or share) per "
            f"site, {data.num_sites} in all (data.num_sites)"
        )
    if part.min_cases < 1 or part.size_bins < 2 or part.shift_strength < 0:
        problems.append(
            "data.partition: min_cases must be >= 1, size_bins >= 2 and shift_strength >= 0"
        )
    if engine.finetune_epochs < 0:
        problems.append(f"engine.finetune_epochs={engine.finetune_epochs}: must be 0 or more")
    if engine.num_sites is not None and engine.num_sites < 1:
        problems.append(f"engine.num_sites={engine.num_sites}: must be 1 or more (or null)")
    if engine.round_timeout <= 0 or engine.wait_timeout < 0:
        problems.append(
            f"engine.round_timeout={engine.round_timeout}, engine.wait_timeout="
            f"{engine.wait_timeout}: seconds, the first positive, the second 0 or more"
        )
    if engine.clients_per_round is not None and engine.clients_per_round < 1:
        problems.append(f"engine.clients_per_round={engine.clients_per_round}: must be 1 or more")
    problems.extend(_strategy_problems(run.strategy))
    problems.extend(strategy_rule_problems(run))
    problems.extend(_site_evaluation_problems(run))
    problems.extend(_dp_sgd_problems(run))
    tracking = run.tracking
    if not tracking.experiment.strip():
        problems.append("tracking.experiment is empty: name the MLflow experiment, e.g. fl-imaging")
    if any(not str(key).strip() for key in tracking.tags):
        problems.append(
            "tracking.tags: every tag needs a name, e.g. +tracking.tags.site_group=north"
        )
    return problems


def _evaluation_only_problems(run: RunConfig) -> list[str]:
    """What an evaluation-only run (``engine.rounds=0``: no training round, the given model
    scored on every site's test cases, ``fl-imaging-eval``) needs: a model to score
    (``task.model.init``), the test round (``engine.test``), and nothing that trains at the
    sites (fine-tuning, cross-site evaluation's site models, contributions); a negative
    ``engine.rounds`` is refused."""
    engine = run.engine
    if engine.rounds < 0:
        return [f"engine.rounds={engine.rounds}: must be 1 or more (0: evaluation only)"]
    if engine.rounds > 0:
        return []
    only = "engine.rounds=0 is an evaluation-only run (fl-imaging-eval)"
    problems = []
    if not run.task.model.init:
        problems.append(f"{only}: give the model it scores, task.model.init=PATH")
    if run.resume:
        problems.append(f"{only}: it resumes nothing; leave resume= out")
    if not engine.test:
        problems.append(
            f"{only}: it scores the model on the sites' test cases; set engine.test=true"
        )
    trains = [
        f"{key}={value}"
        for key, value, on in (
            ("engine.finetune_epochs", engine.finetune_epochs, engine.finetune_epochs > 0),
            ("engine.cross_site", engine.cross_site, engine.cross_site),
            ("engine.contributions", engine.contributions, engine.contributions),
        )
        if on
    ]
    if trains:
        problems.append(
            f"{only}: no site trains in it, but {', '.join(trains)} needs models trained at the "
            "sites; leave them out or train at least one round"
        )
    return problems


def _site_evaluation_problems(run: RunConfig) -> list[str]:
    """Cross-site evaluation and contributions need single site models, which secure
    aggregation hides from the coordinator and which DP's accounting does not cover."""
    problems: list[str] = []
    engine, strategy = run.engine, run.strategy
    wanted = [
        (key, why)
        for key, on, why in (
            (
                "engine.cross_site",
                engine.cross_site,
                "sends each site's own model (fine-tuned, or its last update) to the "
                "coordinator and to every other site",
            ),
            (
                "engine.contributions",
                engine.contributions,
                "computes leave-one-out aggregates from each site's update of the last round",
            ),
        )
        if on
    ]
    for key, why in wanted:
        if strategy.secagg.enabled:
            problems.append(
                f"{key}=true {why}, which strategy.secagg.enabled=true exists to hide from the "
                f"coordinator: turn one of them off (the test round, engine.test=true, scores "
                "the global model at every site with secure aggregation on)"
            )
        if strategy.he.enabled:
            problems.append(
                f"{key}=true {why}, which strategy.he.enabled=true keeps encrypted: the "
                "coordinator holds no site's model in the clear; turn one of them off (the "
                "test round, engine.test=true, scores the decrypted global model at every site)"
            )
        if strategy.dp.mode != DPMode.none:
            problems.append(
                f"{key}=true {why}, outside the privacy accounting of strategy.dp.mode="
                f"{strategy.dp.mode.value} (the epsilon covers the global model only): turn one "
                "of them off"
            )
    return problems


#: Aggregators whose guarantee needs a minimum number of updates per round (Krum: 2f+3,
#: Bulyan: 4f+3): a site that stops training at its DP-SGD budget would lower that number.
_COUNTING_AGGREGATORS = ("krum", "multikrum", "bulyan")


def _dp_sgd_problems(run: RunConfig) -> list[str]:
    """The rules of ``task.dp_sgd`` (patient-level DP), each message naming the key."""
    dp = run.task.dp_sgd
    if not dp.enabled:
        return []
    problems: list[str] = []
    if dp.target_epsilon is None and dp.noise_multiplier is None:
        problems.append(
            "task.dp_sgd.enabled=true needs task.dp_sgd.target_epsilon (each site derives its "
            "noise from it) or task.dp_sgd.noise_multiplier (fixed noise), e.g. "
            "task.dp_sgd.target_epsilon=8"
        )
    if dp.target_epsilon is not None and not dp.target_epsilon > 0:
        problems.append(f"task.dp_sgd.target_epsilon={dp.target_epsilon}: must be positive")
    if dp.noise_multiplier is not None and not dp.noise_multiplier > 0:
        problems.append(
            f"task.dp_sgd.noise_multiplier={dp.noise_multiplier}: must be positive (0 adds no "
            "noise: no epsilon exists)"
        )
    if not 0 < dp.delta < 1:
        problems.append(f"task.dp_sgd.delta={dp.delta}: must be in (0, 1), e.g. 1e-5")
    if not dp.max_grad_norm > 0:
        problems.append(f"task.dp_sgd.max_grad_norm={dp.max_grad_norm}: must be positive")
    if run.task.amp:
        problems.append(
            "task.amp=true with task.dp_sgd.enabled=true: Opacus clips and noises per-case "
            "gradients that gradient scaling would have multiplied, and neither its clipping "
            "nor its accounting is validated under float16 autocast; set task.amp=false"
        )
    if run.engine.finetune_epochs > 0:
        problems.append(
            f"engine.finetune_epochs={run.engine.finetune_epochs} with task.dp_sgd.enabled=true: "
            "fine-tuning trains on the sites' patients without DP-SGD and its test scores leave "
            "the site, outside every site's epsilon; set engine.finetune_epochs=0"
        )
    stops = dp.noise_multiplier is not None and dp.target_epsilon is not None
    if stops and run.strategy.name in _COUNTING_AGGREGATORS:
        problems.append(
            f"strategy={run.strategy.name} with task.dp_sgd.noise_multiplier and "
            "task.dp_sgd.target_epsilon: a site stops training when its budget is spent, which "
            f"lowers the number of updates {run.strategy.name}'s guarantee counts on; give "
            "target_epsilon alone (the noise is then derived so that no site stops) or use "
            "fedmedian, fedtrimmedavg or geomedian"
        )
    return problems


def _strategy_problems(strategy: StrategyConfig) -> list[str]:
    problems: list[str] = []
    checks = strategy.validation
    if not checks.norm_factor > 1.0:
        problems.append(
            f"strategy.validation.norm_factor={checks.norm_factor}: must be greater than 1"
        )
    if strategy.norm_bound is not None and not strategy.norm_bound > 0:
        problems.append(f"strategy.norm_bound={strategy.norm_bound}: must be positive")
    secagg = strategy.secagg
    modulus, levels = secagg.modulus, secagg.quantization_range
    if not 2**16 <= modulus <= 2**32 or modulus & (modulus - 1):
        problems.append(
            f"strategy.secagg.modulus={modulus}: must be a power of two from 2**16 to 2**32"
        )
    if not 2 <= levels <= min(2**30, modulus // 2):
        problems.append(
            f"strategy.secagg.quantization_range={levels}: must be from 2 to the smaller of 2**30 "
            "and modulus / 2 (the sum of the sites' values must stay below the modulus)"
        )
    if not secagg.clipping_range > 0 or not secagg.max_weight > 0 or not secagg.threshold > 0:
        problems.append(
            "strategy.secagg: clipping_range, max_weight and threshold must be positive"
        )
    problems.extend(_compression_problems(strategy))
    return problems


def _compression_problems(strategy: StrategyConfig) -> list[str]:
    """What ``strategy.compression`` cannot do: a top-k fraction outside (0, 1], and any
    compression under secure aggregation."""
    problems: list[str] = []
    if not 0.0 < strategy.compression_topk <= 1.0:
        problems.append(
            f"strategy.compression_topk={strategy.compression_topk}: the fraction of each "
            "tensor's entries a site sends must be in (0, 1], e.g. 0.1"
        )
    if strategy.compression != CompressionMode.none and strategy.secagg.enabled:
        problems.append(
            f"strategy.compression={strategy.compression.value} with "
            "strategy.secagg.enabled=true: a masked update is a vector of uniformly random "
            "integers modulo strategy.secagg.modulus, so sparsity and half precision are lost "
            "(every entry must be sent), and secure aggregation already quantises the update "
            "(strategy.secagg.quantization_range); use strategy.compression=none with secure "
            "aggregation, or turn it off to compress"
        )
    return problems
