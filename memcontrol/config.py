"""Typed view of params.yaml. Unknown keys are errors; the file is read once, at the entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from memcontrol.errors import UserError


class _Strict(BaseModel):
    # NaN or inf in a setting would only surface as a NaN loss or an empty front much later
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DemoData(_Strict):
    """Embedded default: CT slices pretrain the base; PA radiographs (DRRs of the same real CT) with
    real report sentences are the fine-tuning domain (docs/data.md)."""

    n_base: int = Field(600, ge=1)      # CT slices: the base UNet's (and VAE's) pretraining
    n_codec: int = Field(600, ge=0)     # radiographs the VAE alone is pretrained on
    n_train: int = Field(400, ge=1)     # fine-tuning radiographs, the memorization subset among them
    n_val: int = Field(80, ge=1)        # scored by the search; calibrates the memorization threshold
    n_test: int = Field(80, ge=1)       # Stage 2 and every reported number; the false-positive floor
    n_mem: int = Field(12, ge=1)        # train radiographs repeated in the memorization-inducing set
    image_size: int = Field(128, ge=16)


class CsvData(_Strict):
    """A user dataset: an image root + a CSV (MIMIC-CXR style `path,text`)."""

    csv: Path
    image_root: Path
    path_column: str = "path"
    text_column: str = "text"
    split_column: str | None = None     # values train / val / test; None: seeded random split
    group_column: str | None = None     # patient id: no group spans two splits (strongly advised)
    mem_csv: Path | None = None
    n_mem: int = Field(16, ge=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)   # scored by the search and the selection rule
    test_fraction: float = Field(0.2, gt=0, lt=1)  # Stage 2, the audit and every reported number
    allow_outside_root: bool = False  # CSV paths may be absolute or leave image_root (../, symlinks)


class Data(_Strict):
    source: Literal["demo", "csv"] = "demo"
    demo: DemoData = DemoData()
    csv: CsvData | None = None
    # Memorization-inducing set (docs/paper.md §2.2): a ratio of train + the mem subset x n_repeats.
    data_size_ratio: float = Field(0.25, gt=0, le=1)
    n_repeats: int = Field(10, ge=1)
    # Licence of the training data for the model and dataset cards (a Hugging Face licence id, or
    # free text). None: the embedded default's (its most restrictive part, docs/data.md), or
    # "unknown" for a CSV dataset.
    license: str | None = None

    @model_validator(mode="after")
    def _csv_needs_section(self) -> "Data":
        if self.source == "csv" and self.csv is None:
            raise ValueError("data.source is `csv` but the `data.csv` section is missing")
        return self


class TinyModel(_Strict):
    """Stable-Diffusion-architecture model small enough to pretrain on 2 CPU cores."""

    resolution: int = Field(64, ge=16)
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = Field(1, ge=1)
    attention_head_dim: int = 8
    norm_num_groups: int = 16
    max_prompt_tokens: int = Field(77, ge=8)


class BaseTrain(_Strict):
    """Pretraining of the tiny base model on the `base` split (never the fine-tuning set)."""

    vae_steps: int = Field(600, ge=1)
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = Field(1500, ge=1)
    unet_lr: float = 5e-4
    batch_size: int = Field(16, ge=1)


class Model(_Strict):
    # Real path: a local Stable-Diffusion-style diffusers folder. None builds the tiny default.
    path: Path | None = None
    tiny: TinyModel = TinyModel()
    base_train: BaseTrain = BaseTrain()


class Tuning(_Strict):
    # one PEFT method, or a list: the search then chooses the method with the mask (docs/search.md)
    method: str | tuple[str, ...] = "lora"
    mode: Literal["full", "reference"] = "full"
    granularity: Literal["transformer", "resnet", "sublayer"] = "transformer"
    options: dict[str, float | int | str | bool] = {}

    @field_validator("method")
    @classmethod
    def _methods(cls, value):
        if isinstance(value, tuple):
            if not value or len(set(value)) != len(value) or not all(value):
                raise ValueError(f"tuning.method: a list needs distinct method names, got {list(value)}")
            return value[0] if len(value) == 1 else value
        return value

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods the search chooses from (one unless tuning.method is a list)."""
        return self.method if isinstance(self.method, tuple) else (self.method,)


class Train(_Strict):
    """Inner loop (docs/paper.md §2.2): AdamW, constant LR, eps-MSE, grad clip."""

    steps: int = Field(150, ge=1)
    batch_size: int = Field(8, ge=1)
    cfg_dropout: float = Field(0.1, ge=0, lt=1)
    grad_clip: float = 1.0
    weight_decay: float = 1e-2
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    device: str = "auto"

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _unquoted_no(cls, value):
        # an unquoted `no` is the boolean false in YAML 1.1 (PyYAML); DVC (YAML 1.2) writes it
        # unquoted when `dvc exp run -S` rewrites params.yaml
        return "no" if value is False else value


