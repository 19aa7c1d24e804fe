#!/usr/bin/env bash
# The prepared GPU measurement for the speed work (one run, inside a device budget of minutes):
# attention kernels, the InfoSAM step under each switch (ratios against the reference in the same
# process), the teacher-cache encoder pass, then the GPU equivalence tests. JSON lines go to
# ${OUT:-gpu_out}/ as they are produced, so a timeout keeps everything measured before it.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${ATTN_S:-80}" != 0 ]; then  # 0 skips a part (timeout 0 would mean no limit)
  timeout "${ATTN_S:-80}" python3 experiments/bench_attention.py --variant vit_b --batch-size 16 \
    2>"$OUT/attention.err" | tee "$OUT/attention_vit_b.jsonl"
fi
timeout "${STEP_S:-270}" python3 experiments/bench_step.py --variant vit_b --batch-size 4 \
  --steps 6 --warmup 2 --encode 16 \
  --configs "${CONFIGS:-bf16_folded_cache_ckpt,bf16_folded_cache_compile@16,bf16_folded_cache_compile@32,bf16_folded_cache_ckpt_compile,bf16_flex_cache_compile@16}" \
  2>"$OUT/bench.err" | grep '^{' | tee "$OUT/bench_vit_b.jsonl"
timeout "${TEST_S:-60}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/infosam/test_speed.py \
  tests/data/test_device_decode_gpu.py \
  2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
