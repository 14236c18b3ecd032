#!/usr/bin/env bash
# tinymoe's GPU checks on a Linux machine with an NVIDIA GPU, through MLX's CUDA build
# (`mlx[cuda12]`): what the CPU-only CI cannot run.
#
#   bash benchmarks/gpu.sh                 # from the repository root (or anywhere)
#   OUT=/some/dir bash benchmarks/gpu.sh   # where the outputs go (default: ./gpu-results)
#   WHEELS=/dir bash benchmarks/gpu.sh     # install from a local wheel folder (no network)
#   FULL=1 bash benchmarks/gpu.sh          # also the whole test suite with the GPU as default
#   SKIP_INSTALL=1 VENV=... bash ...       # reuse a prepared environment as it is
#   REQUIRE_CUDA=0 ...                     # go on without a GPU (to try the script itself)
#
# It makes a virtual environment (.venv-gpu, or $VENV) with mlx[cuda12] instead of mlx[cpu], then
# writes to $OUT: doctor.json, selftest.json (every dispatch path and kernel against its
# reference, and the kernels' first-use verdict), pytest-gpu.txt (the tests marked `gpu`),
# moe_layer.json (training-step layer timings), moe_layer_decode.json (decode-sized layers),
# sample_<dispatch>.json (tokens/s decoding from a small trained model), decode.json (tinymoe
# against mlx-lm, float and 4-bit, on the same exported model) and summary.txt. It exits
# non-zero when a check failed; benchmark numbers are reported, never judged.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
VENV=${VENV:-.venv-gpu}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
failed=()

pip_args=(-q)
if [ -n "${WHEELS:-}" ]; then pip_args+=(--no-index --find-links "$WHEELS"); fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || exit 1
PY="$VENV/bin/python"
if [ -z "${SKIP_INSTALL:-}" ]; then
  # tinymoe itself without its dependencies: they name mlx[cpu] off macOS, which would put the
  # CPU backend beside the CUDA one.
  "$PY" -m pip install "${pip_args[@]}" "mlx[cuda12]>=0.32.1" numpy click sentencepiece pytest \
    hypothesis matplotlib "tomli; python_version < '3.11'" mlx-lm || exit 1
  "$PY" -m pip install -q --no-deps -e . || exit 1
fi
"$PY" -c 'import mlx.core as mx; ok = mx.cuda.is_available(); print("MLX", mx.__version__, "CUDA", ok, mx.device_info(mx.gpu) if ok else "")' \
  | tee "$OUT/mlx.txt"
if ! grep -q "CUDA True" "$OUT/mlx.txt" && [ "${REQUIRE_CUDA:-1}" != 0 ]; then
  echo "MLX's CUDA backend is not available here (REQUIRE_CUDA=0 to go on anyway)" >&2
  exit 1
fi

run() {  # run NAME CMD...: its output to $OUT/NAME, remember a failure
  local name=$1; shift
  echo "== $name: $*"
  "$@" > "$OUT/$name" 2> "$OUT/$name.stderr" || failed+=("$name")
}

export TINYMOE_CACHE="$OUT/cache"  # the first-use verdict lands here too
run doctor.json "$VENV/bin/tinymoe" doctor --json
run selftest.json "$VENV/bin/tinymoe" selftest --json
run pytest-gpu.txt "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/
if [ -n "${FULL:-}" ]; then run pytest-all.txt "$PY" -m pytest -q -p no:cacheprovider -rs tests/; fi
run moe_layer.json "$PY" benchmarks/moe_layer.py --quick --json
run moe_layer_decode.json "$PY" benchmarks/moe_layer.py --tokens 1,8,64 --experts 8,64 --top-k 2 \
  --backends dense,gather,grouped,metal --json
rm -rf "$OUT/run"
run train.txt "$VENV/bin/tinymoe" train --preset debug --steps 30 --out "$OUT/run" --moe-dispatch gather
for d in gather grouped metal; do
  run "sample_$d.json" "$VENV/bin/tinymoe" sample "$OUT/run" --max-tokens 200 --temperature 0 \
    --moe-dispatch "$d" --json
done
run decode.json "$PY" benchmarks/decode.py --json

{
  echo "tinymoe GPU checks: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  cat "$OUT/mlx.txt"
  if [ ${#failed[@]} -eq 0 ]; then echo "all steps passed"; else echo "FAILED: ${failed[*]}"; fi
  tail -n 3 "$OUT/pytest-gpu.txt" 2>/dev/null
} | tee "$OUT/summary.txt"
[ ${#failed[@]} -eq 0 ]
