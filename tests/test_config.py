"""Config rules a user meets before anything runs."""

import re

import pytest

from orchestrator.config import Config, ConfigError, load_config
from tests.helpers import ROOT


def test_elastic_range_must_keep_the_global_batch_evenly_shared():
    cfg = load_config(None, ["scaling.num_workers=[1, 2]", "optim.batch_size=4"])
    assert cfg.scaling.elastic and (cfg.scaling.min_workers, cfg.scaling.max_workers) == (1, 2)
    assert not load_config(None, ["scaling.num_workers=2"]).scaling.elastic
    # 8 images over 3 workers would change the batch statistic InfoSAM is computed on.
    with pytest.raises(ConfigError, match=r"not over \[3\]"):
        load_config(None, ["scaling.num_workers=[2, 4]", "optim.batch_size=8"])
    for bad in ("[2, 1]", "[0, 2]", "[1, 2, 3]"):
        with pytest.raises(ConfigError, match=r"\[min, max\]"):
            load_config(None, [f"scaling.num_workers={bad}"])


# A value each key cannot take (the table test below fails when a new field has none).
BAD_VALUES = {
    "seed": -1,
    "data.prompt": "boxes",
    "data.eval_prompt": "mixed",
    "data.channel_order": "rbg",
    "data.augment": "flip",
    "data.decode_on": "tpu",
    "data.synth_scale": 0,
    "data.synth_seed": -3,
    "data.synth_counts": {"test": 0},
    "data.retention": ["../elsewhere"],
    "data.box_jitter": -1,
    "data.num_positive_points": -1,
    "data.num_negative_points": -2,
    "data.eval_box_jitter": -0.5,
    "data.shuffle_buffer": -1,
    "data.materialize_max_mb": -1,
    "model.family": "sam3",
    "model.variant": "vit_x",
    "tuning.method": "lorax",
    "tuning.lora_rank": 0,
    "tuning.lora_alpha": 0,
    "tuning.lora_dropout": 1.5,
    "tuning.adapter_ratio": 0,
    "tuning.adapter_blocks": [-1],
    "loss.weight_compression": -1,
    "loss.weight_distillation": -0.5,
    "loss.infosam_scale": -1,
    "loss.distillation_weight": -1,
    "loss.kd_temperature": 0,
    "optim.optimizer": "sgd",
    "optim.lr": -1e-4,
    "optim.weight_decay": -0.1,
    "optim.schedule": "linear",
    "optim.min_lr_ratio": 2,
    "optim.epochs": 0,
    "optim.batch_size": 0,
    "optim.precision": "fp16",
    "optim.grad_clip": 0,
    "optim.eval_protocol": "strict",
    "optim.metrics": ["iou", "ioux"],
    "optim.eval_batch_size": 0,
    "scaling.num_workers": -2,
    "scaling.cpus_per_worker": -1,
    "scaling.gpus_per_worker": -1,
    "scaling.max_failures": -2,
    "scaling.max_preemption_failures": -2,
    "scaling.preemption_check_steps": -1,
    "scaling.elastic_resize_interval_s": 0,
    "scaling.worker_resources": {"slot": -1},
    "scaling.data_cpus": 0,
    "speed.attention": "flash",
    "tracking.overlays": -1,
}
# Fields with no range: free text, paths, switches, ids.
NO_RANGE = {
    "data.root",
    "data.dataset",
    "data.train_split",
    "data.val_split",
    "data.test_split",
    "data.synthesize",
    "model.checkpoint",
    "tuning.train_decoder",
    "loss.segmentation",  # checked by LossConfig itself
    "loss.legacy_bce",
    "loss.infosam",
    "loss.distillation",  # checked by LossConfig itself
    "optim.zero_shot_eval",
    "scaling.use_gpu",
    "scaling.all_gather_relations",
    "speed.checkpointing",
    "speed.compile",
    "speed.teacher_cache",
    "speed.teacher_bf16",
    "tracking.uri",
    "tracking.experiment",
    "tracking.run_name",
    "tracking.parent_run_id",
    "tracking.log_model",  # bool | None: the type check refuses anything else
    "storage.path",
    "storage.name",
}


