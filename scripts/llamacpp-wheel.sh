#!/usr/bin/env bash
# Build (once per CPU) and install llama-cpp-python, the optional llama.cpp engine.
# The wheel is compiled for the host CPU (GGML_NATIVE), so it is cached under a key made of the CPU model and
# its flags: pip's own wheel cache ignores CMAKE_ARGS and would hand a wheel built on one CPU to another.
# On CPUs with AMX the AMX tile kernels are compiled out (-mno-amx-*): they are what segfaulted on batched
# prompt evaluation in this workplace's sandbox; set DLP_LLAMACPP_AMX=1 to keep them.
set -euo pipefail
PY="${1:?usage: llamacpp-wheel.sh PYTHON}"
VERSION="${LLAMACPP_VERSION:-0.3.36}"
CACHE="${DLP_DEPLOY_CACHE:-$HOME/.cache/dlp-deploy}/wheels"
key=$( (grep -m1 'model name' /proc/cpuinfo; grep -m1 '^flags' /proc/cpuinfo; echo "$VERSION ${DLP_LLAMACPP_AMX:-0}") | sha256sum | cut -c1-16)
dir="$CACHE/llama-cpp-python-$key"
flags=""
if grep -qw amx_tile /proc/cpuinfo && [ "${DLP_LLAMACPP_AMX:-0}" != 1 ]; then
    flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
if ! ls "$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $VERSION for this CPU (about 5 minutes on 2 cores) -> $dir"
    mkdir -p "$dir.tmp"
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF ${flags:+-DCMAKE_C_FLAGS='$flags' -DCMAKE_CXX_FLAGS='$flags'}" \
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$PY" -m pip wheel --quiet --no-deps --no-cache-dir -w "$dir.tmp" "llama-cpp-python==$VERSION"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
fi
"$PY" -m pip install --quiet "$dir"/llama_cpp_python-*.whl
