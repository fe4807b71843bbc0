"""The typed schema of fl-imaging's Hydra configuration: one dataclass per config group.

``conf/`` mirrors these classes (``conf/task`` -> :class:`TaskConfig`, ...); enums list the
allowed names. :mod:`fl_imaging.config` checks a composed config against this schema and holds
the rules OmegaConf cannot express (:mod:`fl_imaging.config.checks`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CHOICES",
    "CHOICE_NULLS",
    "SECAGG_WEIGHTINGS",
    "AttackConfig",
    "AttackName",
    "BenchConfig",
    "CompressionMode",
    "DPConfig",
    "DPMode",
    "DPSGDAccountant",
    "DPSGDConfig",
    "DataConfig",
    "DataName",
    "EngineConfig",
    "EngineName",
    "IntensityPreset",
    "LossConfig",
    "MODEL_NORMS",
    "ModelConfig",
    "ModelName",
    "NORM_OUTLIER_ACTIONS",
    "OptimizerConfig",
    "OptimizerName",
    "PartitionBy",
    "PartitionConfig",
    "PartitionName",
    "RunConfig",
    "SecAggConfig",
    "SiteConfig",
    "StrategyConfig",
    "TaskConfig",
    "TaskName",
    "TrackingBackend",
    "TrackingConfig",
    "TransformsConfig",
    "UpdateValidationConfig",
    "model_label",
]

#: Allowed values of ``task.model.norm`` (MONAI's names of normalisation layers).
MODEL_NORMS = ("batch", "instance")

#: Allowed values of ``strategy.validation.norm_outliers``.
NORM_OUTLIER_ACTIONS = ("flag", "reject")

#: Allowed values of ``strategy.secagg.weighting`` (see :class:`SecAggConfig`).
SECAGG_WEIGHTINGS = ("auto", "cases", "equal")

#: Every string key whose value must be one of a few words (the schema's enums aside), with
#: those words; :mod:`fl_imaging.config.checks` refuses any other value, naming them.
CHOICES: dict[str, tuple[str, ...]] = {
    "task.model.norm": MODEL_NORMS,
    "strategy.validation.norm_outliers": NORM_OUTLIER_ACTIONS,
    "strategy.secagg.weighting": SECAGG_WEIGHTINGS,
}
#: What null means for a key of :data:`CHOICES` that may be null.
CHOICE_NULLS = {"task.model.norm": "the network's default"}


class TaskName(enum.StrEnum):
    segmentation = "segmentation"
    classification = "classification"


class ModelName(enum.StrEnum):
    unet = "unet"
    segresnet = "segresnet"
    densenet = "densenet"
    resnet = "resnet"


class DataName(enum.StrEnum):
    """Where the sites' cases come from (see ``fl_imaging/data/``)."""

    demo = "demo"  # synthetic demo, written on first use
    folders = "folders"  # one folder per hospital, used as they are
    msd = "msd"  # a Medical Segmentation Decathlon task, split into simulated sites
    class_folders = "class_folders"  # 2D/3D images in one sub-folder per class, split into sites
    medmnist = "medmnist"  # a MedMNIST .npz file (official train/val/test), split into sites


class PartitionName(enum.StrEnum):
    """How a public dataset is split into simulated sites (see ``fl_imaging/data/partition.py``)."""

    iid = "iid"
    dirichlet = "dirichlet"
    sizes = "sizes"
    shift = "shift"


class PartitionBy(enum.StrEnum):
    label = "label"  # classification: the class; segmentation: not available
    size = "size"  # segmentation: foreground volume of the label (quantile bins)


class DPMode(enum.StrEnum):
    """Client-level differential privacy: Flower's wrappers around FedAvg."""

    none = "none"
    server_fixed = "server_fixed"  # server clips each update and adds noise (central DP)
    client_fixed = "client_fixed"  # each site clips its own update; the server adds noise
    server_adaptive = "server_adaptive"  # clipping norm learnt from a noisy quantile
    client_adaptive = "client_adaptive"