class Sample(_Strict):
    steps: int = Field(20, ge=1)
    guidance: float = Field(4.0, ge=1)
    mem_seeds: int = Field(4, ge=1)
    n_quality: int = Field(64, ge=2)
    batch_size: int = Field(64, ge=1)
    seed: int = 1234


class Threshold(_Strict):
    mode: Literal["calibrated", "fixed"] = "calibrated"
    quantile: float = Field(0.95, gt=0, lt=1)
    value: float | None = None

    @model_validator(mode="after")
    def _fixed_needs_value(self) -> "Threshold":
        if self.mode == "fixed" and self.value is None:
            raise ValueError("metrics.threshold.mode is `fixed` but metrics.threshold.value is not set")
        return self


class Metrics(_Strict):
    """Two embedders: `embedder` finds copies (the FAISS index, the memorization threshold and
    objective, the release screen), `quality_embedder` gives the features of FID/KID. A copy
    detector should see pixels; a quality score needs a perceptual network (docs/metrics.md)."""

    embedder: Literal["mobilenet_v2", "pixel", "torchscript", "xrv_densenet"] = "mobilenet_v2"
    embedder_path: Path | None = None
    embedder_options: dict[str, float | int | str] = {}  # e.g. {blur_sigma: 1.5} for mobilenet_v2, {grid: 16} for pixel
    quality_embedder: Literal["mobilenet_v2", "torchscript", "xrv_densenet"] = "mobilenet_v2"
    quality_embedder_path: Path | None = None
    quality_embedder_options: dict[str, float | int | str] = {}
    embed_size: int = Field(224, ge=16)
    # decoded: real images pass through the frozen VAE (encode -> decode) before embedding, so a
    # generation that reproduces a training latent scores ~1 and the VAE's blur is not mistaken
    # for novelty; pixel: embed the real images as they are.
    reference_space: Literal["decoded", "pixel"] = "decoded"
    index: Literal["flat", "ivf", "hnsw"] = "flat"
    center: bool = True
    threshold: Threshold = Threshold()
    kid_subset_size: int = Field(50, ge=2)


OBJECTIVES = {
    # name -> (metrics key, direction); every value a trial records is in its metrics.json
    "mem_rate": ("mem.flagged_rate", "minimize"),
    "mem_mean_sim": ("mem.mean_sim", "minimize"),
    "mem_p95_sim": ("mem.p95_sim", "minimize"),
    "noise_norm_max": ("noise_norm.max", "minimize"),
    "noise_norm_mean": ("noise_norm.mean", "minimize"),
    "kid": ("quality.kid_mean", "minimize"),
    "fid": ("quality.fid", "minimize"),
    # the metric divided by the anchor's (the method with no mask at the trial's LR and method): how
    # much of what the unmasked method learns in the same steps a mask keeps (docs/search.md "The
    # quality objective"); the key is the metric it is computed from
    "kid_vs_unmasked": ("quality.kid_mean", "minimize"),
    "fid_vs_unmasked": ("quality.fid", "minimize"),
}
RELATIVE = tuple(o for o in OBJECTIVES if o.endswith("_vs_unmasked"))  # told as a ratio to the trial's anchor


class EarlyStopping(_Strict):
    """Multi-fidelity stopping (memcontrol/fidelity.py): a trial is scored after each rung (a share of
    train.steps) and stopped there when its point is dominated by the front of earlier trials'
    points at the same rung (successive halving on the Pareto rank)."""

    enabled: bool = False
    rungs: tuple[float, ...] = (0.25, 0.5)
    min_trials: int = Field(4, ge=1)    # earlier points at a rung before any trial is stopped there

    @field_validator("rungs")
    @classmethod
    def _shares(cls, value):
        if not value or any(not 0 < r < 1 for r in value) or len(set(value)) != len(value):
            raise ValueError(f"search.early_stopping.rungs: distinct shares of train.steps in (0, 1), got {list(value)}")
        return tuple(sorted(value))


