#!/usr/bin/env bash
# Bring .venv up to date (scripts/setup.sh), then run the whole test suite.
# Extra arguments go to pytest, e.g.  scripts/test.sh -k interfaces -x   or   scripts/test.sh -m "not slow"
# Options that always apply (-ra for skip reasons, the per-test timeout) are in setup.cfg [tool:pytest].
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh --test     # --test: also colcon and the ROS launch wheels (launch tests)
echo "[test] .venv/bin/python -m pytest test/ $*"
exec .venv/bin/python -m pytest test/ --durations=10 "$@"
