#!/usr/bin/env bash
# The GPU check: one run on one CUDA GPU (< 10 minutes) fills README's GPU table.
#   bash scripts/gpu_check.sh [OUT]     (default OUT: runs/gpu_check; PY=python by default)
# 1. the GPU tests (pytest -m gpu: host-device syncs of a VQ step, CUDA encoder bf16 vs fp32, bf16/fp16 training)
# 2. tokenmill bench tokenize on the GPU (bf16 autocast, pinned non-blocking copies, decode threads)
# 3. tokenmill bench train on the GPU (NCCL, bf16 autocast)
# 4. tokenmill bench prior, the prior training and sampling on the GPU
# Every step writes its JSON into OUT; OUT/gpu_table.md holds the README rows made from them.
# GPU_CHECK_CPU=1 runs the same steps at smoke size on the CPU: it proves the script's plumbing
# (flags, JSON keys, the table) on a machine without a GPU; its numbers mean nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
PY=${PY:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0
mkdir -p "$OUT"
CPU_DRY_RUN=${GPU_CHECK_CPU:-0}
if [ "$CPU_DRY_RUN" = 1 ]; then
    echo "gpu_check: GPU_CHECK_CPU=1, a smoke-size dry run on the CPU (its numbers are not GPU numbers)" >&2
elif ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: this torch sees no CUDA device; run it on a GPU node with a CUDA build of torch" >&2
    exit 2
fi
status=0
run() {  # run NAME SECONDS CMD...: time-boxed, keeps going after a failure, remembers it
    local name=$1 limit=$2; shift 2
    echo "== $name" >&2
    local started=$SECONDS
    [ "$CPU_DRY_RUN" = 1 ] && limit=$((limit * 4))  # 2 CPU cores are no GPU: the boxes are for the GPU run
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
    echo "$name rc=$rc $((SECONDS - started))s" | tee -a "$OUT/steps.txt" >&2
    [ $rc -eq 0 ] || { status=1; tail -20 "$OUT/$name.log" >&2; }
}
if [ "$CPU_DRY_RUN" = 1 ]; then
    echo "none: GPU_CHECK_CPU=1 dry run on the CPU, not GPU numbers" > "$OUT/gpu.txt"
    tokenize_args=(--images 1000 --batch-size 256 --gpus 0 --precision bf16 --decode-threads 2)
    train_args=(--steps 20)
    prior_args=(--device cpu --steps 60 --segment 5 --vq-steps 20 --classifier-epochs 1 --per-class 5 --kv-rows 4)
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || true
    tokenize_args=(--images 50000 --batch-size 1024 --gpus 1 --precision bf16 --decode-threads 8)
    train_args=(--gpu --steps 300 --set train.precision=bf16)
    prior_args=(--device cuda)
fi
run gpu_tests 90 $PY -m pytest -m gpu tests/unit/test_gpu.py -q -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml"
run bench_tokenize 200 $PY -m jobs bench tokenize "${tokenize_args[@]}" --workdir "$OUT/tokenize-work" \
    --json "$OUT/bench_tokenize.json"
run bench_train 120 $PY -m jobs bench train "${train_args[@]}" --json "$OUT/bench_train.json"
run bench_prior 170 $PY -m jobs bench prior "${prior_args[@]}" --json "$OUT/bench_prior.json"
rm -rf "$OUT/tokenize-work"
$PY - "$OUT" <<'PY' | tee "$OUT/gpu_table.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}
def fmt(value):
    if value is None or isinstance(value, str):
        return "—" if value is None else value
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "GPU"
tok, train, prior = load("bench_tokenize"), load("bench_train"), load("bench_prior")
print(f"GPU: {gpu}")
print("| measurement | value |\n| --- | --- |")
for label, value in [
    ("tokenize `pipeline_img_s` (bf16, 32x32, N = 50k)", tok.get("pipeline_img_s")),
    ("tokenize `limit_img_s` (encoder alone on the GPU)", tok.get("limit_img_s")),
    ("tokenize `efficiency`", tok.get("efficiency")),
    ("tokenize `steady_efficiency`", tok.get("steady_efficiency")),
    ("tokenize `scale_ratio` (4N / N)", tok.get("scale_ratio")),
    ("train plain loop img/s (bf16)", train.get("plain_img_s")),
    ("train Ray Train job, 1 GPU, img/s", train.get("ray_1w_img_s")),
    ("train ratio Ray / plain", train.get("ratio")),
    ("prior training seconds (1,600 steps)", prior.get("stage_seconds", {}).get("prior")),
    ("prior `data_ratio_resident` / `data_ratio_streaming`", None if not prior else
     f"{fmt(prior.get('data_ratio_resident'))} / {fmt(prior.get('data_ratio_streaming'))}"),
    ("prior `val_bits_per_token`", prior.get("val_bits_per_token")),
    ("prior `class_accuracy`", prior.get("class_accuracy")),
    ("prior `kv_tokens_per_s` (`kv_speedup`)", None if not prior else
     f"{fmt(prior.get('kv_tokens_per_s'))} ({fmt(prior.get('kv_speedup'))})"),
]:
    print(f"| {label} | {fmt(value)} |")
PY
exit $status