class CompressionMode(enum.StrEnum):
    """How a site encodes its update before sending it (see ``fl_imaging/compression/codec.py``)."""

    none = "none"  # the trained weights as they are (float32)
    fp16 = "fp16"  # the update in half precision
    int8 = "int8"  # the update quantised to int8 with one float32 scale per tensor
    topk = "topk"  # the largest-magnitude entries of each tensor (indices and values)


class AttackName(enum.StrEnum):
    """Simulated malicious sites, for benchmarking robust strategies (simulation only)."""

    none = "none"
    signflip = "signflip"  # sends -scale x its honest update
    scale = "scale"  # sends scale x its honest update
    noise = "noise"  # sends Gaussian noise with the norm of scale x its honest update
    labelflip = "labelflip"  # trains on permuted labels
    collusion = "collusion"  # every malicious site sends the same crafted update
    dropout = "dropout"  # not an attack: the site fails its training in attack.rounds


class OptimizerName(enum.StrEnum):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


@dataclass
class ModelConfig:
    name: ModelName = ModelName.unet
    channels: list[int] = field(default_factory=lambda: [8, 16, 32])
    num_res_units: int = 1
    dropout: float = 0.0
    #: Normalisation layers: None = the MONAI network's own default (instance norm without
    #: parameters in the U-Net, batch norm in the DenseNet); "batch" or "instance".
    norm: str | None = None
    #: Any MONAI (or torch) network instead of ``name``: its import path, e.g.
    #: ``monai.networks.nets.SwinUNETR``; ``args`` are its keyword arguments (``spatial_dims``,
    #: ``in_channels``, ``out_channels`` / ``num_classes`` come from the task where it takes
    #: them). ``name``, ``channels``, ``num_res_units``, ``dropout`` and ``norm`` are then unused.
    _target_: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    #: Warm start: the weights the run starts from instead of random ones: a ``state_dict``
    #: file (``.pt``), a run folder (its ``model.pt``) or a MONAI bundle folder (its
    #: ``models/model.pt``); checked against the network before any round. A relative path is
    #: taken from the folder the command runs in. ``resume=`` wins over it.
    init: str | None = None
    #: The parameters the sites train, as fnmatch patterns over the network's parameter names
    #: (``model.named_parameters()``, e.g. ``model.2.*``); the others stay as they are
    #: (frozen). Empty: every parameter.
    trainable: list[str] = field(default_factory=list)


def model_label(model: ModelConfig) -> str:
    """What a run's network is, in a few characters: the class name of ``model._target_``
    (``SwinUNETR``) when set, else ``model.name`` (``unet``); for run names and site policies
    (``accept.models`` lists such labels)."""
    return model._target_.rsplit(".", 1)[-1] if model._target_ else model.name.value


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adam
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    #: Any ``torch.optim`` optimizer instead of ``name`` (e.g. ``torch.optim.RMSprop``), built
    #: with ``lr`` and ``weight_decay`` where it takes them, plus ``args``.
    _target_: str | None = None
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    """The training loss (``task.loss``): None = the task's (segmentation: MONAI's DiceCELoss;
    classification: cross-entropy), else the import path of a loss module, e.g.
    ``monai.losses.DiceFocalLoss``, with ``args`` (segmentation losses that take them get
    ``to_onehot_y=True`` and ``softmax=True``, since the network gives logits and the labels
    are class indices)."""

    _target_: str | None = None
    args: dict[str, Any] = field(default_factory=dict)


class IntensityPreset(enum.StrEnum):
    """How image intensities are normalised (``task.transforms.intensity``)."""

    zscore = "zscore"  # per channel over every voxel (any modality; the default)
    ct = "ct"  # CT: Hounsfield units clipped to task.transforms.hu_window, scaled to [0, 1]
    mr = "mr"  # MR: per channel over the non-zero voxels (the body or brain, not the air)
    none = "none"  # as stored


