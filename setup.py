"""Python side of mobilevlm_ros (setuptools).

scripts/setup.sh installs this in editable mode into .venv; the interface types come from the
CMake/rosidl build (see CMakeLists.txt). CMakeLists.txt reads CONSOLE_SCRIPTS from this file to
install the same programs under lib/mobilevlm_ros/ for `ros2 run`, so keep one entry per line.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

# package.xml is the one place the version is written (mobilevlm_ros.__version__ is checked against it).
VERSION = re.search(r"<version>([^<]+)</version>",
                    (Path(__file__).resolve().parent / "package.xml").read_text()).group(1)

CONSOLE_SCRIPTS = [
    "mobilevlm-make-tiny=mobilevlm_ros.tools.make_tiny:main",
    "mobilevlm-ask=mobilevlm_ros.tools.ask:main",
    "mobilevlm-export=mobilevlm_ros.tools.export:main",
    "mobilevlm-build-engine=mobilevlm_ros.tools.build_engine:main",
    "mobilevlm-replay=mobilevlm_ros.tools.replay:main",
    "mobilevlm-make-bag=mobilevlm_ros.tools.make_bag:main",
    "mobilevlm-bench=mobilevlm_ros.tools.bench:main",
    "mobilevlm-node=mobilevlm_ros.ros.node:main",
    "mobilevlm-ask-ros=mobilevlm_ros.ros.ask_client:main",
    "mobilevlm-demo=mobilevlm_ros.tools.demo:main",
    "mobilevlm-soak=mobilevlm_ros.tools.soak:main",
]

setup(
    name="mobilevlm_ros",
    version=VERSION,
    description="ROS 2 node answering questions about camera frames with MobileVLM",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["mobilevlm_ros", "mobilevlm_ros.*"]),
    install_requires=["numpy", "pillow", "pyyaml"],
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)
