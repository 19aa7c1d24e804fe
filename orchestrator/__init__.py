"""Ray, MLflow and files around the `infosam` method: the pipeline's stages, one package each.

Read in this order: `cli` -> `benchmark.run` -> `train.driver` -> `train.worker` ->
`infosam.engine`. Dependencies point one way (asserted by tests/test_imports.py):
`infosam` <- shared modules <- `data` <- `train` <- `benchmark`, `sweep`, `predict` <- `cli`.

Shared modules:
    config     typed run configuration, every value's range, what a resume compares
    storage    local and remote paths, atomic writes, folder swaps, locks, safe names
    plots      every figure, one off-screen matplotlib set-up
    objective  a sweep's declared multi-metric objective and its non-dominated trials
    tracking/  MLflow runs by id, searches, the early server check (`runs`); the team's
               PostgreSQL + basic-auth server (`server`)
    cluster/   Ray start-up and concurrency caps (`ray_env`); offline cluster.yaml checks (`check`)
Stages:
    data/      files -> parquet shards -> Ray Data batches: `codec` (decoding within one budget),
               `writer`, `manifest`, `formats/` (one module per source layout, the registry),
               `synthetic`, `reader` (Ray Data), `device_decode` (decoding on the GPU),
               `teacher_cache`
    train/     one Ray Train run, tracked: `driver` (fit), `worker` (the loop's phases),
               `inputs`, `models`, `checkpoints`, `evaluation`, `epoch_log`
    benchmark/ the methods x datasets x seeds matrix: `methods`, `config`, `run`, `cells`,
               `report`, `stats`, `retention` (what each method keeps of the teacher)
    sweep      Ray Tune over loss weights and PEFT capacity (the CLI verb is `tune`)
    predict    use a fine-tuned model: predict, evaluate checkpoints, export
    errors     the project's errors as one `error:` line and exit 2
    cli        the `infosam` command
"""
