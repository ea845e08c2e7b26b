#!/usr/bin/env bash
# The wheels benchmarks/gpu_run.sh installs on the lent GPU machine, which has no network: run this
# here first (it needs PyPI), once per checkout, then `run(command="bash benchmarks/gpu_run.sh")`.
# They are for that machine's Python 3.12 on x86-64 and go to shared/wheels (git-ignored; shared/
# travels with every device call).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
WHEELS=${WHEELS:-shared/wheels}
mkdir -p "$WHEELS"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$WHEELS" \
    open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5 webdataset==1.0.2 braceexpand==0.1.7 \
    soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
ls "$WHEELS"
