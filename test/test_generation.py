"""Generation with the torch reference: stop rules, streaming, cancellation, sampling, KV reuse."""
import pytest
import torch

from mobilevlm_ros.core.errors import RequestError
from mobilevlm_ros.core.generation import AnswerBuilder, GenerationParams
from mobilevlm_ros.core.pipeline import load_model
from mobilevlm_ros.core.tokenizer import Tokenizer
from helpers.frames import synthetic_frame


@pytest.fixture(scope="module")
def frame_emb(torch_model):
    return torch_model.encode([synthetic_frame(240, 320, seed=5)])[0]


GREEDY = GenerationParams(max_new_tokens=12)


def test_kv_reuse_gives_identical_answers(torch_model, frame_emb, tiny_v2):
    first = torch_model.ask("What is in the image?", frame_emb, GREEDY)
    again = torch_model.ask("What is in the image?", frame_emb, GREEDY)
    assert first.cached_prefix_tokens == len(torch_model.prompt("x").prefix)        # image evaluated now
    assert again.cached_prefix_tokens == len(torch_model.prompt("x").prefix) + 144  # image from the cache
    assert again.ids == first.ids
    fresh = load_model(tiny_v2)
    assert fresh.ask("What is in the image?", fresh.encode([synthetic_frame(240, 320, seed=5)])[0],
                     GREEDY).ids == first.ids


def test_incremental_equals_one_pass(torch_model, frame_emb):
    """Prefix, image and question evaluated in pieces (cached) == the whole prompt in one forward."""
    llm = torch_model.decoder.llm
    p = torch_model.prompt("Describe the scene.")
    emb = torch.cat([llm.embed(torch.tensor([p.prefix])), torch.from_numpy(frame_emb.embeds)[None],
                     llm.embed(torch.tensor([p.suffix]))], dim=1)
    with torch.inference_mode():
        logits, kv = llm(emb)
        ids = []
        for _ in range(8):
            t = int(logits[0, -1].argmax())
            ids.append(t)
            logits, kv = llm(llm.embed(torch.tensor([[t]])), kv)
    gen = torch_model.ask("Describe the scene.", frame_emb, GenerationParams(max_new_tokens=8, min_new_tokens=8))
    assert gen.ids == ids


def test_answers_depend_on_image_and_question(torch_model, frame_emb):
    other = torch_model.encode([synthetic_frame(240, 320, seed=99)[::-1].copy()])[0]
    a = torch_model.ask("What is in the image?", frame_emb, GREEDY).ids
    assert torch_model.ask("What is in the image?", other, GREEDY).ids != a
    assert torch_model.ask("Is there a red object?", frame_emb, GREEDY).ids != a


def test_streaming_and_cancel(torch_model, frame_emb):
    seen = []
    gen = torch_model.ask("Describe the scene.", frame_emb, GenerationParams(max_new_tokens=10, min_new_tokens=10),
                    on_token=lambda t, text: seen.append((t, text)))
    assert [t for t, _ in seen] == gen.ids and len(gen.ids) == 10 and gen.finish_reason == "length"
    assert seen[-1][1] == gen.text
    calls = []
    gen = torch_model.ask("Describe the scene.", frame_emb, GenerationParams(max_new_tokens=10, min_new_tokens=10),
                    on_token=lambda t, text: calls.append(t), cancel=lambda: len(calls) >= 3)
    assert gen.finish_reason == "cancelled" and len(gen.ids) == 3


def test_sampling_is_seeded(torch_model, frame_emb):
    p = GenerationParams(max_new_tokens=10, temperature=1.5, top_p=0.9, seed=7)
    a = torch_model.ask("Describe the scene.", frame_emb, p).ids
    assert torch_model.ask("Describe the scene.", frame_emb, p).ids == a
    outs = {tuple(torch_model.ask("Describe the scene.", frame_emb,
                            GenerationParams(max_new_tokens=10, temperature=1.5, seed=s)).ids) for s in range(4)}
    assert len(outs) > 1


@pytest.mark.parametrize("kw", [dict(max_new_tokens=0), dict(max_new_tokens=100000), dict(temperature=float("nan")),
                                dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(seed=-3)])
def test_bad_params_rejected(kw):
    with pytest.raises(RequestError):
        GenerationParams(**kw).validate()


def test_stop_rules(tiny_v2):
    tok = Tokenizer(tiny_v2 / "tokenizer.model")
    words = tok.encode("a red box")
    b = AnswerBuilder(tok, GenerationParams(max_new_tokens=50))
    assert all(b.push(t) for t in words) and not b.push(tok.eos_id)
    assert b.finish_reason == "stop" and b.ids == words and b.answer() == "a red box"
    # the text "</s>" spelled out in ordinary pieces also stops, and is stripped with its tokens
    b = AnswerBuilder(tok, GenerationParams(max_new_tokens=50))
    pieces = [tok.sp.piece_to_id(p) for p in ("<0x3C>", "<0x2F>", "s", "<0x3E>")]
    results = [b.push(t) for t in words + pieces]
    assert results[-1] is False and b.finish_reason == "stop"
    assert b.answer() == "a red box" and b.ids == words


def test_an_unfinished_character_is_held_back_while_streaming_and_dropped_at_the_end(tiny_v2):
    """'€' is three byte tokens for this tokenizer: cut after two of them (max_new_tokens), the
    answer ends before it instead of in U+FFFD; streamed, no text shows U+FFFD and each text is the
    start of the answer."""
    tok = Tokenizer(tiny_v2 / "tokenizer.model")
    ids = tok.encode("ab €x")
    euro = [i for i in ids if tok.sp.is_byte(i)]
    assert len(euro) == 3 and tok.decode(ids[:ids.index(euro[1]) + 1]).endswith("\ufffd\ufffd")
    for cut, want in ((ids.index(euro[1]) + 1, "ab"), (ids.index(euro[2]) + 1, "ab €"), (len(ids), "ab €x")):
        streamed = []
        b = AnswerBuilder(tok, GenerationParams(max_new_tokens=cut), on_token=lambda _t, text: streamed.append(text))
        results = [b.push(t) for t in ids[:cut]]
        assert results[-1] is False and b.finish_reason == "length" and b.ids == ids[:cut]
        assert b.answer() == want, (cut, b.answer())
        assert len(streamed) == cut and streamed[-1] == want
        assert all("\ufffd" not in text and want.startswith(text) for text in streamed), streamed