@dataclass
class TransformsConfig:
    """The transform chain around the task's fixed steps (decode, RAS orientation, optional
    spacing): ``intensity`` (a preset), ``hu_window`` (``ct``: [lower, upper] HU), and MONAI dict
    transforms as ``_target_`` items, e.g. ``{_target_: RandGaussianNoised, keys: image, prob:
    0.2}``: ``preprocessing`` after the intensity step (deterministic: cached, and part of an
    exported bundle's inference transforms), ``augmentation`` after the task's crop and flip
    (training only)."""

    intensity: IntensityPreset = IntensityPreset.zscore
    hu_window: list[float] = field(default_factory=lambda: [-175.0, 250.0])
    preprocessing: list[dict[str, Any]] = field(default_factory=list)
    augmentation: list[dict[str, Any]] = field(default_factory=list)


class DPSGDAccountant(enum.StrEnum):
    """Opacus' accountants of DP-SGD's sampled Gaussian mechanism (``task.dp_sgd.accountant``)."""

    rdp = "rdp"  # Renyi DP (Mironov 2017; Abadi et al. 2016's moments accountant)
    prv = "prv"  # privacy random variables (Gopi et al. 2021): tighter, slower


@dataclass
class DPSGDConfig:
    """Patient-level (record-level) DP: DP-SGD at every site (``task.dp_sgd``, Opacus).

    Each site clips every case's gradient to ``max_grad_norm`` (L2), adds Gaussian noise of
    std ``noise_multiplier * max_grad_norm`` to the sum of a Poisson-sampled batch (rate
    ``task.batch_size`` / training cases) and accounts its own (epsilon, ``delta``) with
    ``accountant``. With ``target_epsilon`` alone, each site derives its noise multiplier so that
    the whole run stays within it; with ``noise_multiplier`` set, that noise is used and a
    ``target_epsilon`` (optional) is a budget: a site whose next round would exceed it stops
    training.
    """

    enabled: bool = False
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: DPSGDAccountant = DPSGDAccountant.rdp


@dataclass
class TaskConfig:
    name: TaskName = TaskName.segmentation
    spatial_dims: int = 3
    in_channels: int = 1
    num_classes: int = 2
    class_names: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    transforms: TransformsConfig = field(default_factory=TransformsConfig)
    local_epochs: int = 1
    batch_size: int = 4
    roi_size: list[int] = field(default_factory=lambda: [32, 32, 32])
    spacing: list[float] | None = None
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    #: Patient-level differential privacy: DP-SGD at every site (see DPSGDConfig).
    dp_sgd: DPSGDConfig = field(default_factory=DPSGDConfig)
    #: Where each site trains and scores: ``auto`` (a CUDA GPU when torch sees one, else the
    #: CPU), ``cpu``, ``cuda`` or ``cuda:N``; resolved on the site's machine
    #: (:func:`fl_imaging.config.devices.resolve_device`).
    device: str = "auto"
    #: Mixed precision (float16 autocast, gradient scaling) in training, evaluation and
    #: prediction; CUDA only: ignored, with a warning, on a CPU.
    amp: bool = False
    #: A MONAI bundle folder (``configs/train.json``, ``configs/metadata.json``, optional
    #: ``models/model.pt``) whose network, training preprocessing, loss, optimizer and start
    #: weights the run uses (``task=bundle``, :mod:`tasks.bundle_task`); each site reads its
    #: own copy at this path and runs it only if its policy lists its SHA-256. None: no bundle.
    bundle: str | None = None
    #: SHA-256 of the bundle (:func:`tasks.bundle_files.bundle_digest`) that the coordinator
    #: names; None: filled in from the coordinator's copy when the run starts.
    bundle_sha256: str | None = None


@dataclass
class PartitionConfig:
    name: PartitionName = PartitionName.iid
    seed: int = 0
    alpha: float = 0.5
    by: PartitionBy = PartitionBy.label
    size_bins: int = 4
    sizes: list[float] = field(default_factory=list)
    min_cases: int = 2
    shift_strength: float = 1.0


