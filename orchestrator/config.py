"""Typed run configuration: one place that knows every default.

Loaded from YAML, then `--set section.key=value` overrides (values parsed as YAML, so
`optim.lr=1e-4`, `tuning.adapter_blocks=[2,3]`, `model.checkpoint=null` work). Unknown keys are
errors that name the key and suggest the closest known one.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from infosam.engine import LossConfig
from infosam.metrics import METRICS
from infosam.sam import BUILTIN_CHECKPOINTS, SAM_VARIANTS
from infosam.sam2 import SAM2_CONFIGS, SAM2_EMBEDDING_DIMS, SAM2_IMAGE_SIZES
from infosam.speed import ATTENTION_KINDS
from infosam.tuning import TUNING_METHODS, TuningConfig
from orchestrator.storage import has_password, password_refusal

__all__ = [
    "BUILTIN_SAM2_TEACHER",
    "BUILTIN_TEACHER",
    "Config",
    "ConfigError",
    "DataSection",
    "ModelSection",
    "OptimSection",
    "ScalingSection",
    "SpeedSection",
    "StorageSection",
    "TrackingSection",
    "apply_overrides",
    "flatten",
    "load_config",
]

BUILTIN_TEACHER = "builtin:tiny_teacher"
# The default teacher under model.family=sam2: `builtin:tiny_teacher` names the embedded teacher
# of the chosen family, so `--set model.family=sam2` alone runs offline
BUILTIN_SAM2_TEACHER = "builtin:tiny_sam2_teacher"
SYNTHETIC_DOMAINS = ("general", "camouflage", "roads", "lesions")


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


@dataclass
class DataSection:
    root: str = "data/synthetic"  # folder holding dataset folders (each with manifest.json)
    dataset: str = "camouflage"  # a folder under root
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    synthesize: bool = True  # make the embedded synthetic domain on first use if it is missing
    synth_scale: float = 1.0
    synth_seed: int = 0
    # per-split image counts that override synth_scale, e.g. {test: 200} (a larger test split
    # narrows the benchmark's confidence intervals; evaluation is cheap next to training)
    synth_counts: dict[str, int] = field(default_factory=dict)
    channel_order: str = "rgb"  # "bgr" reproduces the reference's OpenCV quirk
    prompt: str = "mixed"  # training prompts: mixed (per batch 50/50) | box | point
    box_jitter: float = 1.25  # max box corner shift, in model-input pixels (paper: 5 at 1024)
    num_positive_points: int = 1
    num_negative_points: int = 0
    eval_prompt: str = "box"
    eval_box_jitter: float = 0.0
    shuffle_buffer: int = 64  # local shuffle buffer (rows) per worker; 0 disables shuffling
    materialize_max_mb: float = 512  # decode a split once and keep it in memory when this small
    augment: str = "none"  # none | hflip (random horizontal flip of training image+mask)
    # Where images are decoded: cpu (Ray Data decodes, resizes and pads; workers receive pixels)
    # | gpu (Ray Data ships the stored bytes and each training worker decodes JPEGs with nvJPEG,
    # resizes and pads on its device: fewer CPUs per GPU; on a CPU worker it decodes there)
    decode_on: str = "cpu"
    # Datasets under `root` whose val split is scored every epoch beside the run's own
    # (`val/retention/<dataset>/<metric>`): whether the model keeps the pre-trained skill while
    # it learns; what a sweep ranks a gain-vs-retention objective on. E.g. [general].
    retention: list[str] = field(default_factory=list)


@dataclass
class ModelSection:
    # sam: segment-anything's SAM (variants tiny, vit_b, vit_l, vit_h); sam2: SAM 2.1 with a
    # Hiera image encoder in image mode (tiny, hiera_t, hiera_s, hiera_b+, hiera_l)
    family: str = "sam"
    variant: str = "tiny"
    # Teacher weights, also the student's starting point. `builtin:tiny_teacher` is the tiny
    # model this project pre-trained on the synthetic general domain (under family sam2 it
    # becomes `builtin:tiny_sam2_teacher`, the tiny SAM 2.1); null means random init. SAM 2.1:
    # Meta's sam2.1_hiera_*.pt (or an `infosam export` of a SAM 2.1 student).
    checkpoint: str | None = BUILTIN_TEACHER

    @property
    def image_size(self) -> int:
        """The model's input resolution S (images become S x S)."""
        if self.family == "sam2":
            return SAM2_IMAGE_SIZES[self.variant]
        return SAM_VARIANTS[self.variant].image_size

    @property
    def square_inputs(self) -> bool:
        """SAM 2.1 resizes images to S x S; SAM resizes the longest side and pads."""
        return self.family == "sam2"

    @property
    def embedding_dim(self) -> int:
        """Channels of the image embedding and the output token (the relation module's width)."""
        if self.family == "sam2":
            return SAM2_EMBEDDING_DIMS[self.variant]
        return SAM_VARIANTS[self.variant].prompt_embed_dim


