#!/usr/bin/env bash
# Fills benchmarks/.wheels/ (git-ignored) with what benchmarks/gpu_check.sh installs on the GPU machine, which has
# torch with CUDA, transformers 5.17 and pyarrow but no pydantic and no network: this venv's transformers (>= 5.18:
# num_return_sequences children in continuous batching) and the libraries it needs at their versions here, pydantic
# and its parts, and the dafactory wheel. Wheels for CPython 3.11 on manylinux x86_64. Checks the total is < 60 MiB
# (the device carries 64 MiB in all).
#
#   bash benchmarks/fetch_gpu_wheels.sh        (PYTHON=... to use another interpreter than .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=benchmarks/.wheels
rm -rf "$DEST"
mkdir -p "$DEST"
pins=$("$PY" - <<'PYEOF'
import importlib.metadata as m
names = ["transformers", "tokenizers", "huggingface-hub", "safetensors",
         "pydantic", "pydantic-core", "typing-inspection", "annotated-types", "pyyaml"]
print(" ".join(f"{n}=={m.version(n)}" for n in names))
PYEOF
)
echo "downloading: $pins"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
    --abi abi3 --abi none --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any -d "$DEST" $pins
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" .
ls -l "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "total: $((total / 1024 / 1024)) MiB ($total bytes)"
if [ "$total" -ge $((60 * 1024 * 1024)) ]; then
    echo "too big: the device carries 64 MiB in all" >&2
    exit 1
fi
