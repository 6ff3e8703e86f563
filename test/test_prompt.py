"""The v1 prompt, its token ids around the image slot, and the tokenizer's round trip."""
import pytest

from mobilevlm_ros.core.errors import RequestError
from mobilevlm_ros.core.prompt import IMAGE_TOKEN_INDEX, SYSTEM, build_prompt, v1_prompt
from mobilevlm_ros.core.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_v2):
    return Tokenizer(tiny_v2 / "tokenizer.model")


def test_prompt_text():
    assert v1_prompt("What is this?") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat is this? "
        "ASSISTANT:")
    assert v1_prompt("q").startswith(SYSTEM + " USER: ")


def test_ids_around_image_slot(tok):
    p = build_prompt(tok, "Is there a red object?", 144)
    sp = tok.sp
    before = SYSTEM + " USER: "
    assert list(p.prefix) == [1] + sp.encode(before)
    assert list(p.suffix) == sp.encode("\nIs there a red object? ASSISTANT:")
    assert 1 not in p.suffix, "only the first chunk gets BOS"
    assert p.reference_ids().count(IMAGE_TOKEN_INDEX) == 1
    assert p.total == len(p.prefix) + 144 + len(p.suffix)
    # SentencePiece's dummy prefix makes the chunk after <image> start with a lone "▁" before "\n"
    # (LLaMA's ids 29871, 13), exactly as the reference's tokenizer_image_token produces.
    assert [sp.id_to_piece(i) for i in p.suffix[:2]] == ["▁", "<0x0A>"]


def test_prefix_is_question_independent(tok):
    assert build_prompt(tok, "a", 144).prefix == build_prompt(tok, "something else", 144).prefix


@pytest.mark.parametrize("q", ["look <image> here", "stop</s>", "<s>", "x<unk>"])
def test_special_tokens_in_question_rejected(tok, q):
    with pytest.raises(RequestError):
        build_prompt(tok, q, 144)


def test_decode_round_trip_and_skips_specials(tok):
    text = "Describe the red box, please."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
