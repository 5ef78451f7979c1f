#!/usr/bin/env bash
# The GPU check: one run on one CUDA GPU (< 10 minutes) fills README's GPU table.
#   bash scripts/gpu_check.sh [OUT]     (default OUT: runs/gpu_check; PY=python by default)
# 1. the GPU tests (pytest -m gpu: host-device syncs of a VQ step, CUDA encoder bf16 vs fp32, bf16/fp16 training)
# 2. tokenmill bench tokenize on the GPU (bf16 autocast, pinned non-blocking copies, decode threads)
# 3. tokenmill bench train on the GPU (NCCL, bf16 autocast)
# 4. tokenmill bench prior on the GPU, when that benchmark exists here
# Every step writes its JSON into OUT; OUT/gpu_table.md holds the README rows made from them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
PY=${PY:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0
mkdir -p "$OUT"
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: this torch sees no CUDA device; run it on a GPU node with a CUDA build of torch" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || true
status=0
run() {  # run NAME SECONDS CMD...: time-boxed, keeps going after a failure, remembers it
    local name=$1 limit=$2; shift 2
    echo "== $name" >&2
    local started=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
    echo "$name rc=$rc $((SECONDS - started))s" | tee -a "$OUT/steps.txt" >&2
    [ $rc -eq 0 ] || { status=1; tail -20 "$OUT/$name.log" >&2; }
}
run gpu_tests 150 $PY -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml"
run bench_tokenize 200 $PY -m jobs bench tokenize --images 50000 --batch-size 1024 --gpus 1 --precision bf16 \
    --decode-threads 8 --workdir "$OUT/tokenize-work" --json "$OUT/bench_tokenize.json"
run bench_train 150 $PY -m jobs bench train --gpu --steps 300 --set train.precision=bf16 --json "$OUT/bench_train.json"
if $PY -m jobs bench prior --help > "$OUT/bench_prior_help.txt" 2>&1; then
    device_flag=()
    grep -q -- "--device" "$OUT/bench_prior_help.txt" && device_flag=(--device cuda)
    grep -q -- "--gpu\b" "$OUT/bench_prior_help.txt" && device_flag=(--gpu)
    run bench_prior 90 $PY -m jobs bench prior "${device_flag[@]}" --json "$OUT/bench_prior.json"
else
    echo "bench_prior skipped: no \`tokenmill bench prior\` here" | tee -a "$OUT/steps.txt" >&2
fi
rm -rf "$OUT/tokenize-work"
$PY - "$OUT" <<'PY' | tee "$OUT/gpu_table.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}
def fmt(value):
    return "—" if value is None else (f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}")
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
    *[(f"prior `{k}`", v) for k, v in prior.items() if isinstance(v, (int, float)) and not isinstance(v, bool)][:6],
]:
    print(f"| {label} | {fmt(value)} |")
PY
exit $status
