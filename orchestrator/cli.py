"""`infosam` command line: data | train | tune | benchmark | evaluate | predict | export."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from orchestrator.data.manifest import summarise
    from orchestrator.data.synthetic import DOMAINS, synthesize

    domains = args.domains or list(DOMAINS)
    manifests = synthesize(args.out, domains, seed=args.seed, scale=args.scale)
    for name, manifest in manifests.items():
        print(summarise(manifest))
        print(f"  contact sheet: {args.out}/{name}/contact_sheet.png")
    return 0


def _cmd_data_ingest(args: argparse.Namespace) -> int:
    from orchestrator.data.codec import IngestError
    from orchestrator.data.formats import ingest
    from orchestrator.data.formats.folders import parse_holdout
    from orchestrator.data.manifest import summarise

    kwargs: dict = {
        "name": args.name,
        "shard_bytes": int(args.shard_mb * (1 << 20)),
        "workers": args.workers,
    }
    if args.format == "coco":
        if len(args.rest) != 2:
            raise IngestError("--format coco takes SRC.json IMAGES_DIR OUT")
        kwargs["images_dir"], out = args.rest
        kwargs["more"] = [tuple(v) for v in args.coco_split or []]
        kwargs["categories"] = args.category
    elif len(args.rest) != 1:
        raise IngestError(f"--format {args.format} takes SRC OUT")
    else:
        out = args.rest[0]
    if args.coco_split and args.format != "coco":
        raise IngestError("--also is for --format coco (one annotation file per split)")
    if args.category and args.format != "coco":
        raise IngestError("--category is for --format coco (label images have no categories)")
    if args.format != "convlora":
        kwargs["split"] = args.split
        kwargs["holdout"] = parse_holdout(args.holdout)
    if args.format in ("folders", "labels"):
        for key in ("preset", "images", "masks", "mask_name", "image_glob"):
            kwargs[key] = getattr(args, key)
    if args.format in ("coco", "labels"):
        kwargs["min_area"] = args.min_area
    manifest = ingest(args.format, args.src, out, **kwargs)
    print(summarise(manifest))
    print(f"  written to {out}/{manifest['dataset']}/ (manifest.json lists every reject)")
    return 0


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from orchestrator.data.manifest import load_manifest, summarise

    manifest = load_manifest(args.dataset, verify=args.verify)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(summarise(manifest))
        if args.verify:
            print(f"  all {len(manifest['shards'])} shard checksums verified")
    return 0


def _cmd_data_teacher_cache(args: argparse.Namespace) -> int:
    from infosam.sam import checkpoint_sha256
    from orchestrator.cluster.ray_env import init_ray
    from orchestrator.config import ConfigError
    from orchestrator.data.synthetic import ensure_data
    from orchestrator.data.teacher_cache import (
        CacheKey,
        TeacherCacheError,
        build_teacher_cache,
        open_teacher_cache,
    )
    from orchestrator.train.models import teacher_checkpoint

    cfg = _load(args)
    data_dir = ensure_data(cfg)
    path = teacher_checkpoint(cfg)
    if path is None:
        raise ConfigError("model.checkpoint is null: a random teacher cannot be cached")
    key = CacheKey.for_config(cfg, checkpoint_sha256(path))
    splits = args.splits or [cfg.data.train_split]
    todo = []
    for split in splits:
        try:
            cache = open_teacher_cache(data_dir, split, key)
            if args.rebuild:
                todo.append(split)
            else:
                print(f"[infosam] teacher cache {split}: up to date ({cache['rows']} rows)")
        except TeacherCacheError as exc:
            print(f"[infosam] {exc}: building")
            todo.append(split)
    if todo:
        init_ray()
        build_teacher_cache(
            data_dir,
            todo,
            key,
            checkpoint=path,
            use_gpu=cfg.scaling.use_gpu or None,
            batch_size=args.batch_size,
        )
    return 0


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="make, ingest and inspect datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write the embedded synthetic domains")
    s.add_argument("out")
    s.add_argument("--domains", nargs="*", help="default: all (general camouflage roads lesions)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scale", type=float, default=1.0, help="multiply the default split sizes")
    s.set_defaults(func=_cmd_data_synth)
    _add_ingest(dsub)
    n = dsub.add_parser("inspect", help="summarise a dataset's manifest")
    n.add_argument("dataset")
    n.add_argument("--verify", action="store_true", help="check every shard's sha256")
    n.add_argument("--json", action="store_true")
    n.set_defaults(func=_cmd_data_inspect)
    tc = dsub.add_parser(
        "teacher-cache",
        help="precompute the frozen teacher's image embeddings (Ray Data batch inference)",
    )
    _add_config_args(tc)
    tc.add_argument("--splits", nargs="*", help="default: the config's data.train_split")
    tc.add_argument("--rebuild", action="store_true", help="recompute even if up to date")
    tc.add_argument("--batch-size", type=int, help="images per inference batch (16 GPU, 8 CPU)")
    tc.set_defaults(func=_cmd_data_teacher_cache)


def _add_ingest(dsub: argparse._SubParsersAction) -> None:
    """`data ingest`: every source layout's options (the formats registry names the layouts)."""
    i = dsub.add_parser("ingest", help="image/mask pairs -> parquet shards + manifest")
    i.add_argument(
        "--format",
        choices=["convlora", "folders", "coco", "labels"],  # formats.FORMATS
        required=True,
        help="binary masks: convlora, folders; instances: coco (JSON), labels (label images)",
    )
    i.add_argument("src", help="source folder, or the COCO .json file")
    i.add_argument("rest", nargs="+", metavar="[IMAGES_DIR] OUT", help="coco: IMAGES_DIR OUT")
    i.add_argument("--name", help="dataset name (default: the source folder's or file's name)")
    i.add_argument("--split", help="the split of a one-split source (default train)")
    i.add_argument(
        "--also",
        dest="coco_split",
        nargs=3,
        action="append",
        metavar=("SPLIT", "FILE.json", "IMAGES_DIR"),
        help="coco: another split's file and images (repeatable), e.g. --also val "
        "annotations/instances_val2017.json val2017",
    )
    i.add_argument(
        "--category",
        action="append",
        metavar="NAME",
        help="coco: keep only this category (repeatable); the others' annotations are skipped "
        "and listed in the manifest",
    )
    i.add_argument(
        "--preset",
        help="a benchmark's raw layout: folders: kvasir, isic2017, camo, cod10k; labels: cod10k",
    )
    i.add_argument("--images", help="images folder, relative to SRC (with --masks)")
    i.add_argument("--masks", help="masks or label-images folder, relative to SRC")
    i.add_argument("--mask-name", help="a mask's file name from its image's stem: '{stem}_gt.png'")
    i.add_argument("--image-glob", help="which files are images, e.g. '*.jpg' (default: all)")
    i.add_argument(
        "--holdout",
        action="append",
        help="SPLIT=FRACTION or SPLIT=COUNT of images moved out of a one-split source "
        "(repeatable: --holdout val=0.1 --holdout test=0.2)",
    )
    i.add_argument(
        "--min-area", type=int, default=16, help="instances below this many pixels are flagged"
    )
    i.add_argument("--shard-mb", type=float, default=64.0, help="target shard size in MiB")
    i.add_argument(
        "--workers",
        type=_at_least_one,
        help="threads decoding images and masks (default: the CPUs this process may use, at "
        "most 8; 1 below 32 images); the output is the same bytes for any number",
    )
    i.set_defaults(func=_cmd_data_ingest)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="YAML config (sections data/model/tuning/loss/optim/scaling/tracking/storage)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. --set optim.lr=1e-4 (repeatable)",
    )