@dataclass
class DataConfig:
    name: DataName = DataName.demo
    root: str | None = None
    sites: list[str] = field(default_factory=list)
    num_sites: int = 3
    #: Multi-modal cases: the folders of images/ (``images/MODALITY/CASE_ID.nii.gz``), one
    #: per modality, stacked as channels in this order; empty: one image file per case.
    modalities: list[str] = field(default_factory=list)
    cases_per_site: int = 16
    shape: list[int] = field(default_factory=lambda: [32, 32, 32])
    dicom_sites: list[int] = field(default_factory=lambda: [0])
    flag: str | None = None
    size: int = 28
    max_cases: int | None = None
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    sites_dir: str = "data-sites"
    val_fraction: float = 0.25
    test_fraction: float = 0.0
    public_fraction: float = 0.0
    cache: bool = True
    exclude_bad_cases: bool = False
    #: Cases the sites leave out, as ``SITE/CASE_ID``: filled with the cases that failed the
    #: checks when ``exclude_bad_cases`` is set (every site reads it); hand-made entries welcome.
    excluded_cases: list[str] = field(default_factory=list)
    #: Set by the simulation engine (leave it null): a folder of the run's own, removed with it,
    #: where the sites' decoded cases are kept so that each is decoded once per run, however
    #: many of the engine's processes serve its site.
    decoded_cache: str | None = None


@dataclass
class UpdateValidationConfig:
    """Checks on every site's update before aggregation (see ``strategies/validation.py``).

    Replies holding NaN/Inf or arrays unlike the global model's are always rejected. An update
    whose L2 norm exceeds ``norm_factor`` times the round's median update norm is an outlier;
    ``norm_outliers`` says whether it is only flagged in the log (``flag``) or left out
    (``reject``). The default only flags, so undefended strategies stay undefended.
    """

    norm_outliers: str = "flag"
    norm_factor: float = 5.0


@dataclass
class DPConfig:
    mode: DPMode = DPMode.none
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    initial_clipping_norm: float = 0.1
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float | None = None
    target_delta: float = 1e-5
    max_epsilon: float | None = None
    account: bool = True


@dataclass
class AttackConfig:
    name: AttackName = AttackName.none
    fraction: float = 0.25
    sites: list[int] = field(default_factory=list)
    scale: float = 10.0
    norm: float = 10.0
    #: dropout: the rounds in which the chosen sites fail their training (after secure
    #: aggregation's keys and shares, before their masked update).
    rounds: list[int] = field(default_factory=list)


@dataclass
class SecAggConfig:
    """Secure aggregation (SecAgg+, ``fl_imaging/secagg/coordinator.py``): the coordinator sees
    only the sum of each round's site updates. ``threshold``: the sites (a fraction of the
    round's, or a count) whose shares rebuild a secret; the packed update is clipped to
    ``clipping_range``, quantised to ``quantization_range`` levels, summed modulo ``modulus``
    (a power of two up to 2**32); ``weighting``: the sites weigh in the sum by their training
    cases (``cases``, at most ``max_weight``) or equally (``equal``: what client-level DP needs,
    and what keeps a site's number of cases from the coordinator); ``auto``: equally with
    ``strategy.dp``, else by cases."""

    enabled: bool = False
    threshold: float = 0.66
    clipping_range: float = 8.0
    quantization_range: int = 2**24
    modulus: int = 2**32
    max_weight: float = 1000.0
    weighting: str = "auto"


@dataclass
class HEConfig:
    """Homomorphic encryption of the updates (CKKS with TenSEAL, ``fl_imaging/he/``): each
    site encrypts its weighted weights with the consortium's key, the coordinator adds the
    ciphertexts with the public context only and sends the encrypted sum back; the sites
    decrypt it. ``layers``: encrypt only the arrays these names start (``model.0`` names
    ``model.0.conv.weight``; empty: every floating array), the rest travel in the clear."""

    enabled: bool = False
    layers: list[str] = field(default_factory=list)


