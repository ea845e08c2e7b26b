#!/usr/bin/env bash
# benchmarks/gpu_throughput.py on the lent GPU machine (the `device` tool), as one prepared call:
#
#   run(command="bash benchmarks/gpu_run.sh", timeout_s=540)
#
# That machine has torch, accelerate, transformers, pandas and Triton, and no network; what it
# lacks travels as wheels in shared/wheels (shared/ goes with every call; it is git-ignored).
# Make them here first, once per checkout (this machine has PyPI; that one does not):
#
#   bash benchmarks/gpu_wheels.sh
#
# Writes $OUT/gpu_throughput.log (everything printed) and $OUT/gpu_throughput.json (its last
# line). Outside the device tool, OUT defaults to runs/gpu-run. Arguments go to the benchmark
# (e.g. --size tiny for a first check of the script itself). A check on a CPU machine that must
# not touch its Python environment:
#   OUT=/tmp/gpu-run INSTALL_PROJECT=0 SITE=/tmp/site-check PYTHON=.venv/bin/python \
#     bash benchmarks/gpu_run.sh --quick
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/runs/gpu-run}
WHEELS=${WHEELS:-shared/wheels}
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"

run() {
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "no wheels in $WHEELS: make them first, on a machine with PyPI: bash benchmarks/gpu_wheels.sh"
    exit 2
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
# The project itself, without dependencies (editable: the checkout is what runs). PYTHONPATH
# already makes it importable, so a failure here (no setuptools) only costs the `align` command.
if [ "${INSTALL_PROJECT:-1}" = 1 ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
        || echo "note: pip install -e . failed; running from PYTHONPATH"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" - <<'EOF'
import importlib.metadata as md, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("triton", "accelerate", "open_clip_torch", "timm", "webdataset", "transformers"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} MISSING")
EOF

# The benchmark is sized to finish in under 6 minutes on one H100/H200; the timeout leaves the
# call's own limit (600 s) room for the installs above.
started=$(date +%s)
status=0
# a folder of its own each call: a warm machine keeps /tmp, and shards prepared at another --size
# are refused (after the step and loss parts had run)
timeout 500 "$PYTHON" benchmarks/gpu_throughput.py --work "$(mktemp -d /tmp/gpu-throughput.XXXXXX)" "$@" || status=$?
echo "benchmark wall time: $(( $(date +%s) - started )) s, exit $status"
return $status
}

status=0
run "$@" 2>&1 | tee "$OUT/gpu_throughput.log" || status=$?
grep '^{' "$OUT/gpu_throughput.log" | tail -n 1 > "$OUT/gpu_throughput.json" || true
exit $status
