"""The README stays true: every file it links or names exists, every command it shows runs.

- links `[text](path)` and named repository files (`config/...`, `docs/...`, `scripts/...`) exist;
- every `mobilevlm-*` command it shows answers `--help` (for `mobilevlm-bench`, with the
  sub-benchmark it names), from the venv the tests run in;
- `scripts/*.sh` lines name scripts that exist and parse (`bash -n`);
- `pip install -r FILE` names a requirements file that exists;
- `ros2 launch mobilevlm_ros mobilevlm.launch.py a:=b ...`: every argument is declared by the launch file;
- `ros2 service call` / `ros2 action send_goal`: the name is the node's default name plus the
  service/action it serves, and the YAML request fills the named interface (what the ros2 CLI does,
  through rosidl_runtime_py).
"""
import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO

README = (REPO / "README.md").read_text()
BIN = Path(sys.executable).parent


def _code_lines():
    """Shell lines of the README: fenced bash blocks (continuations joined) and inline `code` spans."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [ln.split("  #")[0].strip() for ln in joined.splitlines() if ln.strip()]
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    lines += [span.strip() for span in re.findall(r"`([^`\n]+)`", prose)]
    return lines


LINES = _code_lines()


def _commands(prefix):
    return sorted({ln for ln in LINES if re.match(rf"(\S*/)?{re.escape(prefix)}", ln)})


def test_linked_and_named_files_exist():
    links = [t for t in re.findall(r"\]\(([^)#\s]+)", README) if not re.match(r"https?:", t)]
    named = re.findall(r"`((?:config|docs|launch|scripts|test|msg|srv|action)/[\w./-]+|requirements[\w-]*\.txt)`",
                       README)
    paths = sorted(set(links + named))
    assert len(paths) >= 8, paths
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"the README names files that do not exist: {missing}"


def test_section_anchors_exist():
    anchors = re.findall(r"\]\(#([\w-]+)\)", README)
    headings = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", README, re.M)}
    assert not [a for a in anchors if a not in headings], (anchors, headings)


@pytest.mark.parametrize("program", sorted({re.match(r"(?:\S*/)?(mobilevlm-[\w-]+)", ln).group(1)
                                            for ln in LINES if re.match(r"(?:\S*/)?mobilevlm-[\w-]+", ln)}))
def test_every_command_answers_help(program):
    exe = BIN / program
    assert exe.exists(), f"the README shows {program}, which is not installed in {BIN}"
    calls = [[str(exe), "--help"]]
    if program == "mobilevlm-bench":   # and each sub-benchmark the README names
        subs = {m for ln in LINES for m in re.findall(r"mobilevlm-bench (\w+)", ln) if m != "SUB"}
        calls += [[str(exe), sub, "--help"] for sub in sorted(subs)]
    for call in calls:
        proc = subprocess.run(call, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and len(proc.stdout) > 100, (call, proc.stdout[-500:], proc.stderr[-2000:])


def test_scripts_exist_and_parse():
    scripts = sorted({m for ln in LINES for m in re.findall(r"(scripts/[\w.-]+\.sh)", ln)})
    assert {"scripts/demo.sh", "scripts/test.sh"} <= set(scripts), scripts
    for s in scripts:
        assert (REPO / s).is_file(), s
        assert subprocess.run(["bash", "-n", str(REPO / s)]).returncode == 0, s
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci, "CI must run the README's test command"


def test_pip_requirement_files_exist():
    files = [m for ln in LINES for m in re.findall(r"pip install[^`]*?-r (\S+)", ln)]
    assert files, "the README shows how to install the runtime requirements"
    for f in files:
        assert (REPO / Path(f).name).is_file(), f


def _launch_arguments():
    tree = ast.parse((REPO / "launch" / "mobilevlm.launch.py").read_text())
    return {node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "DeclareLaunchArgument"}


def test_launch_lines_use_declared_arguments():
    declared = _launch_arguments()
    assert {"model_path", "image", "namespace", "params_file"} <= declared
    shown = [ln for ln in LINES if "mobilevlm.launch.py" in ln and ":=" in ln]
    assert shown, "the README shows a launch line"
    for ln in shown:
        used = set(re.findall(r"(\w+):=", ln))
        assert used <= declared, f"{ln!r} uses undeclared launch arguments {used - declared}"


def _ros2_calls(verb):
    return [shlex.split(ln) for ln in LINES if ln.startswith(f"ros2 {verb}")]


def _fill(msg, values: dict):
    """Set a message's fields from the YAML mapping, as `ros2 service call` does; an unknown field or
    a value of the wrong type fails (the generated setters check types)."""
    for name, value in values.items():
        assert name in msg.get_fields_and_field_types(), f"{type(msg).__name__} has no field {name!r}"
        if isinstance(value, dict):
            _fill(getattr(msg, name), value)
        else:
            setattr(msg, name, value)


@pytest.mark.ros
def test_ros2_service_and_action_lines_fill_the_interfaces():
    import importlib

    def interface(type_name):   # mobilevlm_ros/srv/Ask -> the generated class
        pkg, kind, name = type_name.split("/")
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)

    node_default = "/mobilevlm"   # the launch file's default node_name, no namespace
    calls = [("service", c) for c in _ros2_calls("service call")] + \
            [("action", c) for c in _ros2_calls("action send_goal")]
    assert {kind for kind, _ in calls} == {"service", "action"}, calls
    for kind, argv in calls:
        args = [a for a in argv[3:] if not a.startswith("--")]
        name, type_name, payload = args
        assert name in (f"{node_default}/ask", f"{node_default}/ask_stream"), name
        msg = interface(type_name).Request() if kind == "service" else interface(type_name).Goal()
        _fill(msg, yaml.safe_load(payload))
        assert msg.question


def test_readme_is_short_and_starts_with_the_robot_path():
    lines = README.splitlines()
    assert len(lines) <= 260, len(lines)
    first_screen = "\n".join(lines[:60])
    assert "colcon build" in first_screen and "ros2 launch" in first_screen
