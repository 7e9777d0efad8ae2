#!/usr/bin/env bash
# Prepare stock llama.cpp for the GPU machine (runs HERE, on the dev box, not on the device).
#
#   bash scripts/stock/prepare.sh [--check-build] [--check-cuda-configure]
#
# Contract:
# - downloads the pinned sdist llama-cpp-python==$LLAMA_CPP_PYTHON (default 0.3.36) from PyPI into a cache
#   ($HX_CACHE, default ~/.cache/hotexperts) unless it is there already;
# - copies from its vendor/llama.cpp only what `llama-bench` needs into the ignored folder .carry/llama.cpp
#   (top-level CMake files and LICENSE, cmake/, include/, src/, common/, vendor/, licenses/, ggml/ with the CPU
#   and CUDA backends only, tools/llama-bench; tools/CMakeLists.txt is rewritten to that one tool) and prints
#   its size (target <= ~25 MB: it travels in one 64 MiB carry beside the project);
# - --check-build: configures and builds llama-bench from the trimmed tree on this CPU (-DGGML_CUDA=OFF, -j2;
#   several minutes) in $HX_CACHE/llama-cpu-build, then prints `llama-bench --help | head`;
# - --check-cuda-configure: runs the CUDA configure (-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90) without
#   building, to catch CUDA-side files the trim dropped.
# The device side (build, reuse of saved binaries, runs) is scripts/gpu_run.sh: steps stock-build, stock.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VERSION=${LLAMA_CPP_PYTHON:-0.3.36}
CACHE=${HX_CACHE:-$HOME/.cache/hotexperts}
DEST=$ROOT/.carry/llama.cpp
# the same switches the device build uses (scripts/gpu_run.sh, step stock-build)
# (the build commit is named: otherwise llama.cpp's cmake asks git and finds this project's commit)
COMMON_FLAGS=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
              -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF
              -DLLAMA_BUILD_COMMIT="llama-cpp-python-$VERSION" -DLLAMA_BUILD_NUMBER=0)

fetch_sdist() {
  local tgz="$CACHE/llama_cpp_python-$VERSION.tar.gz"
  mkdir -p "$CACHE"
  if [ ! -f "$tgz" ]; then
    python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE" >&2
  fi
  if [ ! -d "$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp" ]; then
    tar -xzf "$tgz" -C "$CACHE"
  fi
  echo "$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp"
}

trim_into() {        # $1 = source tree, $2 = destination
  local src=$1 dst=$2
  rm -rf "$dst"
  mkdir -p "$dst/ggml/src" "$dst/tools"
  cp "$src"/CMakeLists.txt "$src"/LICENSE "$dst"/
  cp -r "$src"/cmake "$src"/include "$src"/src "$src"/common "$src"/vendor "$src"/licenses "$dst"/
  cp -r "$src"/ggml/CMakeLists.txt "$src"/ggml/cmake "$src"/ggml/include "$dst"/ggml/
  find "$src"/ggml/src -maxdepth 1 -type f -exec cp {} "$dst"/ggml/src/ \;
  cp -r "$src"/ggml/src/ggml-cpu "$src"/ggml/src/ggml-cuda "$dst"/ggml/src/
  cp -r "$src"/tools/llama-bench "$dst"/tools/
  printf '%s\n' "# trimmed by hotexperts scripts/stock/prepare.sh: llama-bench only" \
    "llama_add_compile_flags()" "add_subdirectory(llama-bench)" > "$dst"/tools/CMakeLists.txt
  echo "llama-cpp-python==$VERSION vendor/llama.cpp, trimmed to llama-bench (scripts/stock/prepare.sh)" \
    > "$dst"/HOTEXPERTS_SOURCE
}

check_build() {
  local bdir="$CACHE/llama-cpu-build"
  rm -rf "$bdir"
  cmake -S "$DEST" -B "$bdir" "${COMMON_FLAGS[@]}" -DGGML_CUDA=OFF -DGGML_NATIVE=ON > "$CACHE/cpu-configure.log" 2>&1
  cmake --build "$bdir" --target llama-bench -j 2 > "$CACHE/cpu-build.log" 2>&1
  "$bdir/bin/llama-bench" --help > "$CACHE/llama-bench-help.txt"
  grep -E -- "-ncmoe|-lm," "$CACHE/llama-bench-help.txt"
  echo "CPU build OK: $bdir/bin/llama-bench (log: $CACHE/cpu-build.log)"
}

check_cuda_configure() {
  local bdir="$CACHE/llama-cuda-configure" stub=()
  rm -rf "$bdir"
  if ! ldconfig -p | grep -q libcublas && ! compgen -G "/usr/local/cuda*/lib64/libcublas.so*" > /dev/null; then
    # the dev box has nvcc but neither cuBLAS nor a driver (libcuda): stand-in link targets, configure only
    printf '%s\n' 'foreach(t cublas cublasLt cublas_static cublasLt_static cuda_driver)' \
      '  if(NOT TARGET CUDA::${t})' '    add_library(CUDA::${t} INTERFACE IMPORTED GLOBAL)' '  endif()' \
      'endforeach()' > "$CACHE/cublas-stub.cmake"
    stub=(-DCMAKE_PROJECT_INCLUDE="$CACHE/cublas-stub.cmake")
    echo "note: no cuBLAS here; configuring with stand-in CUDA::cublas* and CUDA::cuda_driver targets"
  fi
  cmake -S "$DEST" -B "$bdir" "${COMMON_FLAGS[@]}" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DGGML_NATIVE=ON "${stub[@]}" > "$CACHE/cuda-configure.log" 2>&1
  grep -E "Including CUDA backend|CUDA Toolkit found|Configuring done|Generating done" "$CACHE/cuda-configure.log"
  echo "CUDA configure OK (not built)"
}

main() {
  local src
  src=$(fetch_sdist)
  trim_into "$src" "$DEST"
  echo "source: $(du -sh "$src" | cut -f1) -> trimmed $DEST: $(du -sh "$DEST" | cut -f1)"
  for arg in "$@"; do
    case $arg in
      --check-build) check_build ;;
      --check-cuda-configure) check_cuda_configure ;;
      *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
  done
}

main "$@"
