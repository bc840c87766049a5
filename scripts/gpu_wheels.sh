#!/usr/bin/env bash
# Run here (the CPU machine): the Python 3.12 wheels the GPU machine's image lacks (FIELD_NOTES "The GPU machine"),
# into .whl/ (git-ignored; pass it to the device tool's `carry`). Versions are the ones installed in .venv, so both
# machines run the same stack. scripts/gpu_figures.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.whl
mkdir -p "$OUT"
PY=.venv/bin/python
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# source-only packages: a py3-none-any wheel built here
for pkg in deepspeed fvcore iopath; do
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$pkg==$(version "$pkg")"
done
# the rest: binary or pure-Python wheels for CPython 3.12 on x86-64 Linux
args=()
for pkg in webdataset braceexpand hjson pydantic pydantic_core annotated-types typing-inspection yacs termcolor \
           portalocker tabulate py-cpuinfo ninja msgpack einops; do
  args+=("$pkg==$(version "$pkg")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$OUT" "${args[@]}"
echo "summary: $(ls "$OUT" | wc -l) wheels, $(du -sh "$OUT" | cut -f1) in $OUT (carry it: carry=[\"$OUT\"])"
