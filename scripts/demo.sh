#!/usr/bin/env bash
# The main job in one command: set up (or bring up to date) .venv and the tiny model, then start the
# node, feed it camera frames from the bundled sample source, ask a question through ~/ask over DDS
# and print the answer, the frame stamp and the timings. Extra arguments go to mobilevlm-demo,
# e.g.  scripts/demo.sh --question "Is there a red object?" --stream
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
exec .venv/bin/mobilevlm-demo "$@"