@dataclass
class OptimSection:
    optimizer: str = "adam"  # adam | adamw
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine (per step, to lr * min_lr_ratio) | constant
    min_lr_ratio: float = 0.1
    epochs: int = 10
    batch_size: int = 4  # global batch; split evenly over workers
    precision: str = "fp32"  # fp32 | bf16 (autocast; Grams/entropies stay fp32)
    grad_clip: float | None = None
    eval_protocol: str = "clean"  # clean | paper
    metrics: list[str] = field(default_factory=lambda: ["iou", "dice"])
    eval_batch_size: int = 8
    zero_shot_eval: bool = True  # also evaluate the frozen teacher (val at start, test at end)


@dataclass
class ScalingSection:
    # 0 = Train local mode (in-process); [min, max] = elastic: start with what the cluster
    # holds (at least min), shrink when a node is lost, grow back when capacity returns.
    num_workers: int | list[int] = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # < 1 on small machines so Ray Data keeps CPUs
    gpus_per_worker: float = 1.0
    max_failures: int = 1  # worker/node failures recovered from (-1: always)
    max_preemption_failures: int = -1  # announced node reclaims recovered from (-1: always)
    # Every this many training steps the workers ask Ray Train whether a node of theirs is being
    # reclaimed (a barrier); on a notice they checkpoint mid-epoch. 0 disables the check.
    preemption_check_steps: int = 10
    elastic_resize_interval_s: float = 60.0  # how often an elastic run looks for more capacity
    # Extra Ray resources per Train worker (or per local-mode run): e.g. {accelerator_type:A10G:
    # 0.001} to pin a GPU kind, or a custom slot resource that nodes advertise.
    worker_resources: dict[str, float] = field(default_factory=dict)
    data_cpus: float = 0.5  # CPUs per Ray Data decode task
    # Build InfoSAM's Grams over the global batch (all workers). Default on: the method's
    # mutual information is a batch statistic, and per-worker batches can be as small as 1.
    all_gather_relations: bool = True

    @property
    def max_workers(self) -> int:
        """Workers reserved (fixed size) or the most an elastic run grows to."""
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)


@dataclass
class SpeedSection:
    """Throughput/memory switches; each is numerically equivalent to the plain step (tests)."""

    # eager (segment-anything as is) | sdpa (bias as attn_mask) | folded (bias folded into q/k,
    # no mask: flash/cuDNN kernels) | flex (FlexAttention score_mod, global blocks)
    attention: str = "eager"
    checkpointing: bool = False  # recompute student encoder blocks in backward (memory)
    compile: bool = False  # torch.compile each image-encoder block (teacher and student)
    # Stream the frozen teacher's image embeddings from a cache computed once per dataset by a
    # Ray Data batch-inference pass (`infosam data teacher-cache`), instead of re-running the
    # teacher encoder every step. Refused with image augmentation or a different teacher.
    teacher_cache: bool = False
    teacher_bf16: bool = False  # keep the frozen teacher's weights in bf16 (needs bf16 precision)


@dataclass
class TrackingSection:
    uri: str | None = None  # default sqlite:///<storage.path>/mlflow.db
    experiment: str = "infosam"
    run_name: str | None = None
    overlays: int = 4  # validation images in the overlay PNG (0 disables)
    parent_run_id: str | None = None
    # an MLflow model of the trained student: null = for a run of its own and a benchmark's or
    # sweep's best; true = for every cell and trial too; false = never
    log_model: bool | None = None


@dataclass
class StorageSection:
    path: str = "runs"  # Ray Train storage (checkpoints); shared storage (S3/NFS) on clusters
    name: str | None = None  # Train run name; re-using one resumes that run


