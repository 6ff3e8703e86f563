"""Session fixtures: tiny random checkpoints in the published layout, made by the project's own tool."""
import pytest

from mobilevlm_ros.tools.make_tiny import make_checkpoint
from mobilevlm_ros.tools.synthetic import pattern_frame


@pytest.fixture(scope="session")
def tiny_v2(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("models") / "tiny-v2", "ldpnetv2", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_v1(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("models") / "tiny-v1", "ldpnet", "tiny", seed=0)


@pytest.fixture(scope="session", params=["v1", "v2"])
def tiny_ckpt(request, tiny_v1, tiny_v2):
    return tiny_v1 if request.param == "v1" else tiny_v2


def synthetic_frame(h, w, seed=0):
    """Deterministic frame with structure (gradients + a block) and some noise."""
    return pattern_frame(h, w, seed)


FRAMES = {"wide": (360, 640), "tall": (500, 300), "square": (256, 256)}


@pytest.fixture(scope="session")
def tiny_v2_artifacts(tiny_v2, tmp_path_factory):
    """tiny_v2 exported as the product runs it: ONNX vision graphs (fp32, int8) + GGUF decoders."""
    from mobilevlm_ros.tools.export import export
    out = tmp_path_factory.mktemp("models") / "tiny-v2-artifacts"
    export(tiny_v2, out, ["fp32", "int8"], ["f16", "q8_0", "q4_k_m"], quiet=True)
    return out
