#!/usr/bin/env bash
# Bring .venv up to date (scripts/setup.sh), then run the whole test suite.
# Extra arguments go to pytest, e.g.  scripts/test.sh -k interfaces -x   or   scripts/test.sh -m "not slow"
# Options that always apply (-ra for skip reasons, the per-test timeout) are in setup.cfg [tool:pytest].
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh --test     # --test: also colcon and the ROS launch wheels (launch tests)

# A real headless browser for test/test_fleet.py's report test (it skips, saying why, without one):
# Debian's chromium-headless-shell (~270 MB), installed where we may (root on Debian, as on CI).
if ! command -v chromium-headless-shell >/dev/null && [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ] \
   && command -v apt-get >/dev/null; then
  echo "[test] apt-get install chromium-headless-shell (for the report test)"
  { apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends chromium-headless-shell >/dev/null 2>&1 \
    || { apt-get -o DPkg::Lock::Timeout=300 update >/dev/null 2>&1 \
         && apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends chromium-headless-shell >/dev/null 2>&1; }; } \
    || echo "[test] could not install chromium-headless-shell; the report test will skip"
fi
echo "[test] .venv/bin/python -m pytest test/ $*"
exec .venv/bin/python -m pytest test/ --durations=10 "$@"
