"""InfoSAM training on Ray Train (`TorchTrainer`), checkpointed every epoch, tracked in MLflow.

Driver (`fit`): prepares data, creates the MLflow run, builds Ray datasets and the TorchTrainer,
marks the run FINISHED or FAILED. Workers (`train_loop_per_worker`): teacher + student + relation
module, DDP over the trainable parts, the `infosam.engine` step, validation, `ray.train.report`
with a checkpoint every epoch, and (rank 0 only) MLflow logging after each report, so a metric
is only logged once its epoch's checkpoint is safe; on resume, epochs that were checkpointed but
not yet logged are back-filled from the checkpoint, so the history stays continuous.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infosam.engine import eval_step, predict_logits, train_step
from infosam.prompts import sample_prompts
from infosam.relation import RelationModule
from infosam.sam import (
    SAM_VARIANTS,
    PromptableSam,
    build_sam,
    checkpoint_sha256,
    resolve_checkpoint,
)
from infosam.speed import checkpoint_blocks, compile_blocks, use_attention
from infosam.transforms import random_hflip
from infosam.tuning import apply_tuning, load_trainable_state_dict, trainable_state_dict
from orchestrator.config import SYNTHETIC_DOMAINS, Config, ConfigError, flatten
from orchestrator.datasets import load_manifest
from orchestrator.tracking import RunLogger, resolve_tracking_uri, start_run
from orchestrator.tracking import artifact_root as tracking_artifact_root

__all__ = [
    "FitResult",
    "apply_speed",
    "build_models",
    "ensure_data",
    "fit",
    "load_trained",
    "train_loop_per_worker",
]

STATE_FILE = "state.pt"
LOSS_KEYS = (
    "loss",
    "segmentation",
    "compression",
    "distillation",
    "infosam",
    "kd",
    "empty_prompts",
)


# ----------------------------------------------------------------------------- shared helpers


def ensure_data(cfg: Config) -> Path | str:
    """The dataset folder; synthesises an embedded domain on first use (under a file lock)."""
    if "://" in cfg.data.root:  # shared storage on clusters (s3://...): must be ingested already
        uri = f"{cfg.data.root.rstrip('/')}/{cfg.data.dataset}"
        load_manifest(uri)
        return uri
    root = Path(cfg.data.root).expanduser().resolve()
    path = root / cfg.data.dataset
    if (path / "manifest.json").is_file():
        return path
    if not (cfg.data.synthesize and cfg.data.dataset in SYNTHETIC_DOMAINS):
        raise ConfigError(
            f"dataset not found: {path} has no manifest.json. For the paper benchmarks, download "
            "the Conv-LoRA dataset zips (polyp, camo_sem_seg, isic2017, leaf_disease_segmentation, "
            f"road_segmentation), unzip each, and run `infosam data ingest --format convlora "
            f"<unzipped folder> {root}`; or point data.root/data.dataset at an ingested dataset"
        )
    from orchestrator.synthetic import synthesize

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".synth.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "manifest.json").is_file():
            print(
                f"[infosam] generating synthetic domain {cfg.data.dataset!r} in {root}", flush=True
            )
            synthesize(
                root, [cfg.data.dataset], seed=cfg.data.synth_seed, scale=cfg.data.synth_scale
            )
    return path


def teacher_checkpoint(cfg: Config) -> str | None:
    path = resolve_checkpoint(cfg.model.checkpoint)
    if path is not None and not os.path.isfile(path):
        raise ConfigError(
            f"model.checkpoint not found: {path}. Download the official SAM weights for "
            f"{cfg.model.variant} ({SAM_VARIANTS[cfg.model.variant].official_checkpoint}) from "
            "facebookresearch/segment-anything and set model.checkpoint to their path"
        )
    return path


def build_models(
    cfg: Config, device: torch.device | str = "cpu"
) -> tuple[PromptableSam | None, PromptableSam, RelationModule | None, Any]:
    """(frozen teacher or None, student, relation module or None, tuning report)."""
    path = teacher_checkpoint(cfg)
    loss = cfg.loss
    teacher = None
    if loss.needs_teacher:
        teacher = PromptableSam(build_sam(cfg.model.variant, path)).to(device).eval()
        teacher.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # identical student init (adapters, LoRA) on every worker and run
    sam = build_sam(cfg.model.variant, path)
    report = apply_tuning(sam, cfg.tuning)
    student = PromptableSam(sam).to(device)
    relation = (
        RelationModule(SAM_VARIANTS[cfg.model.variant].prompt_embed_dim).to(device)
        if loss.infosam
        else None
    )
    apply_speed(cfg, teacher, student)
    return teacher, student, relation, report


def apply_speed(cfg: Config, teacher: PromptableSam | None, student: PromptableSam) -> None:
    """The `speed` section's switches, in place (weights and state_dict keys unchanged)."""
    sp = cfg.speed
    use_attention(student.sam, sp.attention)
    if sp.checkpointing:
        checkpoint_blocks(student.sam)
    if sp.compile:
        compile_blocks(student.sam)
    if teacher is not None:
        use_attention(teacher.sam, sp.attention)
        if sp.compile and not sp.teacher_cache:
            compile_blocks(teacher.sam)
        if sp.teacher_bf16:
            teacher.sam.image_encoder.to(torch.bfloat16)


