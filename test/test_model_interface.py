"""The boundary between the engine and the model (engine/model.py): MobileVLM implements the
interface, the engine and replay use nothing else of it, a question is tokenized once, generation
settings are checked once (when made), and channel order is normalised in one function."""
import ast
import inspect
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mobilevlm_ros.core.errors import ImageError, RequestError
from mobilevlm_ros.core.generation import GenerationParams
from mobilevlm_ros.core.pipeline import MobileVLM
from mobilevlm_ros.core.preprocess import as_rgb, rgb_order
from mobilevlm_ros.engine.config import EngineConfig
from mobilevlm_ros.engine.engine import Engine, SimClock
from mobilevlm_ros.engine.frames import NS, Frame, decode_frame
from mobilevlm_ros.engine.images import RawImage
from mobilevlm_ros.engine.model import Model
from mobilevlm_ros.engine.requests import Request, Status
from helpers.frames import synthetic_frame

PACKAGE = Path(__file__).resolve().parents[1] / "mobilevlm_ros"
T0 = 1_700_000_000 * NS


def protocol_members():
    return [n for n, v in vars(Model).items() if not n.startswith("_") and callable(v)]


def test_mobilevlm_implements_every_method_the_engine_needs(torch_model):
    assert isinstance(torch_model, Model)
    for name in protocol_members():
        want = inspect.signature(getattr(Model, name))
        have = inspect.signature(getattr(MobileVLM, name))
        for p in want.parameters.values():      # every parameter of the interface is accepted by name
            assert p.name in have.parameters, (name, p.name, str(have))
    assert torch_model.kv_state_keys() == [] and torch_model.kv_state_bytes() == 0   # torch: not counted


def attribute_names(path: Path) -> set:
    return {n.attr for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)}


@pytest.mark.parametrize("path", sorted(p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "engine").glob("*.py"))
                         + ["replay/runner.py"])
def test_the_engine_and_replay_never_reach_into_the_model(path):
    """Only the model interface: no model.decoder / .vision / .tokenizer."""
    reached = attribute_names(PACKAGE / path) & {"decoder", "vision", "tokenizer"}
    assert not reached, f"{path} uses .{', .'.join(sorted(reached))}"


def test_a_question_is_tokenized_once(torch_model, monkeypatch):
    calls = []
    real = torch_model.tokenizer.encode
    monkeypatch.setattr(torch_model.tokenizer, "encode", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    question = "Is the door open?"
    torch_model.prompt(question)
    per_prompt = len(calls)
    assert per_prompt >= 1

    clock = SimClock(T0)
    engine = Engine(torch_model, EngineConfig(max_new_tokens=3, vision_rate_hz=0.0), clock=clock, simulated=True)
    rgb = synthetic_frame(120, 160, 0)
    engine.offer_raw("front", SimpleNamespace(stamp=None, frame_id="cam"), T0,
                     RawImage("rgb8", 160, 120, 480, 0, rgb.reshape(-1)))
    engine.vision_step()
    calls.clear()
    ticket = engine.submit(Request(question))
    engine.run_pending()
    assert ticket.result(0).status == Status.OK
    tokenized = [c for c in calls if question in str(c[0])]
    assert len(tokenized) == 1, calls            # at submit; the answer used its prompt ids
    assert len(calls) == per_prompt


def test_generation_settings_are_checked_when_made():
    for kw in (dict(top_p=0.0), dict(temperature=11.0), dict(max_new_tokens=0), dict(seed=2 ** 32)):
        with pytest.raises(RequestError):
            GenerationParams(**kw)
    ok = GenerationParams(max_new_tokens=5, temperature=0.5, top_p=0.9, seed=1)
    assert ok.validate() is ok


def test_channel_order_is_normalised_in_one_place():
    rgb = synthetic_frame(6, 8, 1)
    alpha = np.full((6, 8, 1), 9, np.uint8)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    for pixels, order in ((rgb, "rgb"), (bgr, "bgr"), (np.concatenate([rgb, alpha], 2), "rgb"),
                          (np.concatenate([bgr, alpha], 2), "bgr")):
        assert np.array_equal(rgb_order(pixels, order), rgb), (pixels.shape, order)
        frame = Frame("front", None, T0, T0, pixels=pixels, channel_order=order)
        assert np.array_equal(decode_frame(frame), rgb), (pixels.shape, order)
        assert np.array_equal(as_rgb(pixels, order), rgb)
    mono = rgb[:, :, 1].copy()
    assert rgb_order(mono, "bgr") is mono                       # mono has no order: left as it is
    assert as_rgb(mono).shape == (6, 8, 3)
    with pytest.raises(ImageError, match="channel order"):
        rgb_order(rgb, "gbr")
    bad = Frame("front", None, T0, T0, pixels=np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="HxW"):
        decode_frame(bad)
