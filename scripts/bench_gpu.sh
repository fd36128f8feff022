#!/usr/bin/env bash
# Every one-GPU benchmark of BENCHMARKS.md (Llama-3.1-8B shapes, random weights), one after another.
# Each writes DIR/<name>.json and DIR/<name>.log; one whose JSON exists is skipped, so a re-run after a
# kill resumes with the next unfinished one. The search at 32 layers needs a 141 GB device (H200); on
# an 80 GB one set SEARCH_LAYERS=4,8 (measured at 4 and 8 layers, extrapolated to 32).
#   bash scripts/bench_gpu.sh DIR          (20 minutes on one H200, 2026-12-02)
set -u
dir=${1:?usage: bash scripts/bench_gpu.sh DIR}
mkdir -p "$dir"
export PYTHONPATH=".:scripts${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

run() {  # NAME SCRIPT ARGS...
    local name=$1; shift
    if [ -f "$dir/$name.json" ]; then echo "$name: done already"; return; fi
    echo "$name: started $(date +%T): python scripts/$*"
    python "scripts/$@" --json "$dir/$name.json" > "$dir/$name.log" 2>&1 \
        && echo "$name: finished $(date +%T)" || echo "$name: FAILED (exit $?), see $dir/$name.log"
}

run search bench_search.py --layers "${SEARCH_LAYERS:-32}" --generations 2
run policy_gradient bench_policy_gradient.py --samples 2,8
run inference bench_pruned_inference.py
run supernet bench_supernet.py --tokens 4194304 --mlp-round-sizes 16,896
run forward bench_forward.py
run pbs2p bench_pbs2p.py
