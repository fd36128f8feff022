#!/usr/bin/env bash
# llama.cpp speed of tyr-jax's GGUF exports: llama-bench tokens/s for prompt processing (pp512) and
# generation (tg128), F16 and Q8_0, of dense SmolLM2-135M against FLAP-pruned exports with per-layer sizes
# (25% and 50% of the attention + MLP parameters removed; llama.cpp's deci architecture), and models with
# the per-layer sizes of Týr's searched 25% and 50% runs (docs/results/smollm2-tyr-{25,50}-sizes.json;
# scripts/gguf_with_sizes.py: their shapes, not their weights, which is all the speed depends on).
#
# Usage: scripts/bench_llama_cpp.sh [OUT_DIR]   (default runs/bench-llama-cpp; finished steps are reused)
# $TYR_BENCH_THREADS: llama-bench threads (default 2), $TYR_BENCH_REPS: repetitions (default 3).
# Writes OUT_DIR/llama-bench.md (llama-bench's table) and prints it.
set -euo pipefail

OUT="${1:-runs/bench-llama-cpp}"
THREADS="${TYR_BENCH_THREADS:-2}"
REPS="${TYR_BENCH_REPS:-3}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="$("$HERE/build_llama_cpp.sh" | tail -n 1)"
TYR=(env PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" python -m tyr_jax.cli)  # this checkout's tyr-jax
mkdir -p "$OUT"

[[ -f "$OUT/dense.gguf" ]] || "${TYR[@]}" export --model smollm2-135m --gguf "$OUT/dense.gguf" --type f16
for pct in 25 50; do
    if [[ ! -f "$OUT/flap-$pct/model.gguf" ]]; then
        "${TYR[@]}" prune --config "$HERE/../configs/smoke.yaml" out="$OUT/flap-$pct" method=flap \
            supernet.target_sparsity="0.$pct" export.gguf=true export.gguf_type=f16 \
            eval.tasks=[] eval.ood_corpus=null
    fi
    cp "$OUT/flap-$pct/model.gguf" "$OUT/flap-$pct.gguf"
done

for pct in 25 50; do
    [[ -f "$OUT/tyr-$pct-sizes.gguf" ]] || env PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" \
        python "$HERE/gguf_with_sizes.py" "$HERE/../docs/results/smollm2-tyr-$pct-sizes.json" "$OUT/tyr-$pct-sizes.gguf"
done

MODELS=()
for name in dense flap-25 flap-50 tyr-25-sizes tyr-50-sizes; do
    [[ -f "$OUT/$name-q8_0.gguf" ]] || "$BIN/llama-quantize" "$OUT/$name.gguf" "$OUT/$name-q8_0.gguf" Q8_0 >/dev/null 2>&1
    MODELS+=(-m "$OUT/$name.gguf" -m "$OUT/$name-q8_0.gguf")
done
"$BIN/llama-bench" "${MODELS[@]}" -p 512 -n 128 -t "$THREADS" -r "$REPS" -o md | tee "$OUT/llama-bench.md"
