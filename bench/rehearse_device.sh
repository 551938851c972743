#!/usr/bin/env bash
# Rehearse the GPU proof's device command (bench/results/README.md, "The GPU proof", step 2) on this CPU
# with the device image's Python and package versions, so that a session which draws a GPU does not spend
# its 15-minute lease discovering an incompatibility. It runs:
#   1. a venv of Python 3.12 holding only packages the device image holds (torch 2.11.0, torchvision 0.26.0,
#      numpy 2.5.2 as /work/.library/device/KINDS.md lists them; the rest at the registry's versions) and
#      none of those it lacks (gpu_proof.DEVICE_LACKS, and medmnist's CLI dependency `fire`): checked;
#   2. `gpu_proof.py pack` into a copy of the working tree (tracked and untracked-but-not-ignored files:
#      what the device tool copies);
#   3. the device command as written there, with `smoke` (tiny preset, CPU, + collect) in place of `all`;
#   4. what smoke leaves out: `evaluate` with TSTR (fair protocol) and a compiled `small` training step.
# Heavy (the first time a 3 GB CUDA build of torch is downloaded; then ~5 min on 2 cores): a bench, not a test.
# Usage: bench/rehearse_device.sh [WORK]   (default /tmp/device-rehearsal; PY312=/path/to/python3.12)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mkdir -p "${1:-/tmp/device-rehearsal}" && cd "${1:-/tmp/device-rehearsal}" && pwd)
MEDMNIST=${MEDMNIST_ROOT:-$REPO/../shared/datasets/medmnist}
IMAGE_PKGS=(torch==2.11.0 torchvision==0.26.0 numpy==2.5.2 pillow scipy pandas pyarrow matplotlib fsspec einops
            typer rich pyyaml scikit-learn scikit-image tqdm requests psutil)

find_py312() {
  local c
  for c in "${PY312:-}" python3.12 "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12; do
    if [ -n "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$c"; return
    fi
  done
  echo "no Python 3.12 found (the device image's Python): set PY312=/path/to/python3.12" >&2
  exit 2
}

VENV=$WORK/venv
if [ ! -x "$VENV/bin/python3" ]; then
  PY312=$(find_py312)  # its own assignment, so that set -e stops here when none is found
  "$PY312" -m venv "$VENV.tmp" && "$VENV.tmp/bin/pip" install -q "${IMAGE_PKGS[@]}"
  rm -rf "$VENV" && mv "$VENV.tmp" "$VENV"  # a half-built venv is never taken for a finished one
fi
# the venv was moved after it was built: call its interpreter by path, never its scripts' shebangs
PY=$VENV/bin/python3

echo "== copy of the working tree + pack"
rm -rf "$WORK/repo" "$WORK/site" "$WORK/proof" "$WORK/out"
mkdir -p "$WORK/repo" "$WORK/out"
(cd "$REPO" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | (cd "$WORK/repo" && tar -xf -)
(cd "$REPO" && "${PYTHON:-python3}" bench/gpu_proof.py pack --out "$WORK/repo/.device" --medmnist-root "$MEDMNIST") | tail -1

cd "$WORK/repo"
export OUT=$WORK/out
echo "== the device command (smoke in place of all)"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .device/whl/*.whl
export PYTHONPATH=$WORK/site:$PWD PYTHONUNBUFFERED=1
"$PY" - <<'EOF'
import importlib.util, sys
sys.path.insert(0, "bench")
from gpu_proof import DEVICE_LACKS
held = [m for m in (*DEVICE_LACKS, "fire") if importlib.util.find_spec(m)]
if held:
    sys.exit(f"the rehearsal venv holds {held}, which the device image lacks: it would not rehearse that image")
EOF
(timeout 400 "$PY" bench/gpu_proof.py smoke --work "$WORK/proof" --medmnist-root .device --out "$OUT") > "$OUT/log.txt" 2>&1 \
  || { tail -30 "$OUT/log.txt"; exit 1; }

echo "== evaluate with TSTR (fair protocol), as all does"
"$PY" bench/gpu_proof.py evaluate --work "$WORK/proof" --medmnist-root .device --device cpu --features domain \
  --domain-steps 30 --force > "$WORK/evaluate.log" 2>&1 || { tail -30 "$WORK/evaluate.log"; exit 1; }

echo "== a compiled small training step (tune compiles on the GPU)"
"$PY" bench/bench_train.py --one small 28 8 3 cpu --compile 2> "$WORK/compile.err" | tail -1 > "$WORK/compile.json" \
  || { tail -30 "$WORK/compile.err"; exit 1; }

"$PY" - "$OUT" "$WORK" <<'EOF'
import json, platform, sys
from pathlib import Path
import numpy, torch
out, work = Path(sys.argv[1]), Path(sys.argv[2])
f = json.loads((out / "figures.json").read_text())
ev = json.loads((work / "proof" / "figures" / "evaluate.json").read_text())["headline"]["tstr_accuracy"]
comp = json.loads((work / "compile.json").read_text())
tr = f["train"]
print(f"Python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}")
print(f"smoke steps: {sorted(f)}; errors: {f.get('errors')}")
print(f"train: {tr['steps']} steps, first process {tr['first_process']['state']}, resumed from "
      f"{tr['resumed_from_step']}, metrics steps increasing: {tr['metrics_steps_increasing']}")
print(f"collect brought back: {sorted(p.name for p in out.iterdir())}")
print(f"TSTR (fair): synthetic-only {ev['value']:.3f}, real-only {ev['baseline']:.3f}, real+synthetic {ev['real+synthetic']:.3f}")
print(f"compiled small step: {comp['images_per_s']:.1f} images/s on the CPU (compile={comp['compile']})")
ok = set(f) >= {"env", "ingest", "tune", "train", "generate", "evaluate", "throughput"} and not f.get("errors") \
     and tr["resume_exercised"] and comp["compile"]
print("rehearsal:", "passed" if ok else "FAILED")
sys.exit(0 if ok else 1)
EOF
