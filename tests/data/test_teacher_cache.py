"""Teacher-embedding cache: a real Ray Data batch-inference pass, refusals, and training on it."""

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from infosam.engine import LossConfig, compute_losses
from infosam.prompts import sample_prompts
from infosam.relation import RelationModule
from infosam.sam import PromptableSam, build_sam, resolve_checkpoint
from infosam.transforms import random_hflip
from orchestrator.config import BUILTIN_TEACHER, ConfigError
from orchestrator.data.reader import read_split, to_torch
from orchestrator.data.teacher_cache import (
    TeacherCacheError,
    build_teacher_cache,
    ensure_teacher_cache,
    open_teacher_cache,
)
from orchestrator.train.driver import fit
from tests.helpers import cache_key, train_config

pytestmark = pytest.mark.timeout(420)

TEACHER = resolve_checkpoint(BUILTIN_TEACHER)


def test_cached_embeddings_equal_the_teacher_and_give_the_same_losses(ray_local, dataset):
    meta = build_teacher_cache(
        dataset / "camouflage", ["train"], cache_key(), checkpoint=TEACHER, quiet=True
    )
    assert meta["splits"]["train"]["rows"] == 32 and meta["dtype"] == "bfloat16"
    assert meta["embedding_shape"] == [128, 16, 16]
    cache = open_teacher_cache(dataset / "camouflage", "train", cache_key())
    ds = read_split(dataset / "camouflage", "train", image_size=256, teacher_cache=cache)
    rows = ds.take_batch(8, batch_format="numpy")
    batch = to_torch(rows)
    cached = batch["teacher_embedding"]
    assert cached.dtype == torch.bfloat16 and cached.shape == (8, 128, 16, 16)

    teacher = PromptableSam(build_sam("tiny", TEACHER)).eval().requires_grad_(False)
    with torch.no_grad():
        direct = teacher.encode(batch["image"], batch["input_size"])
    # Only bf16 storage rounding separates them (8 mantissa bits: <= 2^-8 relative).
    torch.testing.assert_close(cached.float(), direct, rtol=2**-8, atol=1e-3)

    prompts = sample_prompts(batch["mask"], "box", generator=torch.Generator().manual_seed(0))
    losses = []
    for emb in (None, cached):
        torch.manual_seed(0)
        student = PromptableSam(build_sam("tiny", TEACHER))
        torch.manual_seed(1)
        relation = RelationModule(128)
        _, named, _ = compute_losses(
            student,
            batch["image"],
            batch["mask"],
            prompts,
            LossConfig(),
            teacher=teacher,
            relation=relation,
            input_sizes=batch["input_size"],
            teacher_embeddings=emb,
        )
        losses.append({k: float(v.detach()) for k, v in named.items()})
    for key in losses[0]:
        assert losses[1][key] == pytest.approx(losses[0][key], rel=2e-2, abs=2e-3), key