def test_every_value_is_range_checked_before_anything_runs():
    """Table-driven over every config field: a value that cannot work is a ConfigError naming
    the key, the value and what is allowed, raised by load_config (before Ray or data)."""
    from orchestrator.config import RANGES, Config, flatten

    optional = {"tuning.adapter_blocks", "optim.grad_clip"}  # None by default
    maps = {"data.synth_counts", "scaling.worker_resources"}  # {} by default: flatten drops them
    fields = set(flatten(Config().to_dict())) | optional | maps
    assert fields == set(BAD_VALUES) | NO_RANGE, "a new config field needs a range or an exemption"
    assert set(RANGES) == set(BAD_VALUES)
    import yaml

    for key, bad in BAD_VALUES.items():
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"{key}={yaml.safe_dump(bad, default_flow_style=True).strip()}"])
        assert key in str(info.value), (key, str(info.value))
        assert "must be" in str(info.value) or "choose" in str(info.value), str(info.value)
    load_config(None, [])  # the defaults are all in range


def test_a_resume_compares_the_values_that_shape_the_result():
    from orchestrator.config import config_changes, result_view, resume_refusal

    old = load_config(None, ["optim.lr=1e-4"])
    recorded = result_view(old)
    assert config_changes(recorded, result_view(old)) == []  # unchanged: resumes as before
    assert config_changes(None, result_view(old)) == []  # nothing recorded (an older run)
    # where it runs and how fast: not the result's
    moved = load_config(None, ["optim.lr=1e-4", "scaling.num_workers=0", "tracking.overlays=0"])
    assert config_changes(recorded, result_view(moved)) == []
    new = load_config(None, ["optim.lr=3e-4", "loss.weight_distillation=5"])
    changes = config_changes(recorded, result_view(new))
    assert changes == ["loss.weight_distillation: 0.5 -> 5.0", "optim.lr: 0.0001 -> 0.0003"]
    message = str(resume_refusal("run r", changes))
    assert "run r" in message and "optim.lr: 0.0001 -> 0.0003" in message
    assert "--allow-config-change" in message
    # a zero-shot result does not depend on training values
    assert config_changes(result_view(old, zero_shot=True), result_view(new, zero_shot=True)) == []


def test_a_sam2_config_is_checked_against_its_family():
    ok = Config().with_values({"model.family": "sam2", "model.checkpoint": None})
    assert (ok.model.image_size, ok.model.embedding_dim, ok.model.square_inputs) == (256, 128, True)
    big = ok.with_values({"model.variant": "hiera_b+"})
    assert (big.model.image_size, big.model.embedding_dim) == (1024, 256)
    # the family switch alone takes the embedded tiny SAM 2.1 teacher (offline)
    assert Config().with_values({"model.family": "sam2"}).model.checkpoint == (
        "builtin:tiny_sam2_teacher"
    )
    with pytest.raises(ConfigError, match=re.escape("embedded sam2 'tiny' teacher")):
        Config().with_values({"model.family": "sam2", "model.variant": "hiera_b+"})
    with pytest.raises(ConfigError, match=re.escape("embedded sam2 'tiny' teacher")):
        Config().with_values({"model.checkpoint": "builtin:tiny_sam2_teacher"})
    for overrides, words in [
        ({"model.variant": "vit_b"}, "model.variant='vit_b' is not a sam2 variant"),
        ({"speed.attention": "flex"}, "Hiera attention"),
        ({"data.decode_on": "gpu"}, "use data.decode_on=cpu"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            ok.with_values(overrides)
    with pytest.raises(ConfigError, match="is not a sam variant"):
        Config().with_values({"model.variant": "hiera_t"})


@pytest.mark.parametrize(
    "path",
    [
        *sorted((ROOT / "experiments" / "configs").glob("*.yaml")),
        ROOT / "orchestrator" / "benchmark" / "demo.yaml",
    ],
    ids=lambda p: p.name,
)
def test_every_shipped_config_and_each_of_its_cells_is_valid(path):
    """A config a user runs as documented loads, and every cell of a benchmark config is a
    valid training config (a family switch, a method or a dataset override that breaks a cell
    would otherwise surface minutes into a run)."""
    import yaml

    from orchestrator.benchmark.config import cell_config, load_benchmark

    sections = yaml.safe_load(path.read_text())
    if "tune" in sections:
        from orchestrator.sweep import load_sweep

        load_sweep(path, [])
        return
    if "benchmark" not in sections:
        load_config(path, [])
        return
    bench, base = load_benchmark(path)
    table = bench.method_table()
    for dataset in bench.datasets:
        for method in bench.methods:
            cfg = cell_config(base, method, dataset, bench.seeds[0], methods=table)
            assert cfg.model.family == base.model.family
    if path.name == "demo_sam2.yaml":  # the offline SAM 2.1 demo: the embedded SAM 2.1 teacher
        assert (base.model.family, base.model.checkpoint) == ("sam2", "builtin:tiny_sam2_teacher")