class Search(_Strict):
    n_trials: int = Field(12, ge=1)
    batch_size: int = Field(4, ge=1)
    sampler: Literal["nsga2", "tpe", "random", "gp"] = "nsga2"
    population_size: int = Field(8, ge=2)
    seed: int = 0
    learning_rates: tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # the LR grid searched with the mask bits
    max_failures: int = Field(3, ge=1)  # failed trials in a row that stop the search (with the first's cause)
    objectives: tuple[str, str] = ("mem_mean_sim", "kid_vs_unmasked")
    study_name: str = "memcontrol"
    # Scale-out (docs/scale_out.md): trials at once, the shared study, how a dead worker is found
    workers: int = Field(1, ge=1)            # N > 1: N trials at once on Dask, one per worker (1: in-process)
    dask_address: str | None = None          # an existing Dask scheduler; None: a LocalCluster of `workers` processes
    storage: str | None = None               # SQLAlchemy URL of the study; None: SQLite search/study.db in the workdir
    heartbeat_interval: int = Field(10, ge=1)  # s between a running trial's heartbeats in the study
    grace_period: int = Field(60, ge=1)      # s without a heartbeat before the trial is failed and retried once

    @field_validator("storage")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        if value is None:
            return None
        try:
            make_url(value)
        except ArgumentError:
            raise ValueError("not an SQLAlchemy URL; expected e.g. sqlite:///search/study.db or "
                             "postgresql+psycopg://user@host:5432/memcontrol") from None
        return value
    early_stopping: EarlyStopping = EarlyStopping()

    @model_validator(mode="after")
    def _check(self) -> "Search":
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(f"search.grace_period ({self.grace_period}) must exceed search.heartbeat_interval "
                             f"({self.heartbeat_interval}): a live trial would be taken for a dead one")
        if self.workers > self.batch_size:
            raise ValueError(f"search.workers ({self.workers}) exceeds search.batch_size ({self.batch_size}): a batch "
                             "runs at once, so workers beyond it would idle; set batch_size to a multiple of workers")
        if self.dask_address is not None and self.workers == 1:
            raise ValueError("search.dask_address is set but search.workers is 1: set workers to the number of "
                             "Dask workers (GPUs) the cluster has")
        if self.early_stopping.enabled and self.workers > 1:  # the rung check runs in the search process only
            raise ValueError("search.early_stopping.enabled with search.workers > 1 is not supported yet: "
                             "set workers: 1 or turn early stopping off")
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown:
            raise ValueError(f"search.objectives: unknown {unknown}; known: {sorted(OBJECTIVES)}")
        relative = [o for o in self.objectives if o in RELATIVE]
        if relative and self.early_stopping.enabled:  # rung points would need the anchor's rung points
            raise ValueError(f"search.early_stopping.enabled with the relative objective {relative[0]} is not "
                             f"supported: use {relative[0].removesuffix('_vs_unmasked')} or turn early stopping off")
        if not self.learning_rates or any(not lr > 0 for lr in self.learning_rates):
            raise ValueError(f"search.learning_rates must be positive numbers, got {list(self.learning_rates)}")
        if len(set(self.learning_rates)) != len(self.learning_rates):
            raise ValueError(f"search.learning_rates lists a value twice: {list(self.learning_rates)}")
        return self


class Select(_Strict):
    """Pick one Pareto mask (docs/search.md). least_memorization_within_quality: least memorization
    among front points whose quality objective is at most (1 + quality_tolerance) x that of the
    `quality_reference`: unmasked, the method with no mask at the point's own learning rate, a
    trial the search runs first at each LR of the grid. knee and best_quality need no reference."""

    rule: Literal["least_memorization_within_quality", "knee", "best_quality"] = (
        "least_memorization_within_quality"
    )
    quality_reference: Literal["unmasked"] = "unmasked"
    quality_tolerance: float = Field(0.2, ge=0)