def test_cache_is_refused_when_it_was_computed_from_something_else(ray_local, dataset):
    root = dataset / "camouflage"
    build_teacher_cache(root, ["train"], cache_key(), checkpoint=TEACHER, quiet=True)
    open_teacher_cache(root, "train", cache_key())  # valid as built
    with pytest.raises(TeacherCacheError, match="no teacher cache"):
        open_teacher_cache(root, "train", cache_key(teacher_sha256="0" * 64))
    with pytest.raises(TeacherCacheError, match="no split 'val'"):
        open_teacher_cache(root, "val", cache_key())
    (cache_json,) = root.glob("teacher_cache/*/cache.json")
    meta = json.loads(cache_json.read_text())
    # Same folder, other teacher recorded inside: refused, naming both hashes' key.
    tampered = {**meta, "teacher_sha256": "f" * 64}
    cache_json.write_text(json.dumps(tampered))
    with pytest.raises(TeacherCacheError, match="teacher_sha256"):
        open_teacher_cache(root, "train", cache_key())
    cache_json.write_text(json.dumps(meta))
    # The dataset re-ingested (a shard's checksum changed): the cache no longer describes it.
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    next(s for s in manifest["shards"] if s["split"] == "train")["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(TeacherCacheError, match="other shards"):
        open_teacher_cache(root, "train", cache_key())
    with pytest.raises(TeacherCacheError, match="random teacher"):
        ensure_teacher_cache(root, "train", None, checkpoint=None)


def test_config_refuses_cache_with_augmentation_and_bf16_teacher_without_bf16(tmp_path):
    with pytest.raises(ConfigError, match=r"data.augment"):
        train_config(tmp_path, tmp_path, "speed.teacher_cache=true", "data.augment=hflip")
    with pytest.raises(ConfigError, match=r"optim.precision=bf16"):
        train_config(tmp_path, tmp_path, "speed.teacher_bf16=true")
    with pytest.raises(ConfigError, match=r"speed.attention"):
        train_config(tmp_path, tmp_path, "speed.attention=fast")


def test_training_streams_the_cache_and_reuses_it(ray_local, tmp_path, dataset, monkeypatch):
    cfg = train_config(
        tmp_path,
        dataset,
        "scaling.num_workers=0",
        "optim.epochs=1",
        "speed.teacher_cache=true",
        "speed.attention=folded",
        "speed.checkpointing=true",
        "tracking.overlays=0",
    )
    assert not list((dataset / "camouflage").glob("teacher_cache/*/cache.json"))
    result = fit(cfg, quiet=True)  # builds the cache first (a Ray Data pass), then trains on it
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.data.tags["infosam.teacher_cache"].startswith(str(dataset / "camouflage"))
    assert run.data.params["speed.teacher_cache"] == "True"
    assert result.history[0]["train/distillation"] != 0.0
    (cache_json,) = (dataset / "camouflage").glob("teacher_cache/*/cache.json")
    before = cache_json.read_text()
    cfg2 = train_config(
        tmp_path,
        dataset,
        "scaling.num_workers=0",
        "optim.epochs=1",
        "speed.teacher_cache=true",
        "optim.zero_shot_eval=false",
        "storage.name=again",
        "tracking.overlays=0",
    )
    # Train local mode runs the loop in this process: count frozen-teacher encoder calls.
    frozen_calls = []
    encode = PromptableSam.encode

    def counting(self, *args, **kwargs):
        if not any(p.requires_grad for p in self.parameters()):
            frozen_calls.append(1)
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(PromptableSam, "encode", counting)
    again = fit(cfg2, quiet=True)
    assert cache_json.read_text() == before  # reused, not rebuilt
    assert again.history[0]["train/distillation"] != 0.0
    assert frozen_calls == []  # the teacher encoder never ran: embeddings came from the cache
    plain = train_config(
        tmp_path,
        dataset,
        *("scaling.num_workers=0", "optim.epochs=1", "optim.zero_shot_eval=false"),
        *("storage.name=plain", "tracking.overlays=0"),
    )
    fit(plain, quiet=True)
    assert len(frozen_calls) == 32 // 4  # without the cache: once per training batch


def test_hflip_flips_only_the_valid_region():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4)
    masks = torch.zeros(2, 4, 4, dtype=torch.uint8)
    masks[:, :3, 0] = 1
    sizes = torch.tensor([[3, 2], [3, 2]])
    orig_i, orig_m = images.clone(), masks.clone()
    flipped = random_hflip(images, masks, sizes, p=1.0)
    assert flipped.all()
    assert torch.equal(images[:, :, :3, :2], orig_i[:, :, :3, :2].flip(-1))
    assert torch.equal(images[:, :, :, 2:], orig_i[:, :, :, 2:])  # padding untouched
    assert torch.equal(images[:, :, 3:], orig_i[:, :, 3:])
    assert masks[:, :3, 1].all() and not masks[:, :, 0].any()
    assert not random_hflip(images, masks, sizes, p=0.0).any()
    assert torch.equal(masks[:, :3, 1], orig_m[:, :3, 0])


def test_cli_builds_then_reports_up_to_date(ray_local, dataset, capsys):
    from orchestrator.cli import main as cli

    args = [
        "data",
        "teacher-cache",
        *("--set", f"data.root={dataset}", "--set", "data.synthesize=false"),
        *("--splits", "train", "val"),
    ]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "no teacher cache" in out and "teacher cache val: 8 images" in out
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "train: up to date (32 rows)" in out and "val: up to date (8 rows)" in out
    bad = [
        "data",
        "teacher-cache",
        "--set",
        f"data.root={dataset}",
        "--set",
        "model.checkpoint=null",
    ]
    assert cli([*bad, "--set", "data.synthesize=false"]) == 2
    assert "random teacher cannot be cached" in capsys.readouterr().err


def test_concurrent_runs_build_the_cache_once(ray_local, dataset):
    """Tune trials starting together on one dataset: one builds, the others wait and reuse."""
    import threading

    results, errors = [], []

    def start():
        try:
            results.append(
                ensure_teacher_cache(
                    dataset / "camouflage", "val", cache_key(), checkpoint=TEACHER, quiet=True
                )
            )
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 2
    assert results[0]["files"] == results[1]["files"]
    assert len(list((dataset / "camouflage").glob("teacher_cache/*/val-*"))) == 1
