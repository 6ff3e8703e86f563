"""Python side of mobilevlm_ros (setuptools).

scripts/setup.sh installs this in editable mode into .venv; the interface types come from the
CMake/rosidl build (see CMakeLists.txt). CMakeLists.txt reads CONSOLE_SCRIPTS from this file to
install the same programs under lib/mobilevlm_ros/ for `ros2 run`, so keep one entry per line.
"""

import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
NAME = "mobilevlm_ros"

# package.xml is the one place the version is written (mobilevlm_ros.__version__ is checked against it).
VERSION = re.search(r"<version>([^<]+)</version>", (ROOT / "package.xml").read_text()).group(1)

# What the installed package reads at run time (mobilevlm_ros/resources.py: share_file), installed
# under <prefix>/share/mobilevlm_ros as colcon/CMake would, plus the ament index marker, so that
# ament_index_python (launch files: get_package_share_directory) finds the package when <prefix> is
# on AMENT_PREFIX_PATH.
SHARE_FILES = {
    f"share/{NAME}": ["package.xml"],
    f"share/{NAME}/config": ["config/*.yaml", "config/*.xml"],
    f"share/{NAME}/launch": ["launch/*.py"],
    f"share/{NAME}/msg": ["msg/*.msg"],
    f"share/{NAME}/srv": ["srv/*.srv"],
    f"share/{NAME}/action": ["action/*.action"],
    "share/ament_index/resource_index/packages": [f"resource/{NAME}"],
}


def data_files():
    """SHARE_FILES as setuptools data_files (paths relative to this folder). None for the editable
    install of scripts/setup.sh: there CMake fills .venv/share/mobilevlm_ros (config/ and launch/ as
    symlinks into the checkout, the msg/srv/action definitions, package.xml, the ament index
    marker), and pip would write the checkout's own files through those symlinks, and delete them
    on its next uninstall."""
    if "editable_wheel" in sys.argv:
        return []
    files = [(dest, sorted(str(p.relative_to(ROOT)) for pattern in patterns for p in ROOT.glob(pattern)))
             for dest, patterns in SHARE_FILES.items()]
    missing = [dest for dest, found in files if not found]
    if missing:
        raise SystemExit(f"setup.py: no files to install into {', '.join(missing)}")
    return files

CONSOLE_SCRIPTS = [
    "mobilevlm-make-tiny=mobilevlm_ros.tools.make_tiny:main",
    "mobilevlm-ask-image=mobilevlm_ros.tools.ask:main",
    "mobilevlm-export=mobilevlm_ros.tools.export:main",
    "mobilevlm-build-engine=mobilevlm_ros.tools.build_engine:main",
    "mobilevlm-replay=mobilevlm_ros.replay.cli:main",
    "mobilevlm-make-bag=mobilevlm_ros.tools.make_bag:main",
    "mobilevlm-bench=mobilevlm_ros.tools.bench:main",
    "mobilevlm-node=mobilevlm_ros.ros.node:main",
    "mobilevlm-ask-node=mobilevlm_ros.ros.ask_client:main",
    "mobilevlm-demo=mobilevlm_ros.tools.demo:main",
    "mobilevlm-soak=mobilevlm_ros.tools.soak:main",
]

setup(
    name=NAME,
    version=VERSION,
    description="ROS 2 node answering questions about camera frames with MobileVLM",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["mobilevlm_ros", "mobilevlm_ros.*"]),
    install_requires=["numpy", "pillow", "pyyaml"],
    # `mobilevlm-replay BAGS... --out-dir DIR` on Ray workers (a local Ray or a cluster); one bag,
    # and --workers 0, need no Ray
    extras_require={"fleet": ["ray==2.60.0"]},
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
    data_files=data_files(),
)