def _add_resume_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a run or benchmark of the same name although its configuration changed "
        "(refused otherwise, listing the changed keys)",
    )


def _load(args: argparse.Namespace):
    from orchestrator.config import load_config

    return load_config(args.config, args.overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from orchestrator.train.driver import fit

    try:
        cfg = _load(args)
        result = fit(cfg, allow_config_change=args.allow_config_change)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from `ray job stop`: the run is KILLED
        return 130
    shown = {
        k: round(v, 4)
        for k, v in result.metrics.items()
        if k.startswith(("val/", "test/")) and isinstance(v, float)
    }
    print(f"[infosam] finished: {json.dumps(shown)}")
    print(f"[infosam] checkpoint: {result.checkpoint_dir}")
    if result.model_uri:
        print(
            f"[infosam] MLflow model: {result.model_uri} "
            f"(mlflow.pyfunc.load_model('{result.model_uri}'); docs/using-the-model.md)"
        )
    from orchestrator.tracking.runs import view_hint

    print(f"[infosam] MLflow: {view_hint(result.tracking_uri, result.run_id)}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from infosam.sam import PromptableSam
    from orchestrator.config import ConfigError, load_config
    from orchestrator.train.evaluation import evaluate_checkpoint, evaluate_model

    if args.reference:
        from infosam.reference import load_reference_student

        sam, tuning = load_reference_student(args.reference, args.variant)
        cfg = load_config(args.config, [f"model.variant={args.variant}", *args.overrides])
        metrics = evaluate_model(
            PromptableSam(sam), cfg, args.data, split=args.split, protocol=args.protocol
        )
        metrics["tuning"] = tuning.method
    elif args.checkpoint:
        metrics = evaluate_checkpoint(
            args.checkpoint, args.data, split=args.split, protocol=args.protocol
        )
    else:
        raise ConfigError("give --checkpoint DIR (a training checkpoint) or --reference FILE")
    print(json.dumps(metrics, indent=2))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _cmd_predict(args: argparse.Namespace) -> int:
    from orchestrator.data.codec import IngestError
    from orchestrator.predict import list_images, load_model, parse_prompts, predict_files

    try:
        if bool(args.images) == bool(args.data):
            raise ValueError(
                "give --images FILE... or --data DATASET_OR_FOLDER (with prompts for image files)"
            )
        if args.data and _is_dataset(args.data):
            return _predict_dataset(args)
        images = args.images or list_images(args.data)
        prompts = parse_prompts(args.box, args.point, args.prompts, images)
        if args.ray:
            return _predict_folder_on_ray(args, images, prompts)
        model, _ = load_model(args.checkpoint, args.variant, args.device)
        written = predict_files(
            model, images, prompts, args.out, batch_size=args.batch_size, device=args.device
        )
    except (ValueError, FileNotFoundError, IngestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for w in written:
        print(f"{w['image']} -> {w['mask']} (foreground {w['foreground_fraction']:.1%})")
    return 0


def _is_dataset(location: str) -> bool:
    """An ingested dataset (it has a manifest.json), not a folder of image files."""
    import pyarrow.fs as pafs

    from orchestrator.storage import filesystem, join

    fs, path = filesystem(join(location, "manifest.json"))
    return fs.get_file_info(path).type == pafs.FileType.File


def _predict_dataset(args: argparse.Namespace) -> int:
    """`predict --data DATASET`: every sample prompted from its own mask (the run's evaluation
    prompts), in this process or with --ray on a pool of actors."""
    from orchestrator.predict import load_model, predict_dataset
    from orchestrator.storage import local_copy

    if args.ray:
        return _predict_data_on_ray(args)
    cfg, checkpoint = None, local_copy(args.checkpoint)  # s3://...: copied once
    if checkpoint.is_dir():
        from orchestrator.train.checkpoints import load_trained

        model, cfg, _ = load_trained(checkpoint, args.device)
    else:
        model, _ = load_model(checkpoint, args.variant, args.device)
    done = predict_dataset(
        model,
        args.data,
        args.split,
        args.out,
        cfg=cfg,
        batch_size=args.batch_size,
        device=args.device,
    )
    images = len({d["image_id"] for d in done})
    iou = sum(d["iou"] for d in done) / max(len(done), 1)
    print(
        f"{len(done)} samples in {images} images of split {args.split!r}: mean IoU "
        f"{iou:.4f} over samples; overlays, masks and predictions.json in {args.out}"
    )
    return 0


def _predict_data_on_ray(args: argparse.Namespace) -> int:
    """`predict --data --ray`: the split on Ray Data, a results parquet per shard, resumable."""
    from orchestrator.batch_predict import predict_split
    from orchestrator.cluster.ray_env import init_ray
    from orchestrator.config import Config
    from orchestrator.storage import local_copy

    checkpoint = local_copy(args.checkpoint)  # s3://...: copied once, then shared by the actors
    cfg = Config()
    if checkpoint.is_dir():
        from orchestrator.train.checkpoints import load_state

        cfg = Config.from_dict(json.loads(load_state(checkpoint)["config"]))
    elif args.variant:
        cfg = cfg.with_values({"model.variant": args.variant, "model.checkpoint": str(checkpoint)})
    init_ray()
    summary = predict_split(
        str(checkpoint),
        args.data,
        args.split,
        args.out,
        cfg=cfg,
        variant=args.variant,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        png=args.png,
    )
    print(
        f"{summary['samples']} samples of split {args.split!r} in {summary['shards']} shards: "
        f"mean IoU {summary['mean_iou']:.4f}; <shard>.predictions.parquet and summary.json "
        f"in {args.out}"
    )
    return 0


def _predict_folder_on_ray(args: argparse.Namespace, images: list[str], prompts: dict) -> int:
    """`predict --data FOLDER --ray` (or --images ... --ray): parts of files on a pool of model
    actors, a results parquet per part, resumable."""
    from orchestrator.batch_predict import predict_folder
    from orchestrator.cluster.ray_env import init_ray
    from orchestrator.storage import local_copy

    checkpoint = local_copy(args.checkpoint)
    init_ray()
    summary = predict_folder(
        str(checkpoint),
        images,
        prompts,
        args.out,
        variant=args.variant,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        batch_size=args.batch_size,
        images_per_part=args.images_per_part,
        png=args.png,
    )
    print(
        f"{summary['masks']} masks of {summary['images']} images in {summary['parts']} part{'s' * (summary['parts'] != 1)}: "
        f"mean predicted IoU {summary['mean_score']:.4f}; part-*.predictions.parquet"
        f"{', mask and overlay PNGs' if args.png else ''} and summary.json in {args.out}"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from orchestrator.predict import export_checkpoint, export_onnx

    if not args.out and not args.onnx:
        print("error: give --out FILE (weights) and/or --onnx FILE (decoder)", file=sys.stderr)
        return 2
    if args.out:
        kind, why = export_checkpoint(args.checkpoint, args.out)
        print(f"[infosam] exported {kind}: {why}")
    if args.onnx:
        print(f"[infosam] exported ONNX decoder: {export_onnx(args.checkpoint, args.onnx)}")
    return 0


def _cmd_cluster_check(args: argparse.Namespace) -> int:
    from orchestrator.cluster.check import check_cluster_config, load_cluster_yaml

    problems = check_cluster_config(load_cluster_yaml(args.path))
    for p in problems:
        print(f"- {p}", file=sys.stderr)
    print(f"{args.path}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from orchestrator.benchmark.run import main as benchmark_main

    argv = (["--config", args.config] if args.config else []) + [
        f"--set={o}" for o in args.overrides
    ]
    return benchmark_main(argv + (["--allow-config-change"] if args.allow_config_change else []))


def _cmd_tune(args: argparse.Namespace) -> int:
    from orchestrator.sweep import load_sweep, run_sweep
    from orchestrator.tracking.runs import view_hint

    try:
        tcfg, base = load_sweep(args.config, args.overrides)
        result = run_sweep(tcfg, base)
    except KeyboardInterrupt:  # the sweep's runs are closed as KILLED
        return 130
    print(f"[tune] best config: {result.best_yaml}")
    print(f"[tune] MLflow: {view_hint(result.tracking_uri, result.parent_run_id)}")
    return 0


def _cmd_tracking_serve(args: argparse.Namespace) -> int:
    from orchestrator.tracking.server import serve

    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    """Every verb, one helper per group: data, training runs, using the model, servers."""
    parser = argparse.ArgumentParser(prog="infosam", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)
    _add_runs(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_tracking(sub)
    _add_cluster(sub)
    return parser


def _add_runs(sub: argparse._SubParsersAction) -> None:
    """train, tune, benchmark: a config file plus --set overrides."""
    t = sub.add_parser("train", help="fine-tune on Ray Train, tracked in MLflow")
    _add_config_args(t)
    _add_resume_flag(t)
    t.set_defaults(func=_cmd_train)
    tu = sub.add_parser(
        "tune", help="Ray Tune sweep (tune: section + base config), every trial in MLflow"
    )
    _add_config_args(tu)
    tu.set_defaults(func=_cmd_tune)
    b = sub.add_parser("benchmark", help="the method x dataset x seed comparison (default: demo)")
    _add_config_args(b)
    _add_resume_flag(b)
    b.set_defaults(func=_cmd_benchmark)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="metrics of a training checkpoint on a dataset split")
    e.add_argument("--checkpoint", help="a checkpoint_epoch_* directory of a run")
    e.add_argument(
        "--reference", help="an InfoSAM reference-release student (.pth), see infosam/reference.py"
    )
    e.add_argument("--variant", default="vit_b", help="SAM variant of --reference (default vit_b)")
    e.add_argument("--data", required=True, help="a dataset folder (with manifest.json)")
    e.add_argument("--split", default="test")
    e.add_argument("--protocol", choices=["paper", "clean"], help="default: the run's protocol")
    _add_config_args(e)
    e.set_defaults(func=_cmd_evaluate)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    """predict and export: using a fine-tuned model."""
    pr = sub.add_parser(
        "predict", help="masks + overlays at original resolution: image files, or a dataset split"
    )
    pr.add_argument(
        "--checkpoint", required=True, help="training checkpoint dir, infosam export, or SAM .pth"
    )
    pr.add_argument("--variant", help="needed for plain SAM weights")
    pr.add_argument("--images", nargs="+", help="image files (give a prompt for them)")
    pr.add_argument(
        "--data",
        help="a dataset (manifest.json): every sample (instance) prompted from its own mask; or "
        "a folder of image files, local or s3:// (give a prompt for them)",
    )
    pr.add_argument("--split", default="test", help="with --data (default test)")
    pr.add_argument("--box", help="x0,y0,x1,y1 in original image pixels")
    pr.add_argument("--point", action="append", help="x,y[,label] (repeatable; label 1 fg, 0 bg)")
    pr.add_argument(
        "--prompts", help='JSON: {"img.png": {"box": [...], "points": [[x, y, label]]}}'
    )
    pr.add_argument("--out", required=True)
    pr.add_argument("--device", default="cuda" if _cuda() else "cpu")
    pr.add_argument("--batch-size", type=int, default=8)
    pr.add_argument(
        "--ray",
        action="store_true",
        help="on Ray Data, a pool of model actors, one results parquet per dataset shard or "
        "part of --images-per-part files (resumable: finished ones are skipped)",
    )
    pr.add_argument(
        "--png",
        action="store_true",
        help="with --ray: also the mask, overlay (and instance) PNGs the local path writes",
    )
    pr.add_argument("--images-per-part", type=int, default=16, help="with --ray on image files")
    pr.add_argument("--actors", type=int, help="with --ray: at most this many (default: all)")
    pr.add_argument("--cpus-per-actor", type=float, default=1.0)
    pr.add_argument("--gpus-per-actor", type=float, default=0.0)
    pr.set_defaults(func=_cmd_predict)
    ex = sub.add_parser(
        "export",
        help="weights plain segment-anything loads (LoRA merged), or a self-contained file",
    )
    ex.add_argument("--checkpoint", required=True, help="a checkpoint_epoch_* directory of a run")
    ex.add_argument("--out", help="the weights file")
    ex.add_argument(
        "--onnx",
        help="also/only: the prompt encoder + mask decoder as ONNX (interactive tools; the "
        "image encoder stays in PyTorch)",
    )
    ex.set_defaults(func=_cmd_export)


def _add_tracking(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("tracking", help="the team's MLflow server (PostgreSQL, basic auth)")
    trsub = tr.add_subparsers(dest="tracking_command", required=True)
    sv = trsub.add_parser(
        "serve",
        help="migrate the database once, then run `mlflow server` in the foreground",
        description="Database URI: --backend-store-uri, else $INFOSAM_TRACKING_DB_URI, else the "
        "file named by $INFOSAM_TRACKING_DB_URI_FILE. With --auth: the admin password from "
        "$MLFLOW_AUTH_ADMIN_PASSWORD (or ..._FILE, >= 12 characters, no default) and "
        "$MLFLOW_FLASK_SERVER_SECRET_KEY (or ..._FILE).",
    )
    sv.add_argument("--backend-store-uri", help="postgresql://user:pw@host:5432/mlflow, sqlite")
    sv.add_argument("--artifacts-destination", required=True, help="s3://bucket/prefix or a dir")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    sv.add_argument("--port", type=int, default=5000)
    sv.add_argument("--workers", type=int, help="server workers (default 4; 1 for SQLite)")
    sv.add_argument("--auth", action="store_true", help="MLflow's basic-auth app")
    sv.add_argument("--auth-db-uri", help="user table (default: the tracking database)")
    sv.set_defaults(func=_cmd_tracking_serve)


def _add_cluster(sub: argparse._SubParsersAction) -> None:
    cl = sub.add_parser("cluster", help="cluster-launcher helpers")
    clsub = cl.add_subparsers(dest="cluster_command", required=True)
    cc = clsub.add_parser(
        "check", help="offline check of a cluster.yaml (Ray schema + project rules)"
    )
    cc.add_argument("path", nargs="?", default="cluster.yaml")
    cc.set_defaults(func=_cmd_cluster_check)


def main(argv: list[str] | None = None) -> int:
    """Run one command: its exit code; the project's own errors as one `error: ...` line on
    stderr and exit 2, never a traceback."""
    from orchestrator.errors import reported

    args = build_parser().parse_args(argv)
    return reported(lambda: int(args.func(args) or 0))


if __name__ == "__main__":
    sys.exit(main())