def _autocast_dtype(cfg: Config) -> torch.dtype | None:
    return torch.bfloat16 if cfg.optim.precision == "bf16" else None


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if hasattr(module, "module") else module


def load_trained(
    checkpoint_dir: str | os.PathLike, device: str = "cpu"
) -> tuple[PromptableSam, Config, dict]:
    """Rebuild the fine-tuned student from a training checkpoint directory."""
    state = torch.load(Path(checkpoint_dir) / STATE_FILE, map_location=device, weights_only=True)
    cfg = Config.from_dict(json.loads(state["config"]))
    path = teacher_checkpoint(cfg)
    if (
        path is not None
        and state.get("teacher_sha256")
        and checkpoint_sha256(path) != state["teacher_sha256"]
    ):
        raise ConfigError(
            f"{path} is not the base checkpoint this run was trained from (sha256 differs); "
            "the checkpoint holds only the trained tensors, so it needs the same base weights"
        )
    sam = build_sam(cfg.model.variant, path)
    apply_tuning(sam, cfg.tuning)
    load_trainable_state_dict(sam, state["student"])
    return PromptableSam(sam).to(device).eval(), cfg, state


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


def _numpy_to_torch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, Any]:
    from orchestrator.pipeline import to_torch

    return to_torch(batch, device)


def _evaluate(
    models: dict[str, torch.nn.Module],
    iterator: Any,
    cfg: Config,
    device: torch.device,
    overlays: int = 0,
) -> tuple[dict[str, dict[str, float]], int, list[dict[str, np.ndarray]]]:
    """Mean metrics per model over a full split; optionally collect overlay rows."""
    sums: dict[str, dict[str, float]] = {name: {} for name in models}
    count = 0
    rows: list[dict[str, np.ndarray]] = []
    gen = torch.Generator().manual_seed(cfg.seed)  # the same eval prompts every epoch
    for np_batch in iterator.iter_batches(
        batch_size=cfg.optim.eval_batch_size, batch_format="numpy"
    ):
        batch = _numpy_to_torch(np_batch, device)
        masks = batch["mask"]
        prompts = sample_prompts(
            masks.cpu(),
            cfg.data.eval_prompt,
            max_shift=cfg.data.eval_box_jitter,
            num_positive=cfg.data.num_positive_points,
            num_negative=cfg.data.num_negative_points,
            generator=gen,
        ).to(device)
        gts = [torch.from_numpy(np.array(m)) for m in batch["mask_original"]]
        preds: dict[str, list[torch.Tensor]] = {}
        for name, model in models.items():
            results = eval_step(
                model,
                batch["image"],
                gts,
                prompts,
                batch["input_size"],
                protocol=cfg.optim.eval_protocol,
                metrics=tuple(cfg.optim.metrics),
                autocast_dtype=_autocast_dtype(cfg),
            )
            for r in results:
                for k, v in r.items():
                    if k != "protocol":
                        sums[name][k] = sums[name].get(k, 0.0) + float(v)
            if len(rows) < overlays:
                preds[name] = predict_logits(
                    model,
                    batch["image"],
                    prompts,
                    batch["input_size"],
                    [g.shape for g in gts],
                    autocast_dtype=_autocast_dtype(cfg),
                )
        count += len(gts)
        if len(rows) < overlays:
            for i in range(min(overlays - len(rows), len(gts))):
                h, w = gts[i].shape
                ih, iw = (int(v) for v in batch["input_size"][i])
                small = batch["image"][i, :, :ih, :iw].permute(1, 2, 0).cpu().numpy()
                from PIL import Image

                image = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
                row = {"image": image, "gt": gts[i].numpy()}
                for name in models:
                    row[name] = (preds[name][i] > 0).cpu().numpy()
                rows.append(row)
    return sums, count, rows