@dataclass
class StrategyConfig:
    name: str = "fedavg"
    params: dict[str, Any] = field(default_factory=dict)
    #: The strategy's key hyperparameter, for a tuner: a dotted key under ``strategy.``
    #: (e.g. ``params.proximal_mu``: ``strategy.params.proximal_mu``), set in
    #: ``conf/strategy/NAME.yaml`` together with its default; None: the strategy has none.
    tune_key: str | None = None
    #: L2 bound on each site's update, applied on top of any strategy (None: no bound).
    norm_bound: float | None = None
    validation: UpdateValidationConfig = field(default_factory=UpdateValidationConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    #: FedBN (Li et al. 2021): each site keeps its own normalisation layers (weights and running
    #: statistics) and uses the global model's other weights.
    fedbn: bool = False
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    he: HEConfig = field(default_factory=HEConfig)
    #: Update compression on the way up: what a site sends is its update, encoded as this says;
    #: the coordinator decodes it before any strategy sees it. Lossy modes keep what was not
    #: sent at the site and add it to the next round's update (error feedback).
    compression: CompressionMode = CompressionMode.none
    #: ``compression=topk``: the fraction of each tensor's entries sent, in (0, 1].
    compression_topk: float = 0.1


class EngineName(enum.StrEnum):
    simulation = "simulation"  # Flower's simulation engine on this machine (Ray)
    deployment = "deployment"  # a running SuperLink with one SuperNode per hospital


@dataclass
class EngineConfig:
    name: EngineName = EngineName.simulation
    rounds: int = 3
    clients_per_round: int | None = None
    cpus_per_client: int = 1
    #: GPUs Ray reserves for each ClientApp in simulation (fractions share one GPU between
    #: that many site actors); deployment ignores it (each SuperNode's machine decides).
    gpus_per_client: float = 0.0
    num_cpus: int | None = None
    torch_threads: int | None = None
    #: Simulation on an existing Ray cluster: ``auto`` or ``HOST:PORT`` of its head (None: a
    #: private Ray on this machine, started and stopped with the run).
    ray_address: str | None = None
    round_timeout: float = 3600.0
    verbose: bool = False
    #: Each site evaluates the global model it receives inside the training message (one
    #: message per round; a last evaluation round scores the final model).
    evaluate_in_train: bool = False
    #: A round goes on once this many sites answered (None: every sampled site).
    min_sites: int | None = None
    #: Seconds to wait for enough sites to be connected before a round; then the run stops.
    wait_timeout: float = 600.0
    #: Deployment: the SuperLink's address (host:port) and the CA certificate that signed its
    #: TLS certificate (None: plain text, for trying on loopback only).
    superlink: str = "127.0.0.1:9093"
    root_certificates: str | None = None
    #: Deployment: the SuperLink's sites (number of SuperNodes expected), for the round table.
    num_sites: int | None = None
    #: After the last round, each site scores the final global model on its test cases
    #: (``test_<metric>`` rows) and, with ``finetune_epochs`` > 0, again after fine-tuning a
    #: copy of it on its own training cases for that many epochs (``finetuned_<metric>``).
    test: bool = False
    finetune_epochs: int = 0
    #: Cross-site evaluation after the test round (which it implies): the global model and each
    #: site's own model (the final model fine-tuned ``finetune_epochs`` at the site, or with 0 its
    #: last training reply) scored on every site's test cases (cross_site.csv, cross_site.png).
    cross_site: bool = False
    #: Each site's contribution: leave-one-out over the last round's updates, every aggregate
    #: scored on every site's validation cases (contributions.csv).
    contributions: bool = False


@dataclass
class BenchConfig:
    """A named benchmark (``fl-imaging-bench``): setups x strategies x seeds, and baselines.

    ``setups`` and ``strategies`` map a label to the overrides that make it (e.g.
    ``{dp_low: [strategy=dpfedavg, strategy.dp.noise_multiplier=0.3]}``); ``baselines`` are
    ``pooled`` and/or ``local``; ``metrics`` are the task's metrics to report, the first one
    the main one (best round, worst site, fairness gap).
    """

    name: str | None = None
    out_dir: str = "benchmarks"
    seeds: list[int] = field(default_factory=lambda: [0])
    setups: dict[str, list[str]] = field(default_factory=dict)
    strategies: dict[str, list[str]] = field(default_factory=dict)
    baselines: list[str] = field(default_factory=lambda: ["pooled", "local"])
    public_overrides: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    finetune_epochs: int = 1
    #: The method the summary's ratio column divides by (``vs <reference>``).
    reference: str = "pooled"
    #: A second method every other one is compared with over seeds (paired difference of the
    #: main metric and its 95 % interval), e.g. ``fedavg``; null, or a method the benchmark
    #: does not run: no such column.
    compare_with: str | None = "fedavg"
    #: The tuning protocol (``fl_imaging/benchmark/tuning.py``): strategy label -> {override
    #: key: grid}, e.g. ``{fedadam: {strategy.params.eta: [0.001, 0.01, 0.1]}}``, or the grid
    #: alone for the strategy's own ``strategy.tune_key`` (``{fedadam: [0.001, 0.01]}``). Each grid
    #: value runs once per ``tune_seeds`` seed scored on the validation split only (no test
    #: round); the value with the best final-round validation main metric (mean over sites,
    #: then over tuning seeds; ties: the first in the grid) is then used for every seed.
    tune: dict[str, Any] = field(default_factory=dict)
    #: Training seeds of the tuning runs.
    tune_seeds: list[int] = field(default_factory=lambda: [0])


class TrackingBackend(enum.StrEnum):
    """Where a run's config, metrics and files are tracked (``fl_imaging/review/tracking.py``)."""

    none = "none"  # the run folder only (report.html, metrics.csv, audit.jsonl)
    mlflow = "mlflow"  # an MLflow run (local store or server)
    tensorboard = "tensorboard"  # TensorBoard event files


@dataclass
class TrackingConfig:
    """Experiment tracking (``conf/tracking/``, ``fl_imaging/review/tracking.py``).

    ``uri``: for mlflow, null (a local store in ``mlruns/`` of the working folder), a folder
    (a local store there) or an MLflow tracking URI (``http://host:5000``, ``sqlite:///f.db``,
    ...); for tensorboard, the folder that gets one sub-folder of event files per run (null: the
    run folder's ``tensorboard/``). ``experiment``: the MLflow experiment; ``run_name``: the
    run's name (null: what the run is, ``fl_imaging/review/run_name.py``: strategy, data, model
    and the overrides); ``tags``: added to the run (``--multirun`` and ``fl-imaging-bench`` add
    theirs).
    """

    backend: TrackingBackend = TrackingBackend.none
    uri: str | None = None
    experiment: str = "fl-imaging"
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class SiteConfig:
    """What each simulated site holds of its own (``site.*``, ``fl_imaging/site/``): its state
    folder (its privacy ledger across runs, its own record of every request, its identity key),
    one per site under ``state_dir`` (named after the site and its data folder; None: the
    folder ``site-state`` beside the run folder), and the policy it enforces:
    ``policies[site name]``, else ``policy`` (a site policy YAML file; None: no policy). In a
    deployment each SuperNode holds its own (``fl-imaging-deploy supernode --state --policy``)
    and these keys are not used."""

    state_dir: str | None = None
    policy: str | None = None
    policies: dict[str, str] = field(default_factory=dict)
    #: The consortium's homomorphic encryption key file (``fl-imaging-deploy he-key``) every
    #: simulated site reads (None: one made on first use in the sites' state folder, beside
    #: their identities; never in the run folder).
    he_key: str | None = None


@dataclass
class RunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    seed: int = 0
    run_dir: str = "runs/latest"
    #: A previous run's folder to resume from (its checkpoint.json), or None.
    resume: str | None = None