@dataclass
class Config:
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    speed: SpeedSection = field(default_factory=SpeedSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    storage: StorageSection = field(default_factory=StorageSection)
    seed: int = 42

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return _build(cls, data, "")

    def with_values(self, values: dict[str, Any]) -> Config:
        """A validated copy with `section.key` values set (typed, no string round trip).

        How benchmark cells and Tune trials derive their configs from the user's; this config
        stays as it is.
        """
        data = self.to_dict()
        for key, value in values.items():
            node = data
            *parents, last = key.split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"{key!r}: {part!r} is not a config section")
                node = node[part]
            node[last] = copy.deepcopy(value)
        return Config.from_dict(data).validate()

    def _check_family(self) -> None:
        if self.model.family == "sam2" and self.model.checkpoint == BUILTIN_TEACHER:
            self.model.checkpoint = BUILTIN_SAM2_TEACHER  # the embedded teacher of the family
        problems = _family_problems(self)
        if problems:
            raise ConfigError("; ".join(problems))

    def validate(self) -> Config:
        check_ranges(self)
        self._check_family()
        if self.tracking.uri and has_password(self.tracking.uri):
            raise ConfigError(password_refusal("tracking.uri"))
        if self.speed.teacher_cache and self.data.augment != "none":
            raise ConfigError(
                f"speed.teacher_cache=true with data.augment={self.data.augment!r}: cached teacher "
                "embeddings are of the un-augmented images; set data.augment=none or "
                "speed.teacher_cache=false"
            )
        if self.speed.teacher_bf16 and self.optim.precision != "bf16":
            raise ConfigError(
                "speed.teacher_bf16=true needs optim.precision=bf16 (bf16 weights under fp32 "
                "inputs would not run); set both or neither"
            )
        sc = self.scaling
        if sc.elastic and (
            len(sc.num_workers) != 2 or not 1 <= sc.num_workers[0] <= sc.num_workers[1]
        ):
            raise ConfigError(
                f"scaling.num_workers={sc.num_workers}: an elastic range is [min, max] with "
                "1 <= min <= max (a number for a fixed size, 0 for Train local mode)"
            )
        sizes = range(sc.min_workers, sc.max_workers + 1) if sc.elastic else [sc.num_workers]
        uneven = [w for w in sizes if self.optim.batch_size % max(w, 1)]
        if uneven:
            raise ConfigError(
                f"optim.batch_size={self.optim.batch_size} is the global batch and must divide "
                f"evenly over scaling.num_workers={sc.num_workers} (not over {uneven}): every "
                "worker takes an equal share; pick a batch size that all world sizes divide"
            )
        workers = max(sc.max_workers, 1)
        if self.loss.infosam and self.optim.batch_size < 2:
            raise ConfigError(
                "loss.infosam needs optim.batch_size >= 2: with one sample every Gram matrix is "
                "[[1]] and InfoSAM contributes exactly 0"
            )
        if (
            self.loss.infosam
            and not self.scaling.all_gather_relations
            and self.optim.batch_size // workers < 2
        ):
            raise ConfigError(
                "per-worker batch < 2 with scaling.all_gather_relations=false: InfoSAM would be "
                "0 on every worker; gather relations or raise optim.batch_size"
            )
        return self


def _family_problems(cfg: Config) -> list[str]:
    """What a SAM 2.1 run cannot take (or a variant of the other family)."""
    m = cfg.model
    variants = SAM2_CONFIGS if m.family == "sam2" else SAM_VARIANTS
    if m.variant not in variants:
        return [
            f"model.variant={m.variant!r} is not a {m.family} variant: choose {sorted(variants)}"
        ]
    problems = []
    if m.checkpoint in BUILTIN_CHECKPOINTS:
        family, variant, _ = BUILTIN_CHECKPOINTS[m.checkpoint]
        if (family, variant) != (m.family, m.variant):
            problems.append(
                f"model.checkpoint={m.checkpoint} is the embedded {family} {variant!r} teacher, "
                f"not a model.family={m.family} model.variant={m.variant!r} one: set "
                f"model.variant={variant}, or model.checkpoint to your weights"
                + (" (Meta's sam2.1_hiera_*.pt)" if m.family == "sam2" else "")
                + " or null (random init)"
            )
    if m.family != "sam2":
        return problems
    if cfg.speed.attention != "eager":
        problems.append(
            f"speed.attention={cfg.speed.attention!r} routes SAM's ViT attention; SAM 2.1's "
            "Hiera attention is scaled_dot_product_attention already: leave it eager"
        )
    if cfg.data.decode_on == "gpu":
        problems.append(
            "data.decode_on=gpu letterboxes images as SAM takes them; SAM 2.1 resizes to a "
            "square: use data.decode_on=cpu"
        )
    return problems


