"""InfoSAM training on Ray Train (`TorchTrainer`), checkpointed every epoch, tracked in MLflow.

Driver (`fit`): prepares data, creates the MLflow run, builds Ray datasets and the TorchTrainer,
marks the run FINISHED or FAILED. Workers (`train_loop_per_worker`): teacher + student + relation
module, DDP over the trainable parts, the `infosam.engine` step, validation, `ray.train.report`
with a checkpoint every epoch. Epoch metrics are logged to MLflow by the controller once it has
registered the report (`orchestrator.epoch_log.EpochLogger`), so each step is logged exactly once
whatever the timing of a failure; rank 0 logs only the run's params and images. Train local
mode has no controller: there rank 0 logs each epoch after its checkpoint is written.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infosam.engine import train_step
from infosam.sam import SAM_VARIANTS
from infosam.transforms import random_hflip
from infosam.tuning import load_trainable_state_dict
from orchestrator.checkpoints import (
    HISTORY_FILE,
    SCORES_FILE,
    checkpoint_scores,
    load_state,
    save_checkpoint,
    write_scores,
)
from orchestrator.config import (
    Config,
    ConfigError,
    config_changes,
    flatten,
    result_view,
    resume_refusal,
)
from orchestrator.datasets import load_manifest
from orchestrator.epoch_log import checkpoint_history, log_epochs
from orchestrator.evaluation import (
    draw_prompts,
    evaluate_split,
    log_category_results,
    mean_metrics,
)
from orchestrator.models import autocast_dtype, build_models, unwrap
from orchestrator.pipeline import to_torch
from orchestrator.runtime import (
    ensure_data,
    in_ray_worker,
    init_ray,
    teacher_checkpoint,
    teacher_hash,
)
from orchestrator.storage import atomic_write, atomic_write_json
from orchestrator.tracking import (
    RunLogger,
    check_tracking_server,
    closing_on_exit,
    resolve_tracking_uri,
)
from orchestrator.tracking import artifact_root as tracking_artifact_root
from orchestrator.tracking import open_run as tracking_open_run

__all__ = [
    "FitResult",
    "SharedData",
    "check_full_batches",
    "epoch_seeds",
    "fit",
    "make_optimizer",
    "make_trainer",
    "prepare_data",
    "train_loop_per_worker",
]

LOSS_KEYS = (
    "loss",
    "segmentation",
    "compression",
    "distillation",
    "infosam",
    "kd",
    "empty_prompts",
)


# ----------------------------------------------------------------------------- worker side


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    _, world = _dist()
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def _gather_fn(world: int):
    if world == 1:
        return None
    from torch.distributed.nn.functional import all_gather

    return lambda x: torch.cat(all_gather(x.contiguous()), dim=0)


def check_full_batches(cfg: Config, n_train: int, worlds: list[int]) -> int:
    """Steps per epoch (fewest over the world sizes); a clear error when there are none.

    Each of `world` workers gets `n_train // world` samples in batches of `batch // world`,
    last partial batch dropped. `fit` checks every size an elastic run may take before any
    worker starts, so a run that cannot train fails in seconds, not after worker restarts.
    """
    steps = min((n_train // max(w, 1)) // (cfg.optim.batch_size // max(w, 1)) for w in worlds)
    if steps == 0:
        raise ConfigError(
            f"{n_train} training samples give no full batch of {cfg.optim.batch_size} "
            "(drop_last): lower optim.batch_size or add data"
        )
    return steps


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter], steps_total: int):
    fused = torch.cuda.is_available() and all(p.is_cuda for p in params)
    cls = torch.optim.AdamW if cfg.optim.optimizer == "adamw" else torch.optim.Adam
    kwargs = {"fused": True} if fused else {}
    opt = cls(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, **kwargs)
    if cfg.optim.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(steps_total, 1), eta_min=cfg.optim.lr * cfg.optim.min_lr_ratio
        )
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def epoch_seeds(seed: int, epoch: int, rank: int) -> tuple[int, int]:
    """(prompt-sampling seed, torch seed) of one epoch on one rank.

    Keyed by epoch, not drawn from a running generator, so an epoch resumed from a checkpoint
    draws the same prompts and dropout as in an uninterrupted run; distinct per rank. The
    constants are distinct primes; changing them changes every run's numbers.
    """
    return seed * 100_003 + epoch * 101 + rank, seed * 7919 + epoch * 31 + rank


@dataclass
class _Worker:
    """One Train worker's state across the phases of `train_loop_per_worker`."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    teacher: Any
    student: Any
    relation: Any
    opt: Any
    sched: Any
    report: Any  # infosam.tuning.TuningReport of the student
    local_batch: int
    teacher_sha256: str | None
    local_dir: str | None
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None
    logger: RunLogger | None = None
    logs_epochs: bool = False  # Train local mode: no controller callback, rank 0 logs epochs
    resume_steps: int = 0  # steps of `start_epoch` done before a preemption checkpoint
    resume_sums: dict[str, float] = field(default_factory=dict)  # their loss sums (all ranks)
    notice_checkpointed: bool = False  # this attempt took its preemption checkpoint
    test_scores: list[dict[str, Any]] = field(default_factory=list)  # last epoch, per image


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs (also callable in Train local mode).

    Phases: set up (models, DDP, optimiser), restore (the latest registered checkpoint), open
    logging (rank 0), then per epoch: train, evaluate (rank 0), report (checkpoint + metrics).
    """
    import ray.train

    w = _setup(loop_config)
    _restore(w)
    _open_logging(w, loop_config)
    zero_shot = _zero_shot_val(w)
    train_shard = ray.train.get_dataset_shard("train")
    gen = torch.Generator()
    for epoch in range(w.start_epoch, w.cfg.optim.epochs):
        metrics = _train_epoch(w, epoch, train_shard, gen)
        overlay_rows = _evaluate_epoch(w, epoch, metrics, zero_shot) if w.rank == 0 else []
        _report(w, epoch, metrics, overlay_rows)


def _setup(loop_config: dict[str, Any]) -> _Worker:
    import ray.train.torch

    cfg = Config.from_dict(loop_config["config"])
    rank, world = _dist()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    teacher, student, relation, report = build_models(cfg, device)
    if world > 1:
        student = ray.train.torch.prepare_model(
            student, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True}
        )
        if relation is not None:
            relation = ray.train.torch.prepare_model(relation, move_to_device=False)
    params = [p for p in student.parameters() if p.requires_grad]
    if relation is not None:
        params += list(relation.parameters())
    local_bs = cfg.optim.batch_size // world
    steps_per_epoch = check_full_batches(cfg, loop_config["n_train"], [world])
    opt, sched = make_optimizer(cfg, params, steps_per_epoch * cfg.optim.epochs)
    w = _Worker(
        cfg,
        rank,
        world,
        device,
        teacher,
        student,
        relation,
        opt,
        sched,
        report,
        local_bs,
        loop_config.get("teacher_sha256"),
        loop_config.get("local_checkpoint_root"),
    )
    return w


def _restore(w: _Worker) -> None:
    """Load the latest checkpoint Ray Train registered (local mode: the run's own folder)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None and w.local_dir:  # Train local mode keeps no checkpoints of its own
        found = sorted(Path(w.local_dir).glob("checkpoint_epoch_*/" + HISTORY_FILE))  # complete
        ckpt = ray.train.Checkpoint.from_directory(str(found[-1].parent)) if found else None
    if ckpt is None:
        return
    with ckpt.as_directory() as d:
        state = load_state(d, w.device)
    load_trainable_state_dict(unwrap(w.student).sam, state["student"])
    if w.relation is not None:
        unwrap(w.relation).load_state_dict(state["relation"])
    w.opt.load_state_dict(state["optimizer"])
    w.sched.load_state_dict(state["scheduler"])
    w.start_epoch = int(state["epoch"]) + 1
    w.history = json.loads(state["history"])
    partial = state.get("partial")
    where = f"epoch {w.start_epoch - 1}"
    if partial:  # taken mid-epoch on a preemption notice: continue that epoch at its step
        w.resume_steps = int(partial["steps"])
        if w.rank == 0:  # the sums are over all ranks: counted once in the final all-reduce
            w.resume_sums = {k: float(v) for k, v in partial["sums"].items()}
        where = f"epoch {w.start_epoch} step {w.resume_steps} (preemption checkpoint)"
    if w.rank == 0:
        print(f"[infosam] resumed from checkpoint of {where}", flush=True)
        w.resumed_from = w.start_epoch - 1


def _open_logging(w: _Worker, loop_config: dict[str, Any]) -> None:
    """Rank 0: log model size; local mode: back-fill checkpointed epochs, tag the resume."""
    if not loop_config.get("mlflow") or w.rank != 0:
        return
    logger = w.logger = RunLogger(*loop_config["mlflow"])
    w.logs_epochs = w.cfg.scaling.max_workers == 0
    if w.logs_epochs:
        log_epochs(logger, w.history)
    if w.logs_epochs and w.resumed_from is not None:
        previous = logger.client.get_run(logger.run_id).data.tags.get("infosam.resumed_from_epochs")
        resumed = ",".join(filter(None, [previous, str(w.resumed_from)]))
        logger.set_tags({"infosam.resumed_from_epochs": resumed})
    if w.start_epoch == 0:
        logger.log_params(
            {
                "trainable_params": w.report.trainable_params,
                "total_params": w.report.total_params,
            }
        )


def _zero_shot_val(w: _Worker) -> dict[str, float]:
    """The frozen teacher on the validation split, once (when `optim.zero_shot_eval`)."""
    import ray.train

    if w.start_epoch or w.rank or w.teacher is None or not w.cfg.optim.zero_shot_eval:
        return {}
    sums, count, _ = evaluate_split(
        {"teacher": w.teacher}, ray.train.get_dataset_shard("val"), w.cfg, w.device
    )
    return mean_metrics(sums["teacher"], count, "val/zero_shot_")


def _train_epoch(w: _Worker, epoch: int, shard: Any, gen: torch.Generator) -> dict[str, Any]:
    """One pass over this worker's shard; losses averaged over all workers' steps."""
    cfg, device = w.cfg, w.device
    prompt_seed, torch_seed = epoch_seeds(cfg.seed, epoch, w.rank)
    gen.manual_seed(prompt_seed)
    torch.manual_seed(torch_seed)
    gather = _gather_fn(w.world) if cfg.scaling.all_gather_relations else None
    # Resuming a preemption checkpoint: replay the skipped batches' random draws (flips,
    # prompts) without training, so the rest of the epoch draws what it would have.
    skip = w.resume_steps if epoch == w.start_epoch else 0
    sums: dict[str, float] = dict(w.resume_sums) if skip else {}
    check_every = cfg.scaling.preemption_check_steps if cfg.scaling.max_workers > 0 else 0
    steps, t0 = 0, time.perf_counter()
    batches = shard.iter_batches(
        batch_size=w.local_batch,
        batch_format="numpy",
        drop_last=True,
        local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
        local_shuffle_seed=(cfg.seed + epoch) if cfg.data.shuffle_buffer else None,
    )
    for np_batch in batches:
        batch = to_torch(np_batch, device)
        if cfg.data.augment == "hflip":  # before prompts, so boxes/points follow the flip
            random_hflip(batch["image"], batch["mask"], batch["input_size"], generator=gen)
        prompts = draw_prompts(cfg, batch["mask"], gen, device, train=True)
        steps += 1
        if steps <= skip:
            continue
        losses = train_step(
            w.student,
            w.opt,
            batch,
            prompts,
            cfg.loss,
            teacher=w.teacher,
            relation=w.relation,
            scheduler=w.sched,
            autocast_dtype=autocast_dtype(cfg),
            grad_clip=cfg.optim.grad_clip,
            gather=gather,
        )
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v
        if check_every and steps % check_every == 0 and not w.notice_checkpointed:
            import ray.train

            if ray.train.get_preemption_info() is not None:  # a barrier: every rank asks
                _checkpoint_on_notice(w, epoch, steps, sums, skip)
    steps = max(steps - skip, 0)  # skipped steps are in the carried-over sums
    train_time = time.perf_counter() - t0
    sums["__steps"] = sums.get("__steps", 0.0) + steps
    sums["__images"] = float(steps * w.local_batch)  # throughput of this attempt
    sums = _all_reduce_sum(sums, device)
    total_steps = max(sums.pop("__steps"), 1)
    images = sums.pop("__images")
    metrics: dict[str, Any] = {
        f"train/{k}": v / total_steps for k, v in sums.items() if k != "empty_prompts"
    }
    metrics["train/empty_prompts"] = sums.get("empty_prompts", 0.0)
    metrics["train/images_per_s"] = images / max(train_time, 1e-9)
    metrics["train/lr"] = w.opt.param_groups[0]["lr"]
    metrics["epoch"] = epoch
    metrics["time/train_s"] = train_time
    metrics["scaling/world_size"] = w.world
    return metrics


def _checkpoint_on_notice(
    w: _Worker, epoch: int, steps: int, sums: dict[str, float], skipped: int
) -> None:
    """A node of this run is being reclaimed: checkpoint mid-epoch now (all ranks call this).

    The checkpoint holds the last completed epoch's state plus `partial` (steps done in this
    epoch, the loss sums over all ranks so far); the controller registers it as the one to
    resume from and logs no epoch for it. Training then continues until Ray Train stops the
    group at the reclaim deadline.
    """
    from orchestrator.epoch_log import PARTIAL_KEY

    own = dict(sums)  # on rank 0 these include what earlier attempts summed over all ranks
    own["__steps"] = own.get("__steps", 0.0) + (steps - skipped)
    total = _all_reduce_sum(own, w.device)
    name = f"checkpoint_epoch_{epoch:04d}_step_{steps:05d}"
    saved_at = time.time()
    report = {"epoch": epoch, PARTIAL_KEY: steps, "saved_at": saved_at}
    report["scaling/world_size"] = w.world
    partial = {"epoch": epoch, "steps": steps, "sums": total, "saved_at": saved_at}
    _save_and_report(w, report, name, epoch - 1, partial=partial)
    w.notice_checkpointed = True
    if w.rank == 0:
        print(
            f"[infosam] preemption notice: checkpointed epoch {epoch} at step {steps}", flush=True
        )


def _evaluate_epoch(
    w: _Worker, epoch: int, metrics: dict[str, Any], zero_shot: dict[str, float]
) -> list[dict[str, np.ndarray]]:
    """Rank 0: validation every epoch; test (and the overlay PNG's rows) after the last."""
    import ray.train

    cfg, device = w.cfg, w.device
    t_eval = time.perf_counter()
    overlay_rows: list[dict[str, np.ndarray]] = []
    # Unwrapped: a DDP forward on one rank alone would wait for the others (buffer sync).
    models = {"student": unwrap(w.student)}
    sums_v, count, _ = evaluate_split(models, ray.train.get_dataset_shard("val"), cfg, device)
    metrics.update(mean_metrics(sums_v["student"], count, "val/"))
    metrics.update(zero_shot)
    if epoch == cfg.optim.epochs - 1:
        if w.teacher is not None and cfg.optim.zero_shot_eval:
            models = {**models, "teacher": w.teacher}  # one pass over the test split
        sums_t, count_t, _ = evaluate_split(
            models, ray.train.get_dataset_shard("test"), cfg, device, scores=w.test_scores
        )
        metrics.update(mean_metrics(sums_t["student"], count_t, "test/"))
        if "teacher" in sums_t:
            metrics.update(mean_metrics(sums_t["teacher"], count_t, "test/zero_shot_"))
        if w.logger is not None and cfg.tracking.overlays > 0:
            both = {"student": unwrap(w.student)}
            if w.teacher is not None:
                both = {"teacher": w.teacher, **both}
            _, _, overlay_rows = evaluate_split(
                both,
                ray.train.get_dataset_shard("val"),
                cfg,
                device,
                overlays=cfg.tracking.overlays,
            )
    metrics["time/eval_s"] = time.perf_counter() - t_eval
    metrics["model/trainable_params"] = w.report.trainable_params
    return overlay_rows


def _report(
    w: _Worker, epoch: int, metrics: dict[str, Any], overlay_rows: list[dict[str, np.ndarray]]
) -> None:
    """Checkpoint (rank 0) + `ray.train.report`; the controller logs the epoch once registered."""
    cfg = w.cfg
    metrics["eval_protocol"] = cfg.optim.eval_protocol
    w.history.append(dict(metrics))
    _save_and_report(w, metrics, f"checkpoint_epoch_{epoch:04d}", epoch)
    if w.rank != 0:
        return
    _print_epoch(epoch, cfg.optim.epochs, metrics, metrics["time/train_s"])
    if w.logger is not None:
        if w.logs_epochs:
            log_epochs(w.logger, [metrics])
        if overlay_rows:
            from orchestrator.visualize import overlay_grid

            w.logger.log_image_file(
                overlay_grid(overlay_rows), "overlays/val_teacher_student_gt.png"
            )


def _save_and_report(
    w: _Worker,
    metrics: dict[str, Any],
    name: str,
    epoch: int,
    partial: dict[str, Any] | None = None,
) -> None:
    """Rank 0 writes the checkpoint (state after `epoch`); every rank reports `metrics` with it."""
    import ray.train

    with _checkpoint_dir(w.local_dir, name) as tmp:
        checkpoint = None
        if w.rank == 0:
            if w.test_scores and partial is None:  # before history.json marks it complete
                write_scores(w.test_scores, Path(tmp) / SCORES_FILE)
            save_checkpoint(
                tmp,
                student=w.student,
                relation=w.relation,
                opt=w.opt,
                sched=w.sched,
                epoch=epoch,
                history=w.history,
                cfg=w.cfg,
                teacher_sha=w.teacher_sha256,
                partial=partial,
            )
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


@contextlib.contextmanager
def _checkpoint_dir(local_root: str | None, name: str):
    """A temp dir Ray Train uploads; in local mode a kept dir under the run (last two kept)."""
    if not local_root:
        with tempfile.TemporaryDirectory() as tmp:
            yield tmp
        return
    root = Path(local_root)
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    yield str(path)
    import shutil

    for old in sorted(root.glob("checkpoint_epoch_*"))[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def _print_epoch(epoch: int, epochs: int, m: dict[str, Any], seconds: float) -> None:
    parts = [
        f"epoch {epoch + 1}/{epochs}",
        f"loss {m['train/loss']:.4f}",
        f"seg {m['train/segmentation']:.4f}",
    ]
    for key, short in (
        ("train/compression", "L_r"),
        ("train/distillation", "L_d"),
        ("train/kd", "kd"),
    ):
        if key in m:
            parts.append(f"{short} {m[key]:.4f}")
    for key in sorted(k for k in m if k.startswith(("val/", "test/")) and "zero_shot" not in k):
        parts.append(f"{key} {m[key]:.4f}")
    parts.append(f"{m['train/images_per_s']:.1f} img/s, {seconds:.0f}s")
    print("[infosam] " + " | ".join(parts), flush=True)


# ----------------------------------------------------------------------------- driver side


@dataclass
class FitResult:
    run_id: str | None
    tracking_uri: str | None
    storage_dir: str
    metrics: dict[str, Any]
    checkpoint_dir: str | None
    history: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase, see `fit`
    # the last epoch's test split, one row per model and image (see `evaluate_split`)
    test_scores: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SharedData:
    """What every run on one dataset shares: prepared once, passed to many `fit` calls.

    The benchmark builds one per dataset (decoded small splits in Ray's object store, the
    teacher cache, the manifest, the teacher hash) and hands it to each of its cells, so cells
    no longer decode the same images again.
    """

    data_dir: str
    manifest: dict[str, Any]
    datasets: dict[str, Any]  # train/val/test Ray Datasets (materialized when small)
    teacher_sha256: str | None
    n_train: int
    train_cache: dict[str, Any] | None = None


def prepare_data(
    cfg: Config, *, teacher_sha256: str | None = None, quiet: bool = True
) -> SharedData:
    """Dataset folder, teacher cache and Ray Datasets for `cfg` (Ray must be initialised)."""
    from orchestrator.pipeline import read_split

    data_dir = ensure_data(cfg)
    manifest = load_manifest(data_dir)
    sc = cfg.scaling
    size = SAM_VARIANTS[cfg.model.variant].image_size
    train_cache = None
    if cfg.speed.teacher_cache and cfg.loss.needs_teacher:
        from orchestrator.teacher_cache import CacheKey, TeacherCacheError, ensure_teacher_cache

        key = CacheKey.for_config(cfg, teacher_sha256) if teacher_sha256 else None
        try:
            train_cache = ensure_teacher_cache(
                data_dir,
                cfg.data.train_split,
                key,
                checkpoint=teacher_checkpoint(cfg),
                use_gpu=sc.use_gpu,
                quiet=quiet,
            )
        except TeacherCacheError as exc:
            raise ConfigError(str(exc)) from None
    splits = {"train": cfg.data.train_split, "val": cfg.data.val_split, "test": cfg.data.test_split}
    datasets = {}
    for key, split in splits.items():
        ds = read_split(
            data_dir,
            split,
            image_size=size,
            channel_order=cfg.data.channel_order,
            keep_original_mask=key != "train",
            num_cpus=sc.data_cpus,
            teacher_cache=train_cache if key == "train" else None,
        )
        # Small splits are decoded once and kept in the object store: every later epoch, every
        # evaluation and (in a benchmark) every cell then skips parquet reading and decoding.
        rows = manifest["counts"].get(split, 0)
        row_bytes = size * size * 4
        if key == "train" and train_cache is not None:
            row_bytes += 2 * int(np.prod(train_cache["embedding_shape"]))
        if rows * row_bytes <= cfg.data.materialize_max_mb * 2**20:
            ds = ds.materialize()
        datasets[key] = ds
    n_train = int(manifest["counts"].get(cfg.data.train_split, 0))
    return SharedData(str(data_dir), manifest, datasets, teacher_sha256, n_train, train_cache)


def _storage(cfg: Config, name: str | None, run_name: str | None) -> tuple[str, str]:
    storage = cfg.storage.path
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
        Path(storage).mkdir(parents=True, exist_ok=True)
    name = (
        name
        or cfg.storage.name
        or f"{run_name or 'train'}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )
    return storage, name


def _run_dir(storage: str, name: str) -> Path | None:
    return None if "://" in storage else Path(storage) / name


RUN_CONFIG_FILE = "run_config.json"


def record_run_config(run_dir: Path, cfg: Config, what: str, allow: bool) -> list[str]:
    """Check a resumed run against the configuration it was started with (its
    `run_config.json`, else its newest checkpoint's config.yaml), then record this one; returns
    the changes taken (`key: old -> new`). Refused (ConfigError) only when the run has a
    checkpoint to resume from: a run that failed before its first checkpoint starts afresh."""
    recorded = None
    path = run_dir / RUN_CONFIG_FILE
    saved = sorted(run_dir.glob("checkpoint_*/config.yaml"), key=lambda p: p.stat().st_mtime)
    if path.is_file():
        recorded = json.loads(path.read_text())
    elif saved:  # a run started before run_config.json existed
        import yaml

        recorded = result_view(Config.from_dict(yaml.safe_load(saved[-1].read_text())))
    now = result_view(cfg)
    changes = config_changes(recorded, now)
    resumable = any((p.parent / "history.json").is_file() for p in saved)
    if changes and resumable and not allow:
        raise resume_refusal(what, changes)
    if recorded != now:
        atomic_write_json(path, now, indent=2)
    return changes


def eval_unit(manifest: dict) -> str:
    """What a metric is a mean over: images, or instances for instance datasets (COCO, labels)."""
    return "instance" if manifest.get("kind") == "instances" else "image"


def data_counts(cfg: Config, manifest: dict) -> dict[str, int]:
    """Samples (and for instance datasets, images) of the run's splits, for the run's params."""
    unit = eval_unit(manifest)
    out = {}
    for role in ("train", "val", "test"):
        split = getattr(cfg.data, f"{role}_split")
        out[f"data.{role}_{unit}s"] = int(manifest["counts"].get(split, 0))
        if unit == "instance":
            out[f"data.{role}_images"] = int(manifest["images"].get(split, 0))
    return out


def _tracking_uri(cfg: Config) -> str:
    return resolve_tracking_uri(
        cfg.tracking.uri, cfg.storage.path if "://" not in cfg.storage.path else "."
    )


def open_training_run(
    cfg: Config,
    *,
    run_name: str,
    run_dir: Path | None,
    parent_run_id: str | None,
    tags: dict[str, str],
    shared: SharedData,
) -> RunLogger:
    """The run's MLflow run: re-opened (RUNNING again) when this Train run resumes, else new."""
    uri = _tracking_uri(cfg)
    run_id_file = run_dir / "mlflow_run_id" if run_dir else None
    previous = run_id_file.read_text().strip() if run_id_file and run_id_file.is_file() else None
    logger, resumed = tracking_open_run(
        uri,
        cfg.tracking.experiment,
        run_name,
        resume_run_id=previous,
        artifact_root=tracking_artifact_root(cfg.storage.path, cfg.tracking.experiment),
        tags=tags
        if previous
        else {
            "infosam.eval_protocol": cfg.optim.eval_protocol,
            "infosam.dataset": cfg.data.dataset,
            "infosam.tuning": cfg.tuning.method,
            "infosam.eval_unit": eval_unit(shared.manifest),
            **tags,
        },
        parent_run_id=parent_run_id,
    )
    if resumed:
        return logger
    if run_id_file is not None:
        run_id_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(run_id_file, logger.run_id)
    logger.log_params(flatten(cfg.to_dict()))
    logger.log_params(
        {
            "teacher_sha256": shared.teacher_sha256 or "random-init",
            "data.manifest_shards": len(shared.manifest["shards"]),
            "all_gather_relations": cfg.scaling.all_gather_relations,
            **data_counts(cfg, shared.manifest),
        }
    )
    logger.log_text(cfg.to_yaml(), "config.yaml")
    manifest = {k: v for k, v in shared.manifest.items() if k != "shards"}
    logger.log_text(json.dumps(manifest, indent=2, default=str), "data_manifest.json")
    return logger


def fit(
    cfg: Config,
    *,
    logger: RunLogger | None = None,
    quiet: bool = False,
    callbacks: list | None = None,
    shared: SharedData | None = None,
    run_name: str | None = None,
    storage_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    train_loop: Callable[[dict[str, Any]], None] = train_loop_per_worker,
    allow_config_change: bool = False,
) -> FitResult:
    """Train one configuration on Ray Train; returns final metrics and the last checkpoint.

    Run state stays out of `cfg`: `run_name` (MLflow), `storage_name` (Ray Train's run
    directory; re-using one resumes it), `parent_run_id` and `tags` are arguments, defaulting to
    the user-facing `tracking.run_name`, `storage.name` and `tracking.parent_run_id`. `shared`
    skips data preparation (a benchmark prepares each dataset once for all its cells). A run
    resumed under its storage name must have the configuration it started with
    (`record_run_config`) unless `allow_config_change`.
    `FitResult.timings`: start-up (config, teacher hash, Ray, MLflow), data, training and
    evaluation (sums over epochs, from the workers), Train overhead (worker start, reports,
    checkpoints) and logging (curves, closing the run).
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    cfg.validate()
    if not quiet:
        print("[infosam] resolved config:\n" + cfg.to_yaml(), flush=True)
    run_name = run_name or cfg.tracking.run_name
    parent_run_id = parent_run_id or cfg.tracking.parent_run_id
    teacher_sha = shared.teacher_sha256 if shared is not None else teacher_hash(cfg)
    if teacher_sha is None:
        print(
            "[infosam] WARNING: model.checkpoint is null: the teacher is randomly initialised",
            flush=True,
        )
    if logger is None:  # before Ray and the data: an unreachable server fails in seconds
        check_tracking_server(_tracking_uri(cfg))
    init_ray()
    storage, name = _storage(cfg, storage_name, run_name)
    run_dir = _run_dir(storage, name)
    changes = []
    if run_dir is not None:
        changes = record_run_config(run_dir, cfg, f"run {name!r} in {storage}", allow_config_change)
    timings["startup_s"] = time.perf_counter() - t_start
    owns_logger = logger is None
    t_data = time.perf_counter()
    if shared is None:
        shared = prepare_data(cfg, teacher_sha256=teacher_sha, quiet=quiet)
    timings["data_s"] = time.perf_counter() - t_data
    t_log = time.perf_counter()
    if logger is None:
        logger = open_training_run(
            cfg,
            run_name=run_name or name,
            run_dir=run_dir,
            parent_run_id=parent_run_id,
            tags={
                "infosam.storage_name": name,
                # its params are those it started with (MLflow keeps a param's first value)
                **({"infosam.config_changes": "; ".join(changes)[:5000]} if changes else {}),
                **(tags or {}),
            },
            shared=shared,
        )
    # SIGTERM/Ctrl-C end the run KILLED, an error FAILED; a caller's run is the caller's to close
    with closing_on_exit(
        logger if owns_logger else None, children=False, signals=not in_ray_worker()
    ):
        if shared.train_cache is not None:
            logger.set_tags({"infosam.teacher_cache": shared.train_cache["location"]})
        sc = cfg.scaling
        check_full_batches(cfg, shared.n_train, list(range(sc.min_workers, sc.max_workers + 1)))
        timings["startup_s"] += time.perf_counter() - t_log
        trainer = make_trainer(
            cfg,
            shared,
            name=name,
            storage=storage,
            run_dir=run_dir,
            mlflow_run=(logger.uri, logger.run_id),
            callbacks=callbacks,
            train_loop=train_loop,
        )
        t_fit = time.perf_counter()
        result = trainer.fit()
        fit_s = time.perf_counter() - t_fit
        t_log = time.perf_counter()
        checkpoint_dir = result.checkpoint.path if result.checkpoint is not None else None
        history: list[dict[str, Any]] = []
        test_scores: list[dict[str, Any]] = []
        if result.checkpoint is not None:
            history = checkpoint_history(result.checkpoint)
            # Idempotent: normally a no-op; fills epochs whose logging a driver crash interrupted.
            log_epochs(logger, history)
            test_scores = checkpoint_scores(result.checkpoint)
            if test_scores:
                logger.log_rows(test_scores, "scores/test_scores.csv")
                log_category_results(logger, test_scores)
        with contextlib.suppress(Exception):
            _log_curves(logger, cfg)
        if checkpoint_dir:
            logger.set_tags({"infosam.checkpoint": checkpoint_dir})
        if owns_logger:
            logger.finish("FINISHED")
    timings["train_s"] = sum(float(h.get("time/train_s", 0.0)) for h in history)
    timings["eval_s"] = sum(float(h.get("time/eval_s", 0.0)) for h in history)
    timings["train_overhead_s"] = max(fit_s - timings["train_s"] - timings["eval_s"], 0.0)
    timings["logging_s"] = time.perf_counter() - t_log
    return FitResult(
        run_id=logger.run_id if logger else None,
        tracking_uri=logger.uri if logger else None,
        storage_dir=str(Path(storage) / name) if "://" not in storage else f"{storage}/{name}",
        metrics=dict(result.metrics or {}),
        checkpoint_dir=checkpoint_dir,
        history=history,
        timings=timings,
        test_scores=test_scores,
    )


def make_trainer(
    cfg: Config,
    shared: SharedData,
    *,
    name: str,
    storage: str,
    run_dir: Path | None,
    mlflow_run: tuple[str, str] | None,
    callbacks: list | None = None,
    train_loop: Callable[[dict[str, Any]], None] = train_loop_per_worker,
) -> Any:
    """The `TorchTrainer` of one run: worker loop, scaling, datasets, checkpoints, failures.

    With Train workers and an MLflow run, `EpochLogger` logs each registered epoch from the
    controller. `train_loop` wraps or replaces the worker loop (fault injection, profiling).
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.epoch_log import EpochLogger

    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker, **sc.worker_resources}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    callbacks = list(callbacks or [])
    if mlflow_run is not None and sc.max_workers > 0:
        callbacks.append(EpochLogger(*mlflow_run))
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "config": cfg.to_dict(),
            "mlflow": mlflow_run,
            "n_train": shared.n_train,
            "teacher_sha256": shared.teacher_sha256,
            "local_checkpoint_root": str(run_dir) if sc.max_workers == 0 and run_dir else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=tuple(sc.num_workers) if sc.elastic else sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=resources if sc.max_workers else None,
            elastic_resize_monitor_interval_s=sc.elastic_resize_interval_s,
        ),
        datasets=shared.datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(
                max_failures=sc.max_failures, max_preemption_failures=sc.max_preemption_failures
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )


def _log_curves(logger: RunLogger, cfg: Config) -> None:
    keys = [
        k
        for k in logger.metric_keys()
        if k.startswith("train/")
        and k not in ("train/images_per_s", "train/lr", "train/empty_prompts")
    ]
    keys += [k for k in logger.metric_keys() if k.startswith("val/") and "zero_shot" not in k]
    history = {k: logger.metric_history(k) for k in keys}
    from orchestrator.visualize import loss_curve_figure

    fig = loss_curve_figure(history, title=f"{cfg.tuning.method} on {cfg.data.dataset}")
    logger.log_figure(fig, "plots/loss_curve.png")
    import matplotlib.pyplot as plt

    plt.close(fig)
