#!/usr/bin/env bash
# Every GPU check of the generation engines in one script, for the device machine (torch with CUDA, transformers
# 5.17, pyarrow; no Prefect, Ray, pydantic or network), sized to finish in about 8 minutes. Run from the repository
# root after benchmarks/fetch_gpu_wheels.sh filled benchmarks/.wheels/ here (carry that folder):
#
#   bash benchmarks/gpu_check.sh            # results in $OUT/gpu_check.json (and each step's own JSON and log)
#
# Steps, each under `timeout` and none stopping the others:
#   1. install the carried wheels into a private folder on PYTHONPATH (newer transformers, pydantic, dafactory);
#      if that transformers does not import, the machine's own is used with the rest;
#   2. greedy check: each engine against plain generate in bf16, 0.5B-shaped random model, first 32 tokens of each
#      row agreeing for >= 95% of rows;
#   3. bench_generate.py load (a): 512 requests x 256 new tokens;
#   4. bench_generate.py load (b): long-tailed budgets 64..2048, N = 4 (fewer requests than the full 512, to fit);
#   5. bench_latent.py on CUDA (its failure is recorded, not fatal).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python}
EXTRA=${GPU_CHECK_EXTRA:-}  # e.g. --small, to try the script on a CPU
SITE=$(mktemp -d)/site
export PYTHONPATH="$SITE"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
declare -A RC
t0=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: run with a timeout, log to $OUT/NAME.log, remember the exit status
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s, at $(( $(date +%s) - t0 ))s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    RC[$name]=$?
    tail -n 15 "$OUT/$name.log"
    echo "== $name: exit ${RC[$name]}"
}

install() {
    rm -rf "$SITE" && mkdir -p "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$@"
}
wheels=(benchmarks/.wheels/*.whl)
install "${wheels[@]}"
if ! "$PY" -c "import transformers, pydantic, dafactory.tasks.generate.backends.hf" > "$OUT/install.log" 2>&1; then
    echo "the carried transformers does not import here (see install.log): using the machine's own"
    install $(ls benchmarks/.wheels/*.whl | grep -Ev '/(transformers|tokenizers|huggingface_hub|safetensors)-')
fi
"$PY" - > "$OUT/env.json" <<'PYEOF'
import json, torch, transformers
print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                  "cuda": torch.cuda.is_available(),
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}))
PYEOF
cat "$OUT/env.json"

step check 90 "$PY" benchmarks/bench_generate.py $EXTRA --check --loads "" --json "$OUT/check.json"
step load_a 150 "$PY" benchmarks/bench_generate.py $EXTRA --loads a --requests 512 --new-tokens 256 --json "$OUT/load_a.json"
step load_b 170 "$PY" benchmarks/bench_generate.py $EXTRA --loads b --requests-b 128 --n-b 4 --max-budget 2048 \
    --json "$OUT/load_b.json"
step latent 60 "$PY" benchmarks/bench_latent.py --device cuda --json "$OUT/latent.json"

"$PY" - "$OUT" "${RC[check]}" "${RC[load_a]}" "${RC[load_b]}" "${RC[latent]}" "$(( $(date +%s) - t0 ))" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def read(name):
    p = out / name
    try:
        return json.loads(p.read_text())
    except Exception as exc:
        return {"missing": f"{type(exc).__name__}: {exc}"}
steps = dict(zip(["check", "load_a", "load_b", "latent"], map(int, sys.argv[2:6])))
result = {"env": read("env.json"), "exit": steps, "seconds": int(sys.argv[6]), "check": read("check.json"),
          "load_a": read("load_a.json"), "load_b": read("load_b.json"), "latent": read("latent.json")}
(out / "gpu_check.json").write_text(json.dumps(result, indent=2))
print("wrote", out / "gpu_check.json")
PYEOF
