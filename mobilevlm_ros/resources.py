"""The package's data files (config/, launch/, msg/) where an install put them: the ament share
directory, found through the ament index (AMENT_PREFIX_PATH; colcon installs and scripts/setup.sh's
.venv) or under this Python's prefix (a pip install, whose data_files land in <prefix>/share).
Never relative to the source tree: an installed package has no checkout around it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE = "mobilevlm_ros"


def share_dirs() -> list:
    """Candidate share/mobilevlm_ros folders, most specific first (no duplicates)."""
    prefixes = [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p] + [sys.prefix]
    return list(dict.fromkeys(Path(p) / "share" / PACKAGE for p in prefixes))


def share_file(*parts: str) -> Path:
    """share/mobilevlm_ros/<parts>; FileNotFoundError naming every place looked at."""
    places = [d.joinpath(*parts) for d in share_dirs()]
    for p in places:
        if p.is_file():
            return p
    raise FileNotFoundError(f"{'/'.join(parts)} of {PACKAGE} is not installed (looked in "
                            + ", ".join(str(p) for p in places) + ")")