class Final(_Strict):
    """Stage 2: fine-tune with the selected mask (and full fine-tuning beside it) on a
    memorization-inducing set: `data_size_ratio` of train + the memorization subset x `n_repeats`."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    data_size_ratio: float = Field(0.25, gt=0, le=1)
    n_repeats: int = Field(10, ge=1)
    full_lr: float = Field(2e-4, gt=0)
    seeds: tuple[int, ...] = (0,)


ARM_BASES = ("full", "selected", "unmasked")  # plus any PEFT method name (memcontrol.tuning.METHODS)
ARM_MITIGATIONS = ("rwa", "gn", "wen", "dedup")


def _check_arms(arms: tuple[str, ...], where: str) -> None:
    if not arms:
        raise ValueError(f"{where}: at least one arm is needed")
    if len(set(arms)) != len(arms):
        raise ValueError(f"{where}: an arm is listed twice")
    for a in arms:
        base, *mits = a.split("+")
        bad = [m for m in mits if m not in ARM_MITIGATIONS] + ([base] if not base or base in ARM_MITIGATIONS else [])
        if bad or len(set(mits)) != len(mits):
            raise ValueError(f"{where}: arm {a!r} is not `base[+mitigation...]` with mitigations from {ARM_MITIGATIONS}")


class Mitigations(_Strict):
    """Settings of the stackable training-time mitigations (memcontrol/mitigations.py)."""

    rwa_k: int = Field(4, ge=1)                         # random words added per caption use (reference: 4)
    gn_sigma: float = Field(0.1, gt=0)                  # std of the noise on the text states
    wen_threshold: float | Literal["auto"] = "auto"     # fixed tau, or the batch quantile below
    wen_quantile: float = Field(0.9, gt=0, lt=1)


class Extraction(_Strict):
    """Carlini-style extraction attack run on every audited model (memcontrol/extraction.py)."""

    per_prompt: int = Field(4, ge=2)                    # generations per memorization prompt (first sample.mem_seeds = the evaluated ones)
    min_component: int = Field(3, ge=2)
    tiles: int = Field(4, ge=1)
    threshold: float | Literal["calibrated"] = "calibrated"  # RMS tile distance, or calibrated on train pairs
    quantile: float = Field(0.01, gt=0, lt=1)           # share of distinct training pairs linked when calibrated


class Audit(_Strict):
    """The selected mask against every baseline and mitigation, same data/steps/seeds/metrics."""

    arms: tuple[str, ...] = (
        "full", "selected", "attention", "bias", "norm", "lora", "svdiff", "difffit",
        "full+rwa", "full+gn", "full+wen", "full+dedup",
        "selected+rwa", "selected+wen",  # the paper's "combine with existing approaches" (RWA, Wen et al.)
    )
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int | None = Field(None, ge=1)               # None: final.steps
    # each unmasked baseline at its best-quality LR at the Stage-2 budget (benchmarks/method_lr.py)
    method_lr: dict[str, float] = {"attention": 3e-3, "bias": 1e-2, "norm": 1e-1, "lora": 3e-3,
                                   "svdiff": 1e-2, "difffit": 1e-2}
    mitigations: Mitigations = Mitigations()
    extraction: Extraction = Extraction()
    grid_top: int = Field(8, ge=1)                      # most-similar generations shown per arm

    @model_validator(mode="after")
    def _check(self) -> "Audit":
        _check_arms(self.arms, "audit.arms")
        if not self.seeds:
            raise ValueError("audit.seeds: at least one seed is needed")
        return self


class Transfer(_Strict):
    """The saved mask on a second dataset of another modality (CT/MR slices, memcontrol/data/transfer.py)."""

    mask: Path | None = None                            # None: masks/selected.json of the workdir
    n_train: int = Field(200, ge=4)
    n_val: int = Field(64, ge=4)                        # calibrates the transfer set's threshold
    n_test: int = Field(64, ge=4)
    image_size: int = Field(128, ge=16)
    arms: tuple[str, ...] = ("selected", "unmasked", "full")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int | None = Field(None, ge=1)               # None: final.steps

    @model_validator(mode="after")
    def _check(self) -> "Transfer":
        _check_arms(self.arms, "transfer.arms")
        if not self.seeds:
            raise ValueError("transfer.seeds: at least one seed is needed")
        return self


class Release(_Strict):
    """A synthetic dataset from the final model, screened against the training set."""

    seed: int = 0                                       # which models/final/seed<k> adapter
    n_prompts: int = Field(64, ge=1)                    # training prompts drawn (memorization prompts first)
    per_prompt: int = Field(2, ge=1)
    pixel_guard: bool = True                            # also exclude pixel-level near copies (tile distance)


class Tracking(_Strict):
    mlflow_uri: str = "sqlite:///mlflow.db"
    experiment: str = "memcontrol"


class Params(_Strict):
    seed: int = 0
    workdir: Path = Path(".")
    data: Data = Data()
    model: Model = Model()
    tuning: Tuning = Tuning()
    train: Train = Train()
    sample: Sample = Sample()
    metrics: Metrics = Metrics()
    search: Search = Search()
    select: Select = Select()
    final: Final = Final()
    audit: Audit = Audit()
    transfer: Transfer = Transfer()
    release: Release = Release()
    tracking: Tracking = Tracking()


class ConfigError(UserError, ValueError):
    """params.yaml is missing, unparsable or invalid; the message names the file and the key."""


def load_params(path: Path | str = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # one line: what and where, not PyYAML's quoted excerpt
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML: {getattr(e, 'problem', None) or e}{where}") from e
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        problems = []  # one line, each bad key with what is wrong and the value given
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            value = err.get("input")
            given = f" (got {value!r})" if isinstance(value, (str, int, float)) and err["type"] != "extra_forbidden" else ""
            problems.append(f"{key}: {err['msg']}{given}")
        raise ConfigError(f"{path}: invalid parameters: " + "; ".join(problems)) from None
