#!/usr/bin/env bash
# Build ik_llama.cpp's shared libraries (the `llama` and `ggml` CMake targets) for THIS machine's CPU
# and install them into a private folder of a venv, where mobilevlm_ros/core/decoders/ik_llama_lib.py
# loads them through the project's own ctypes binding:
#
#   <venv>/lib/mobilevlm-ik-llama/   libllama.so libggml.so  include/ (llama.h, ggml*.h: for the
#                                    layout test)  LICENSE (ik_llama.cpp, llama.cpp and ggml's MIT
#                                    notice)  build.json (source, compiler, flags, the CPU flags the
#                                    binary may use: auto never loads it on a CPU without them)
#
# No file outside that folder, so nothing collides with llama-cpp-python or any other package.
# The sources are the sdist of ik-llama-cpp-python (pinned below by version and sha256; its own
# packaging is not used: its sdist does not build, its wheel is AVX2-only).
# Builds are cached per (source hash, compiler, CMake flags, CPU flags) in
# ${MOBILEVLM_CACHE:-~/.cache/mobilevlm_ros}/ik-llama/<key>, so a re-run, a fresh clone or CI on the
# same machine copies instead of compiling.
#
# Usage: scripts/build-ik-llama.sh <venv>     (scripts/setup.sh calls it)
# Environment: JOBS (default: number of cores); IK_LLAMA_SDIST: the sdist file to use instead of
# downloading it (checked against the pinned sha256 all the same)
set -euo pipefail

VENV="${1:?usage: build-ik-llama.sh <venv>}"
VERSION="0.1.5"
SDIST="ik_llama_cpp_python-$VERSION.tar.gz"
SDIST_SHA256="33c67eb99e4dcab5e611050433243815709b8b3067753f9ce18375013cf002ad"
DEST="$VENV/lib/mobilevlm-ik-llama"
CACHE="${MOBILEVLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mobilevlm_ros}/ik-llama"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
START=$SECONDS
log() { printf '[ik-llama %3ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf '[ik-llama] ERROR: %s\n' "$*" >&2; exit 1; }

# The x86 instruction-set flags of this CPU (as /proc/cpuinfo names them): -march=native may use any
# of them, so the binary is recorded as needing all of them. ik_llama_lib.ISA_FLAG repeats the pattern.
ISA_RE='^(sse[0-9a-z_]*|ssse3|pni|avx[0-9a-z_]*|amx[a-z0-9_]*|fma4?|f16c|bmi[12]|adx|abm|popcnt|movbe|sha_ni|aes|vaes|pclmulqdq|vpclmulqdq|gfni)$'
CPU_FLAGS="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | tr ' ' '\n' | grep -E "$ISA_RE" | sort -u | tr '\n' ' ' || true)"

CMAKE_FLAGS=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
  # the libraries find each other beside themselves, wherever the folder is copied
  -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON "-DCMAKE_INSTALL_RPATH=\$ORIGIN")
# As for llama.cpp (scripts/setup.sh): on a CPU with AMX, build without it (llama.cpp's AMX matmul
# segfaults, ggml-org/llama.cpp#20824; ik_llama.cpp's ggml shares that code's lineage).
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
  NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  CMAKE_FLAGS+=("-DCMAKE_C_FLAGS=$NO_AMX" "-DCMAKE_CXX_FLAGS=$NO_AMX")
  CPU_FLAGS="$(tr ' ' '\n' <<<"$CPU_FLAGS" | grep -v '^amx' | tr '\n' ' ')"
fi
CC_VERSION="$( (${CC:-cc} --version 2>/dev/null || echo none) | head -1)"
CXX_VERSION="$( (${CXX:-c++} --version 2>/dev/null || echo none) | head -1)"
KEY="$(printf '%s\n' "$SDIST_SHA256" "$CC_VERSION" "$CXX_VERSION" "${CMAKE_FLAGS[*]}" "$CPU_FLAGS" | sha256sum | cut -c1-20)"

if [ -f "$DEST/build.json" ] && grep -q "\"key\": \"$KEY\"" "$DEST/build.json"; then
  log "installed build $KEY is current"
  exit 0
fi

if [ ! -f "$CACHE/$KEY/build.json" ]; then
  command -v cmake >/dev/null || die "cmake not found"
  WORK="$CACHE/work-$KEY"
  rm -rf "$WORK"; mkdir -p "$WORK"
  if [ -n "${IK_LLAMA_SDIST:-}" ]; then          # a machine without PyPI: the file, brought along
    cp "$IK_LLAMA_SDIST" "$WORK/$SDIST"
  else
    log "downloading the sources ($SDIST, pip's cache)"
    "$VENV/bin/python" -m pip --disable-pip-version-check download --quiet --no-deps --no-binary :all: \
      -d "$WORK" "ik-llama-cpp-python==$VERSION" >"$WORK/download.log" 2>&1 \
      || [ -f "$WORK/$SDIST" ] || { tail -20 "$WORK/download.log"; die "pip download failed"; }
  fi
  echo "$SDIST_SHA256  $WORK/$SDIST" | sha256sum -c --quiet - || die "$SDIST: sha256 mismatch"
  tar -xzf "$WORK/$SDIST" -C "$WORK"
  SRC="$WORK/ik_llama_cpp_python-$VERSION/vendor/ik_llama.cpp"
  log "building ik_llama.cpp (llama, ggml) with -march=native, $JOBS jobs (~10 min of CPU; once per machine)"
  cmake -S "$SRC" -B "$WORK/build" "${CMAKE_FLAGS[@]}" >"$WORK/configure.log" 2>&1 \
    || { tail -30 "$WORK/configure.log"; die "CMake configure failed (log: $WORK/configure.log)"; }
  cmake --build "$WORK/build" -j "$JOBS" --target llama ggml >"$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log"; die "build failed (log: $WORK/build.log)"; }
  OUT="$WORK/out"
  mkdir -p "$OUT/include"
  cp -L "$WORK/build/src/libllama.so" "$WORK/build/ggml/src/libggml.so" "$OUT/"
  cp "$SRC/include/llama.h" "$SRC"/ggml/include/ggml*.h "$OUT/include/"
  cp "$SRC/LICENSE" "$OUT/LICENSE"
  "$VENV/bin/python" - "$OUT/build.json" "$KEY" "$VERSION" "$SDIST_SHA256" "$CC_VERSION" "$CPU_FLAGS" \
    "${CMAKE_FLAGS[@]}" <<'EOF'
import json, sys, time
out, key, version, sha, cc, flags, *cmake = sys.argv[1:]
json.dump({"key": key, "source": f"ik-llama-cpp-python=={version} sdist (vendor/ik_llama.cpp)",
           "source_sha256": sha, "compiler": cc, "cmake_flags": cmake, "cpu_flags": flags.split(),
           "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, open(out, "w"), indent=1)
EOF
  rm -rf "${CACHE:?}/$KEY"
  mv "$OUT" "$CACHE/$KEY"
  rm -rf "$WORK"
  log "built and cached in $CACHE/$KEY"
else
  log "using the cached build $CACHE/$KEY"
fi
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
cp -r "$CACHE/$KEY" "$DEST.tmp"
mv "$DEST.tmp" "$DEST"
log "installed into $DEST"
