"""`train_loop_per_worker`: the Ray Train worker loop as named phases.

Set up (teacher, student, relation module, DDP over the trainable parts), restore from the
latest checkpoint, then per epoch: the `infosam.engine` step over the worker's shard, validation
on rank 0, and `ray.train.report` with a checkpoint. A spot notice checkpoints mid-epoch.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infosam.engine import train_step
from infosam.transforms import random_hflip
from infosam.tuning import load_trainable_state_dict
from orchestrator.config import (
    Config,
    ConfigError,
)
from orchestrator.data.reader import to_torch
from orchestrator.storage import ResultsDir
from orchestrator.tracking.runs import (
    RunLogger,
)
from orchestrator.train.checkpoints import (
    HISTORY_FILE,
    SCORES_FILE,
    load_state,
    save_checkpoint,
    write_scores,
)
from orchestrator.train.epoch_log import log_epochs
from orchestrator.train.evaluation import (
    draw_prompts,
    evaluate_split,
    mean_metrics,
)
from orchestrator.train.models import (
    autocast_dtype,
    build_models,
    unwrap,
)

LOSS_KEYS = (
    "loss",
    "segmentation",
    "compression",
    "distillation",
    "infosam",
    "kd",
    "empty_prompts",
)


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
    upload_to: str | None = None  # Train local mode on a bucket: each checkpoint is sent there
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
        loop_config.get("checkpoint_upload"),
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
    out = mean_metrics(sums["teacher"], count, "val/zero_shot_")
    for name in w.cfg.data.retention:  # the reference a retention curve is read against
        shard = ray.train.get_dataset_shard(f"retention-{name}")
        sums, count, _ = evaluate_split({"teacher": w.teacher}, shard, w.cfg, w.device)
        out.update(mean_metrics(sums["teacher"], count, f"val/zero_shot_retention/{name}/"))
    return out


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
    return _epoch_metrics(w, epoch, sums, steps, time.perf_counter() - t0)


def _epoch_metrics(
    w: _Worker, epoch: int, sums: dict[str, float], steps: int, train_time: float
) -> dict[str, Any]:
    """Every worker's loss sums reduced to means per step, with throughput and the lr."""
    sums["__steps"] = sums.get("__steps", 0.0) + steps
    sums["__images"] = float(steps * w.local_batch)  # throughput of this attempt
    sums = _all_reduce_sum(sums, w.device)
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
    from orchestrator.train.epoch_log import PARTIAL_KEY

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
    for name in cfg.data.retention:  # the pre-trained skill kept, epoch by epoch
        shard = ray.train.get_dataset_shard(f"retention-{name}")
        sums_r, count_r, _ = evaluate_split(models, shard, cfg, device)
        metrics.update(mean_metrics(sums_r["student"], count_r, f"val/retention/{name}/"))
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
            from orchestrator.plots import overlay_grid

            # a run without a teacher (no InfoSAM, no KD) has no teacher column to draw
            shown = [c for c in ("gt", "teacher", "student") if c in overlay_rows[0]]
            w.logger.log_image_file(
                overlay_grid(overlay_rows, shown), "overlays/val_teacher_student_gt.png"
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
            if w.upload_to:  # before the report: a reported checkpoint is one that lasts
                ResultsDir(w.upload_to).push_tree(tmp, keep="checkpoint_epoch_*")
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
    if "train/mi_bits" in m:  # InfoSAM's signal: I(r_t; r_s) against its ceiling log2(B)
        parts.append(
            f"I(r_t;r_s) {m['train/mi_bits']:.3f}/{m['train/mi_bound_bits']:.2f} bits, "
            f"relation rank {m['train/relation_rank_t']:.2f}"
        )
    for key in sorted(k for k in m if k.startswith(("val/", "test/")) and "zero_shot" not in k):
        parts.append(f"{key} {m[key]:.4f}")
    parts.append(f"{m['train/images_per_s']:.1f} img/s, {seconds:.0f}s")
    print("[infosam] " + " | ".join(parts), flush=True)
