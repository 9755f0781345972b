#!/usr/bin/env bash
# Wheels the GPU machine lacks for benchmarks/gpu_runs.sh, downloaded here into .whl/ (ignored by
# git; name it in the device tool's `carry`). That machine's image has torch, transformers,
# accelerate, safetensors, peft, scipy, click and the rest of mergekit's needs, but not mergekit
# and its pydantic/immutables, for its Python 3.12. This package itself runs from the tree
# (PYTHONPATH), so it needs no wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" \
  mergekit==0.1.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  immutables==0.21
ls -la "$dest"
