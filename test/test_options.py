"""Choice lists are defined once, in core: every command, benchmark and node parameter that takes a
quantization, vision backend, decoder, llama.cpp library or vision graph offers exactly core's list,
and the help texts of comma-separated options name it. Also the shipped parameters file, whose
comments list the choices by hand.

The parsers are the commands' own: each `main` runs until it parses its arguments, and the parser
it built is checked (nothing is loaded).
"""
import argparse
import importlib
import re
from pathlib import Path

import pytest
import yaml

from mobilevlm_ros.core.onnx_export import DTYPES, VISION_DTYPES
from mobilevlm_ros.core.decoders.llama_library import LLAMA_LIBRARIES
from mobilevlm_ros.core.pipeline import DECODERS, QUANTS, VISION_BACKENDS
from mobilevlm_ros.tools.options import CommaList

REPO = Path(__file__).resolve().parent.parent

MODEL_OPTIONS = {"--vision-backend": ("auto", *VISION_BACKENDS), "--decoder": ("auto", *DECODERS),
                 "--quant": QUANTS, "--vision-dtype": VISION_DTYPES}
# module of a command -> {option: core's list}
COMMANDS = {
    "mobilevlm_ros.tools.ask": MODEL_OPTIONS,
    "mobilevlm_ros.replay.cli": MODEL_OPTIONS,
    "mobilevlm_ros.tools.export": {"--vision-dtype": DTYPES, "--quant": QUANTS},
    "mobilevlm_ros.tools.bench.decoder": {"--quants": QUANTS, "--libraries": LLAMA_LIBRARIES},
    "mobilevlm_ros.tools.bench.fidelity": {"--quants": QUANTS, "--libraries": LLAMA_LIBRARIES},
    "mobilevlm_ros.tools.bench.batches": {"--quant": QUANTS, "--library": ("auto", *LLAMA_LIBRARIES)},
    "mobilevlm_ros.tools.bench.question": {"--quant": QUANTS, "--vision-dtype": DTYPES},
    "mobilevlm_ros.tools.bench.vision": {"--backends": VISION_BACKENDS, "--dtypes": DTYPES},
}
# the node's parameters with a choice list of core's
PARAMETERS = {"vision_backend": ("auto", *VISION_BACKENDS), "decoder": ("auto", *DECODERS), "quant": QUANTS,
              "llama_library": ("auto", *LLAMA_LIBRARIES), "vision_dtype": VISION_DTYPES}


class _Parsed(Exception):
    pass


def parser_of(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser `module.main` builds, caught as it parses its arguments."""
    built = []

    def capture(self, args=None, namespace=None):
        built.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed):
        importlib.import_module(module).main(["--help"])
    monkeypatch.undo()
    return built[-1]


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_command_choices_are_cores_lists(module, monkeypatch):
    actions = {s: a for a in parser_of(module, monkeypatch)._actions for s in a.option_strings}
    for option, expected in COMMANDS[module].items():
        action = actions[option]
        if isinstance(action.type, CommaList):       # a comma-separated list: its help names the choices
            assert action.type.choices == tuple(expected), option
            assert action.type.names in action.help, (option, action.help)
        else:                                       # one value: argparse lists the choices itself
            assert tuple(action.choices) == tuple(expected), option


def test_comma_list_takes_known_names_and_refuses_others():
    quants = CommaList(QUANTS, "quant")
    assert quants("Q8_0, f16,q8_0") == ["q8_0", "f16"]
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown quant q2_k \(choose from f16,q8_0"):
        quants("f16,q2_k")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown quant"):
        quants("")
    assert CommaList(LLAMA_LIBRARIES, "library", allow_empty=True)("") == []


def test_bench_rejects_an_unknown_library_before_running(capsys):
    from mobilevlm_ros.tools.bench import decoder
    with pytest.raises(SystemExit) as e:
        decoder.main(["--model", "/nonexistent", "--libraries", "llama.cpp,vllm"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --libraries: unknown library vllm" in err and ",".join(LLAMA_LIBRARIES) in err


def test_node_parameter_choices_are_cores_lists():
    pytest.importorskip("rcl_interfaces", reason="the node's parameter table needs rcl_interfaces (ROS)")
    from mobilevlm_ros.ros.params import PARAM_BY_NAME
    for name, expected in PARAMETERS.items():
        assert tuple(PARAM_BY_NAME[name].spec.choices) == tuple(expected), name


def test_params_file_comments_list_the_choices():
    """config/mobilevlm.yaml lists each parameter's choices ("a | b | c") in the comment above it:
    written by hand, so checked against the table."""
    text = (REPO / "config" / "mobilevlm.yaml").read_text()
    values = yaml.safe_load(text)["/**"]["ros__parameters"]
    for name, expected in PARAMETERS.items():
        assert name in values, name
        block = re.search(rf"((?:^ *#.*\n)+) *{name}:", text, re.M).group(1)     # the comment right above
        listed = re.sub(r"\s+", " ", " ".join(line.strip().lstrip("#") for line in block.splitlines()))
        assert f": {' | '.join(expected)}." in listed, f"{name}: its comment should list {' | '.join(expected)}"