def _make_optimizer(cfg: Config, params: list[torch.nn.Parameter], steps_total: int):
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


def _save_checkpoint(
    tmp: str, *, student, relation, opt, sched, epoch, history, cfg, teacher_sha
) -> None:
    state = {
        "student": trainable_state_dict(_unwrap(student).sam),
        "relation": None if relation is None else _unwrap(relation).state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": epoch,
        "torch_rng": torch.get_rng_state(),
        "history": json.dumps(history),
        "config": json.dumps(cfg.to_dict()),
        "teacher_sha256": teacher_sha,
    }
    torch.save(state, Path(tmp) / STATE_FILE)
    (Path(tmp) / "config.yaml").write_text(cfg.to_yaml())
    (Path(tmp) / "metrics.json").write_text(json.dumps(history[-1], indent=2))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs (also callable in Train local mode)."""
    import ray.train
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
    n_train = loop_config["n_train"]
    steps_per_epoch = (n_train // world) // local_bs
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{n_train} training samples give no full batch of {cfg.optim.batch_size} "
            "(drop_last): lower optim.batch_size or add data"
        )
    opt, sched = _make_optimizer(cfg, params, steps_per_epoch * cfg.optim.epochs)
    start_epoch, history, resumed_from = 0, [], None
    ckpt = ray.train.get_checkpoint()
    local_dir = loop_config.get("local_checkpoint_root")
    if ckpt is None and local_dir:  # Train local mode keeps no checkpoints of its own
        found = sorted(Path(local_dir).glob("checkpoint_epoch_*/" + STATE_FILE))
        ckpt = ray.train.Checkpoint.from_directory(str(found[-1].parent)) if found else None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
        load_trainable_state_dict(_unwrap(student).sam, state["student"])
        if relation is not None:
            _unwrap(relation).load_state_dict(state["relation"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        history = json.loads(state["history"])
        if rank == 0:
            print(f"[infosam] resumed from checkpoint of epoch {start_epoch - 1}", flush=True)
            resumed_from = start_epoch - 1
    logger = RunLogger(*loop_config["mlflow"]) if loop_config.get("mlflow") and rank == 0 else None
    if logger is not None:
        _backfill(logger, history)
        if resumed_from is not None:
            previous = logger.client.get_run(logger.run_id).data.tags.get(
                "infosam.resumed_from_epochs"
            )
            logger.set_tags(
                {
                    "infosam.resumed_from_epochs": ",".join(
                        filter(None, [previous, str(resumed_from)])
                    )
                }
            )
        if start_epoch == 0:
            logger.log_params(
                {"trainable_params": report.trainable_params, "total_params": report.total_params}
            )
    gather = _gather_fn(world) if cfg.scaling.all_gather_relations else None
    autocast = _autocast_dtype(cfg)
    train_shard = ray.train.get_dataset_shard("train")
    gen = torch.Generator()
    zero_shot: dict[str, float] = {}
    if start_epoch == 0 and rank == 0 and teacher is not None and cfg.optim.zero_shot_eval:
        sums, count, _ = _evaluate(
            {"teacher": teacher}, ray.train.get_dataset_shard("val"), cfg, device
        )
        zero_shot = {f"val/zero_shot_{k}": v / max(count, 1) for k, v in sums["teacher"].items()}

    for epoch in range(start_epoch, cfg.optim.epochs):
        # Epoch-keyed seeds: a resumed epoch draws the same prompts as an uninterrupted one.
        gen.manual_seed(cfg.seed * 100_003 + epoch * 101 + rank)
        torch.manual_seed(cfg.seed * 7919 + epoch * 31 + rank)
        sums: dict[str, float] = {}
        steps, t0 = 0, time.perf_counter()
        batches = train_shard.iter_batches(
            batch_size=local_bs,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=(cfg.seed + epoch) if cfg.data.shuffle_buffer else None,
        )
        for np_batch in batches:
            batch = _numpy_to_torch(np_batch, device)
            if cfg.data.augment == "hflip":  # before prompts, so boxes/points follow the flip
                random_hflip(batch["image"], batch["mask"], batch["input_size"], generator=gen)
            prompts = sample_prompts(
                batch["mask"].cpu(),
                cfg.data.prompt,
                max_shift=cfg.data.box_jitter,
                num_positive=cfg.data.num_positive_points,
                num_negative=cfg.data.num_negative_points,
                generator=gen,
            ).to(device)
            losses = train_step(
                student,
                opt,
                batch,
                prompts,
                cfg.loss,
                teacher=teacher,
                relation=relation,
                scheduler=sched,
                autocast_dtype=autocast,
                grad_clip=cfg.optim.grad_clip,
                gather=gather,
            )
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
        train_time = time.perf_counter() - t0
        sums["__steps"] = float(steps)
        sums["__images"] = float(steps * local_bs)
        sums = _all_reduce_sum(sums, device)
        total_steps = max(sums.pop("__steps"), 1)
        images = sums.pop("__images")
        metrics: dict[str, float] = {
            f"train/{k}": v / total_steps for k, v in sums.items() if k != "empty_prompts"
        }
        metrics["train/empty_prompts"] = sums.get("empty_prompts", 0.0)
        metrics["train/images_per_s"] = images / max(train_time, 1e-9)
        metrics["train/lr"] = opt.param_groups[0]["lr"]
        metrics["epoch"] = epoch
        last = epoch == cfg.optim.epochs - 1
        overlay_rows: list = []
        if rank == 0:
            # Unwrapped: a DDP forward on one rank alone would wait for the others (buffer sync).
            models = {"student": _unwrap(student)}
            sums_v, count, _ = _evaluate(models, ray.train.get_dataset_shard("val"), cfg, device)
            metrics.update({f"val/{k}": v / max(count, 1) for k, v in sums_v["student"].items()})
            metrics.update(zero_shot)
            if last:
                sums_t, count_t, _ = _evaluate(
                    models, ray.train.get_dataset_shard("test"), cfg, device
                )
                metrics.update(
                    {f"test/{k}": v / max(count_t, 1) for k, v in sums_t["student"].items()}
                )
                if teacher is not None and cfg.optim.zero_shot_eval:
                    sums_z, _, _ = _evaluate(
                        {"teacher": teacher}, ray.train.get_dataset_shard("test"), cfg, device
                    )
                    metrics.update(
                        {
                            f"test/zero_shot_{k}": v / max(count_t, 1)
                            for k, v in sums_z["teacher"].items()
                        }
                    )
                if logger is not None and cfg.tracking.overlays > 0:
                    both = {"student": _unwrap(student)}
                    if teacher is not None:
                        both = {"teacher": teacher, **both}
                    _, _, overlay_rows = _evaluate(
                        both,
                        ray.train.get_dataset_shard("val"),
                        cfg,
                        device,
                        overlays=cfg.tracking.overlays,
                    )
        metrics["eval_protocol"] = cfg.optim.eval_protocol  # type: ignore[assignment]
        history.append({k: v for k, v in metrics.items()})
        with _checkpoint_dir(local_dir, epoch) as tmp:
            checkpoint = None
            if rank == 0:
                _save_checkpoint(
                    tmp,
                    student=student,
                    relation=relation,
                    opt=opt,
                    sched=sched,
                    epoch=epoch,
                    history=history,
                    cfg=cfg,
                    teacher_sha=loop_config.get("teacher_sha256"),
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(
                metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}"
            )
        if rank == 0:
            _print_epoch(epoch, cfg.optim.epochs, metrics, train_time)
            if logger is not None:
                _log_epoch(logger, metrics, epoch)
                if overlay_rows:
                    from orchestrator.visualize import overlay_grid

                    logger.log_image_file(
                        overlay_grid(overlay_rows), "overlays/val_teacher_student_gt.png"
                    )


@contextlib.contextmanager
def _checkpoint_dir(local_root: str | None, epoch: int):
    """A temp dir Ray Train uploads; in local mode a kept dir under the run (last two kept)."""
    if not local_root:
        with tempfile.TemporaryDirectory() as tmp:
            yield tmp
        return
    root = Path(local_root)
    path = root / f"checkpoint_epoch_{epoch:04d}"
    path.mkdir(parents=True, exist_ok=True)
    yield str(path)
    import shutil

    for old in sorted(root.glob("checkpoint_epoch_*"))[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "epoch"}


def _log_epoch(logger: RunLogger, metrics: dict[str, Any], epoch: int) -> None:
    logger.log_metrics(_numeric(metrics), step=epoch)


def _backfill(logger: RunLogger, history: list[dict[str, Any]]) -> None:
    """Log checkpointed epochs the previous attempt did not get to log (killed in between)."""
    if not history:
        return
    logged = set(logger.logged_steps("train/loss"))
    for entry in history:
        epoch = int(entry["epoch"])
        if epoch not in logged:
            _log_epoch(logger, entry, epoch)


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


def init_ray(address: str | None = None) -> None:
    """Connect to a cluster (RAY_ADDRESS / `address`) or start a local Ray; never both."""
    import ray

    if ray.is_initialized():
        return
    env = {}
    if not sys.stdout.isatty():  # people at a terminal want Ray Data's bars; CI logs do not
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    if env:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)  # num_cpus cannot be passed when connecting
    else:
        # The dashboard (loopback only) also serves the state API that Ray Train's placement-group
        # cleaner needs: without it, a trial stopped by Tune can leak its workers' resources.
        ray.init(
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            runtime_env={"env_vars": env} if env else None,
        )


def _storage(cfg: Config) -> tuple[str, str]:
    storage = cfg.storage.path
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
        Path(storage).mkdir(parents=True, exist_ok=True)
    name = (
        cfg.storage.name
        or f"{cfg.tracking.run_name or 'train'}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )
    return storage, name


def _run_dir(storage: str, name: str) -> Path | None:
    return None if "://" in storage else Path(storage) / name


def fit(
    cfg: Config,
    *,
    logger: RunLogger | None = None,
    quiet: bool = False,
    callbacks: list | None = None,
) -> FitResult:
    """Train one configuration on Ray Train; returns final metrics and the last checkpoint."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.pipeline import read_split

    cfg.validate()
    if not quiet:
        print("[infosam] resolved config:\n" + cfg.to_yaml(), flush=True)
    data_dir = ensure_data(cfg)
    manifest = load_manifest(data_dir)
    n_train = manifest["counts"].get(cfg.data.train_split, 0)
    path = teacher_checkpoint(cfg)
    teacher_sha = checkpoint_sha256(path) if path else None
    if path is None:
        print(
            "[infosam] WARNING: model.checkpoint is null: the teacher is randomly initialised",
            flush=True,
        )
    init_ray()
    storage, name = _storage(cfg)
    run_dir = _run_dir(storage, name)
    uri = resolve_tracking_uri(
        cfg.tracking.uri, cfg.storage.path if "://" not in cfg.storage.path else "."
    )
    owns_logger = logger is None
    if logger is None:
        run_id_file = run_dir / "mlflow_run_id" if run_dir else None
        if run_id_file is not None and run_id_file.is_file():
            logger = RunLogger(uri, run_id_file.read_text().strip())
            logger.client.update_run(logger.run_id, status="RUNNING")
        else:
            artifact_root = tracking_artifact_root(cfg.storage.path, cfg.tracking.experiment)
            logger = start_run(
                uri,
                cfg.tracking.experiment,
                cfg.tracking.run_name or name,
                artifact_root=artifact_root,
                tags={
                    "infosam.storage_name": name,
                    "infosam.eval_protocol": cfg.optim.eval_protocol,
                    "infosam.dataset": cfg.data.dataset,
                    "infosam.tuning": cfg.tuning.method,
                },
                parent_run_id=cfg.tracking.parent_run_id,
            )
            if run_id_file is not None:
                run_id_file.parent.mkdir(parents=True, exist_ok=True)
                run_id_file.write_text(logger.run_id)
            logger.log_params(flatten(cfg.to_dict()))
            logger.log_params(
                {
                    "teacher_sha256": teacher_sha or "random-init",
                    "data.manifest_shards": len(manifest["shards"]),
                    "all_gather_relations": cfg.scaling.all_gather_relations,
                }
            )
            logger.log_text(cfg.to_yaml(), "config.yaml")
            logger.log_text(
                json.dumps(
                    {k: v for k, v in manifest.items() if k != "shards"}, indent=2, default=str
                ),
                "data_manifest.json",
            )
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    size = SAM_VARIANTS[cfg.model.variant].image_size
    train_cache = None
    if cfg.speed.teacher_cache and cfg.loss.needs_teacher:
        from orchestrator.teacher_cache import TeacherCacheError, ensure_teacher_cache

        try:
            train_cache = ensure_teacher_cache(
                data_dir,
                cfg.data.train_split,
                variant=cfg.model.variant,
                checkpoint=path,
                teacher_sha256=teacher_sha,
                image_size=size,
                channel_order=cfg.data.channel_order,
                use_gpu=sc.use_gpu,
                quiet=quiet,
            )
        except TeacherCacheError as exc:
            if logger is not None and owns_logger:
                logger.finish("FAILED")
            raise ConfigError(str(exc)) from None
        if logger is not None:
            logger.set_tags({"infosam.teacher_cache": train_cache["location"]})
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
        # Small splits are decoded once and kept in the object store: every later epoch and
        # evaluation then skips parquet reading and decoding (seconds per pass on a laptop).
        rows = manifest["counts"].get(split, 0)
        row_bytes = size * size * 4
        if key == "train" and train_cache is not None:
            row_bytes += 2 * int(np.prod(train_cache["embedding_shape"]))
        if rows * row_bytes <= cfg.data.materialize_max_mb * 2**20:
            ds = ds.materialize()
        datasets[key] = ds
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "mlflow": (logger.uri, logger.run_id) if logger else None,
            "n_train": n_train,
            "teacher_sha256": teacher_sha,
            "local_checkpoint_root": str(run_dir) if sc.num_workers == 0 and run_dir else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=resources if sc.num_workers else None,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
        ),
    )
    try:
        result = trainer.fit()
    except BaseException:
        if logger is not None and owns_logger:
            logger.finish("FAILED")
        raise
    checkpoint_dir = result.checkpoint.path if result.checkpoint is not None else None
    history: list[dict[str, Any]] = []
    if checkpoint_dir and "://" not in checkpoint_dir:
        state = torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=True)
        history = json.loads(state["history"])
    if logger is not None:
        with contextlib.suppress(Exception):
            _log_curves(logger, cfg)
        if checkpoint_dir:
            logger.set_tags({"infosam.checkpoint": checkpoint_dir})
        if owns_logger:
            logger.finish("FINISHED")
    return FitResult(
        run_id=logger.run_id if logger else None,
        tracking_uri=logger.uri if logger else None,
        storage_dir=str(Path(storage) / name) if "://" not in storage else f"{storage}/{name}",
        metrics=dict(result.metrics or {}),
        checkpoint_dir=checkpoint_dir,
        history=history,
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


def evaluate_checkpoint(
    checkpoint_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    split: str = "test",
    protocol: str | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Metrics of a trained checkpoint on a dataset split, without Ray (same code as training)."""
    model, cfg, _ = load_trained(checkpoint_dir)
    return evaluate_model(
        model, cfg, data_dir, split=split, protocol=protocol, batch_size=batch_size
    )


def evaluate_model(
    model: PromptableSam,
    cfg: Config,
    data_dir: str | os.PathLike,
    *,
    split: str = "test",
    protocol: str | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Evaluate any PromptableSam with a run's evaluation settings (prompts, protocol, metrics)."""
    from orchestrator.datasets import iter_rows
    from orchestrator.pipeline import decode_batch

    if protocol:
        cfg.optim.eval_protocol = protocol
    cfg.optim.eval_batch_size = batch_size
    size = model.image_size

    class _Rows:  # the one method of a Ray DataIterator that _evaluate uses
        def iter_batches(self, batch_size: int, batch_format: str):
            chunk: list[dict] = []
            for row in iter_rows(data_dir, split):
                chunk.append(row)
                if len(chunk) == batch_size:
                    yield self._decode(chunk)
                    chunk = []
            if chunk:
                yield self._decode(chunk)

        @staticmethod
        def _decode(chunk: list[dict]) -> dict[str, np.ndarray]:
            cols = {
                k: np.asarray([r[k] for r in chunk], dtype=object)
                for k in ("id", "image", "mask", "source")
            }
            return decode_batch(cols, size, cfg.data.channel_order, keep_original_mask=True)

    sums, count, _ = _evaluate({"student": model}, _Rows(), cfg, torch.device("cpu"))
    out: dict[str, Any] = {k: v / max(count, 1) for k, v in sums["student"].items()}
    out["count"] = count
    out["protocol"] = cfg.optim.eval_protocol
    return out
