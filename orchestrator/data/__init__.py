"""Files -> parquet shards + a manifest -> decoded Ray Data batches. No MLflow, no Ray Train.

`codec` decodes within one budget; `writer` is the only code that writes a dataset folder;
`formats/` turns a source layout into writer calls; `manifest` reads what was written;
`reader` streams it through Ray Data; `teacher_cache` stores the frozen teacher's embeddings
next to the shards; `synthetic` makes the embedded default domains.
"""