def _num(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False):
    """A range check and its text: lo <= v (lo < v when `lo_open`) and v <= hi."""

    def ok(v: Any) -> bool:
        if v is None:
            return True  # optional values (grad_clip) are checked only when set
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return hi is None or v <= hi

    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"<= {hi:g}")
    return ok, " and ".join(parts)


def _every(check):
    """A check applied to each value of a list or dict."""
    ok, text = check

    def each(v: Any) -> bool:
        values = v.values() if isinstance(v, dict) else (v or [])
        return all(ok(x) for x in values)

    return each, f"each {text}"


def _one_of(allowed) -> tuple[Any, str]:
    allowed = tuple(allowed)
    return (lambda v: v in allowed), f"one of {list(allowed)}"


def _all_of(allowed) -> tuple[Any, str]:
    allowed = tuple(allowed)
    return (
        lambda v: bool(v) and all(x in allowed for x in v)
    ), f"a non-empty list of {list(allowed)}"


def _workers(v: Any) -> bool:
    if isinstance(v, list):
        return len(v) == 2 and all(isinstance(x, int) for x in v) and 1 <= v[0] <= v[1]
    return v >= 0


# Every numeric and named value, the range it may take: checked before Ray starts, so a value
# that cannot work fails at once with its key (a table test walks every field).
RANGES: dict[str, tuple[Any, str]] = {
    "seed": _num(0),
    "data.prompt": _one_of(("mixed", "box", "point")),
    "data.eval_prompt": _one_of(("box", "point")),
    "data.channel_order": _one_of(("rgb", "bgr")),
    "data.augment": _one_of(("none", "hflip")),
    "data.decode_on": _one_of(("cpu", "gpu")),
    "data.synth_scale": _num(0, lo_open=True),
    "data.synth_seed": _num(0),
    "data.synth_counts": _every(_num(1)),
    "data.retention": (
        lambda v: (
            isinstance(v, list)
            and all(isinstance(x, str) and x and "/" not in x and x not in (".", "..") for x in v)
        ),
        "a list of dataset folder names under data.root, e.g. [general]",
    ),
    "data.box_jitter": _num(0),
    "data.num_positive_points": _num(0),
    "data.num_negative_points": _num(0),
    "data.eval_box_jitter": _num(0),
    "data.shuffle_buffer": _num(0),
    "data.materialize_max_mb": _num(0),
    "model.family": _one_of(("sam", "sam2")),
    "model.variant": _one_of((*SAM_VARIANTS, *(v for v in SAM2_CONFIGS if v not in SAM_VARIANTS))),
    "tuning.method": _one_of(TUNING_METHODS),
    "tuning.lora_rank": _num(1),
    "tuning.lora_alpha": _num(0, lo_open=True),
    "tuning.lora_dropout": _num(0, 1),
    "tuning.adapter_ratio": _num(0, lo_open=True),
    "tuning.adapter_blocks": _every(_num(0)),
    "loss.weight_compression": _num(0),
    "loss.weight_distillation": _num(0),
    "loss.infosam_scale": _num(0),
    "loss.distillation_weight": _num(0),
    "loss.kd_temperature": _num(0, lo_open=True),
    "optim.optimizer": _one_of(("adam", "adamw")),
    "optim.lr": _num(0, lo_open=True),
    "optim.weight_decay": _num(0),
    "optim.schedule": _one_of(("cosine", "constant")),
    "optim.min_lr_ratio": _num(0, 1),
    "optim.epochs": _num(1),
    "optim.batch_size": _num(1),
    "optim.precision": _one_of(("fp32", "bf16")),
    "optim.grad_clip": _num(0, lo_open=True),
    "optim.eval_protocol": _one_of(("clean", "paper")),
    "optim.metrics": _all_of(METRICS),
    "optim.eval_batch_size": _num(1),
    "scaling.num_workers": (_workers, ">= 0, or an elastic range [min, max] with 1 <= min <= max"),
    "scaling.cpus_per_worker": _num(0),
    "scaling.gpus_per_worker": _num(0),
    "scaling.max_failures": _num(-1),
    "scaling.max_preemption_failures": _num(-1),
    "scaling.preemption_check_steps": _num(0),
    "scaling.elastic_resize_interval_s": _num(0, lo_open=True),
    "scaling.worker_resources": _every(_num(0)),
    "scaling.data_cpus": _num(0, lo_open=True),
    "speed.attention": _one_of(ATTENTION_KINDS),
    "tracking.overlays": _num(0),
}
# Keys whose value may differ when a run or benchmark resumes: where it runs and is tracked,
# and switches that are numerically equivalent (SpeedSection). Every other key is the result's.
RESUME_NEUTRAL = (
    "tracking.",
    "storage.",
    "scaling.",
    "speed.",
    "data.root",
    "data.synthesize",
    "data.materialize_max_mb",
    "data.decode_on",  # where pixels are decoded: within 1 grey level either way
)


