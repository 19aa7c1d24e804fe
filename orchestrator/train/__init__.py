"""One Ray Train run, tracked in MLflow.

`driver.fit` is the entry point (phases: resolve the run, prepare inputs, open the MLflow run,
make the trainer, collect the result); `worker.train_loop_per_worker` runs on each Train worker;
`inputs` prepares what every worker reads; `models`, `checkpoints`, `evaluation` and
`epoch_log` are the pieces both sides share.
"""
