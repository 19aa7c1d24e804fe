"""The paper's comparison: methods x datasets x seeds, each cell a Ray Train run.

`methods` names the matrix's rows, `config` reads a benchmark YAML, `run` is the driver, `cells`
runs cells as Ray tasks, `report` writes results.md and figures, `stats` the paired intervals,
`retention` what each method keeps of the teacher (its table, differences, trade-off picture).
"""