def check_ranges(cfg: Config) -> None:
    """Every value in `RANGES` within its range; a ConfigError names the key, the value and
    what is allowed."""
    flat = flatten(cfg.to_dict())
    for key, (ok, allowed) in RANGES.items():
        value = flat[key] if key in flat else _section_value(cfg, key)
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            raise ConfigError(f"{key}={value!r} is out of range: it must be {allowed}")


def _section_value(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


# What a zero-shot (teacher-only) result depends on: the data, the model and how it is scored.
ZERO_SHOT_KEYS = ("data.", "model.", "seed", "optim.eval_protocol", "optim.metrics")


def result_view(cfg: Config, *, zero_shot: bool = False) -> dict[str, Any]:
    """The config values that make a run's result what it is (`RESUME_NEUTRAL` left out; for a
    zero-shot evaluation only `ZERO_SHOT_KEYS`): what a checkpoint or a benchmark cell records,
    and a resume compares."""
    return {
        k: v
        for k, v in flatten(cfg.to_dict()).items()
        if not k.startswith(RESUME_NEUTRAL) and (not zero_shot or k.startswith(ZERO_SHOT_KEYS))
    }


def config_changes(recorded: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """`key: old -> new` for each value of `now` (a `result_view`) that differs from
    `recorded` (none when nothing was recorded: a run from before records existed)."""
    if recorded is None:
        return []
    keys = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
    return [f"{k}: {recorded.get(k)!r} -> {now.get(k)!r}" for k in keys]


def resume_refusal(what: str, changes: list[str]) -> ConfigError:
    """The error for resuming `what` with `changes`, and how to do it on purpose."""
    shown = ", ".join(changes[:8]) + (f" (and {len(changes) - 8} more)" if len(changes) > 8 else "")
    return ConfigError(
        f"{what} was started with another configuration ({shown}); resuming it would mix the "
        "two. Use a new name (storage.name / benchmark.name), or pass --allow-config-change to "
        "resume with the new values on purpose"
    )


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        kt, vt = typing.get_args(tp) or (Any, Any)
        return isinstance(value, dict) and all(
            _type_ok(k, kt) and _type_ok(v, vt) for k, v in value.items()
        )
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where} must be a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {name!r}{hint}; known: {sorted(known)}")
        tp = hints[key]
        if isinstance(value, str) and _type_ok(1.0, tp) and not _type_ok(value, tp):
            with contextlib.suppress(ValueError):  # PyYAML reads 1e-3 (no dot) as a string
                value = float(value)
        if is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{name}.")
            continue
        if not _type_ok(value, tp):
            raise ConfigError(f"{name}={value!r} has the wrong type (expected {tp})")
        if tp is float or (
            typing.get_origin(tp) in (typing.Union, types.UnionType)
            and float in typing.get_args(tp)
        ):
            value = float(value) if isinstance(value, int) else value
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides to a nested dict (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return data


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> Config:
    """YAML file (optional) + overrides -> validated Config."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    return Config.from_dict(data).validate()


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}: MLflow params and Tune search-space keys."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def load_with_section(
    path: str | os.PathLike | None, overrides: list[str] | None, section: str, cls: type
) -> tuple[Any, Config]:
    """A training config with one extra top-level section (`benchmark:`, `tune:`): (the
    section as a `cls` dataclass, the base Config). Unknown section keys are errors naming
    the known ones; `--set section.key=value` overrides reach both parts."""
    data: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"{section} config not found: {path}")
        data = yaml.safe_load(Path(path).read_text()) or {}
    data = apply_overrides(data, overrides or [])
    section_data = data.pop(section, {}) or {}
    known = {f.name for f in fields(cls)}
    unknown = set(section_data) - known
    if unknown:
        raise ConfigError(f"unknown {section} key(s) {sorted(unknown)}; known: {sorted(known)}")
    try:
        value = cls(**section_data)
    except TypeError as exc:
        raise ConfigError(f"{section}: {exc}") from None
    base = Config.from_dict(data).validate() if data else load_config(None, [])
    return value, base
