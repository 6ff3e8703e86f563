"""LlamaCppDecoder: the GGUF decoder against the torch reference, and its determinism contract.
Every test that takes the `v2` world runs once per installed library (llama.cpp, ik_llama.cpp).

Two kinds of checks, never mixed:
- Different arithmetic (llama.cpp F16 / Q8_0 vs the float32 torch reference) is compared through
  logits, teacher-forced along the reference's own greedy answer: the error per position, in units
  of the reference logits' standard deviation, must stay within the format's rounding (F16 3 %,
  Q8_0 30 %), and wherever the reference's top-1 margin is more than twice that position's error,
  the argmax must agree. Exact tokens of a random model are not compared across arithmetics: its
  logits have near-ties that any rounding flips.
- The same decoder along different paths (prefilled or not, other frames cached or not, another
  question before, an interrupted prefill, eviction and re-evaluation) must give identical ids:
  that is the contract (every evaluation runs in one fixed KV layout, see core/decoders/kv_states.py).
"""
import copy
import logging
import threading

import numpy as np
import pytest

from helpers.skips import skip_reason_if_missing

for _mod in ("llama_cpp", "gguf"):
    _reason = skip_reason_if_missing(_mod)
    if _reason:
        print(f"test_llamacpp_decoder skipped: {_reason}")
        pytest.skip(_reason, allow_module_level=True)

from mobilevlm_ros.core.checkpoint import load_checkpoint  # noqa: E402
from mobilevlm_ros.core.decoders import llama_batch, llama_library  # noqa: E402
from mobilevlm_ros.core.decoders.llama_library import LLAMA_LIBRARIES, libraries_option  # noqa: E402
from mobilevlm_ros.core.decoders.llamacpp_decoder import LlamaCppDecoder  # noqa: E402
from mobilevlm_ros.core.decoders.torch_decoder import TorchDecoder  # noqa: E402
from mobilevlm_ros.core.errors import ModelLoadError, RequestError  # noqa: E402
from mobilevlm_ros.core.generation import GenerationParams  # noqa: E402
from mobilevlm_ros.core.gguf_export import export_gguf  # noqa: E402
from mobilevlm_ros.core.pipeline import LoadOptions  # noqa: E402
from mobilevlm_ros.core.prompt import PromptIds, build_prompt  # noqa: E402
from mobilevlm_ros.core.tokenizer import Tokenizer  # noqa: E402
from mobilevlm_ros.core.vision import ImageEmbedding, TorchVision  # noqa: E402
from mobilevlm_ros.tools.bench.fidelity import teacher_forced_logits  # noqa: E402
from helpers.logits import MarginTally, position_errors  # noqa: E402
from helpers.frames import synthetic_frame  # noqa: E402

QUESTIONS = ("What is in the image?", "Describe the scene in detail.", "How many people are there?")
GREEDY16 = GenerationParams(max_new_tokens=16)
F16_ANSWER_BOUND = 0.90
Q8_FIRST_TOKEN_BOUND = 0.80
LIBRARIES_HERE = libraries_option()
for _e in LLAMA_LIBRARIES:
    if _e not in LIBRARIES_HERE:
        print(f"test_llamacpp_decoder: library {_e} not tested: it is not installed (llama-cpp-python; "
              "ik_llama.cpp: scripts/build-ik-llama.sh)")


class World:
    """One tiny checkpoint with its GGUF files, frames' embeddings and the torch reference."""

    def __init__(self, ckpt_dir, out):
        self.ckpt = load_checkpoint(ckpt_dir)
        self.tok = Tokenizer(self.ckpt.tokenizer_path)
        self.llm = export_gguf(self.ckpt, out, ("f16", "q8_0", "q4_k_m"))
        self.out = out
        vision = TorchVision(self.ckpt)
        frames = [synthetic_frame(h, w, seed) for seed, (h, w) in
                  enumerate([(240, 320), (300, 300), (480, 360), (200, 400)])]
        self.images = vision.encode(frames)
        self.torch = TorchDecoder.from_state(self.ckpt.config.llm, self.ckpt.state, self.tok)
        self._ref, self._fresh = {}, {}
        self.library = "llama.cpp"

    def on(self, library):
        """This world with decoders of `library` (files, frames and caches shared)."""
        view = copy.copy(self)
        view.library = library
        return view

    def path(self, quant):
        return self.out / self.llm[quant]["file"]

    def decoder(self, quant="f16", **kw):
        kw.setdefault("threads", 2)
        kw.setdefault("frame_tail", True)       # off by default; the contract must hold with it too
        kw.setdefault("library", self.library)
        return LlamaCppDecoder(self.path(quant), self.tok, quant=quant, **kw)

    def prompt(self, question, image=None):
        n = (image or self.images[0]).embeds.shape[0]
        return build_prompt(self.tok, question, n)

    def fresh(self, i, question, quant="f16"):
        """The contract's baseline: a new decoder, nothing cached, the frame evaluated by its question."""
        key = (self.library, quant, i, question)
        if key not in self._fresh:
            d = self.decoder(quant)
            try:
                img = self.images[i]
                self._fresh[key] = d.generate(self.prompt(question, img), img, GREEDY16).ids
            finally:
                d.close()
        return self._fresh[key]

    def reference(self, i, question):
        """TorchDecoder's greedy answer (cached: the reference is deterministic)."""
        if (i, question) not in self._ref:
            img = self.images[i]
            self._ref[i, question] = self.torch.generate(self.prompt(question, img), img, GREEDY16)
        return self._ref[i, question]


@pytest.fixture(scope="module")
def worlds(tiny_v1, tiny_v2, tmp_path_factory):
    return {"v1": World(tiny_v1, tmp_path_factory.mktemp("llm-v1")),
            "v2": World(tiny_v2, tmp_path_factory.mktemp("llm-v2"))}


@pytest.fixture(scope="module", params=LIBRARIES_HERE)
def library(request):
    return request.param


@pytest.fixture(scope="module")
def v2(worlds, library):
    return worlds["v2"].on(library)


@pytest.fixture(scope="module")
def dec(v2):
    d = v2.decoder("f16")
    yield d
    d.close()


def _forced(world, dec, i, question):
    """(reference logits, decoder logits, reference answer ids) along the reference's greedy answer."""
    img = world.images[i]
    p = world.prompt(question, img)
    ref_ids = world.reference(i, question).ids
    return teacher_forced_logits(world.torch, p, img, ref_ids), teacher_forced_logits(dec, p, img, ref_ids), ref_ids


@pytest.mark.parametrize("quant,bound,min_decided", [("f16", 0.03, 0.8), ("q8_0", 0.30, 0.25)])
def test_logits_match_the_reference_within_rounding(worlds, library, quant, bound, min_decided):
    tally = MarginTally()
    for name, w in worlds.items():
        d = w.on(library).decoder(quant)
        try:
            for i in range(len(w.images)):
                for q in QUESTIONS:
                    ref, got, _ = _forced(w, d, i, q)
                    corr = tally.add(ref, got)
                    assert corr > 0.99, (name, i, q, corr)
        finally:
            d.close()
    print(f"\n[{library} {quant}] teacher-forced: {tally.summary(bound)}")
    assert tally.worst < bound
    assert tally.flipped == 0
    assert tally.decided >= min_decided * tally.positions   # the check is not vacuous


def test_missing_rotary_permutation_is_caught(v2, tmp_path, monkeypatch):
    """The classic silent bug: q/k rows left in HF's half-split layout. llama.cpp loads and runs the
    file happily; only the logits show it."""
    import mobilevlm_ros.core.gguf_export as ge
    monkeypatch.setattr(ge, "permute_qk", lambda w, n: w)
    bad = ge.export_gguf(v2.ckpt, tmp_path, ["f16"])
    d = LlamaCppDecoder(tmp_path / bad["f16"]["file"], v2.tok, threads=2, library=v2.library)
    try:
        errs = [float(position_errors(*_forced(v2, d, i, QUESTIONS[0])[:2]).max()) for i in range(4)]
    finally:
        d.close()
    print(f"\n[f16 without permutation] teacher-forced max error {min(errs):.3f}..{max(errs):.3f} logit std")
    assert min(errs) > 0.3                      # 10x the F16 bound


def test_second_question_evaluates_only_its_text(v2):
    d = v2.decoder("f16", max_kv_states=2)
    try:
        img = v2.images[1]
        p1, p2 = v2.prompt(QUESTIONS[0], img), v2.prompt(QUESTIONS[1], img)
        a = d.generate(p1, img, GREEDY16)
        assert a.cached_prefix_tokens == len(p1.prefix)
        assert a.timings["evaluated_prompt_tokens"] == p1.total        # first call: everything
        b = d.generate(p2, img, GREEDY16)
        assert b.cached_prefix_tokens == len(p2.prefix) + p2.image_tokens
        tail = len(d.frame_tail)
        assert tail == 2                                                # "▁", "\n": in the frame's state
        assert b.timings["evaluated_prompt_tokens"] == len(p2.suffix) - tail   # only the question's text
        assert b.prompt_tokens == p2.total
        c = d.generate(p1, img, GREEDY16)                                  # the same question again
        assert c.ids == a.ids and c.timings["evaluated_prompt_tokens"] == len(p1.suffix) - tail
        other = v2.images[2]
        e = d.generate(v2.prompt(QUESTIONS[0], other), other, GREEDY16)   # new frame: prefix reused
        assert e.cached_prefix_tokens == len(p1.prefix)
        assert e.timings["evaluated_prompt_tokens"] == p1.image_tokens + len(p1.suffix)
        assert d.kv_state_bytes() > 0
    finally:
        d.close()
    # the contract: a question after another, about a cached frame, answers as on a fresh decoder
    assert a.ids == v2.fresh(1, QUESTIONS[0]) and b.ids == v2.fresh(1, QUESTIONS[1])
    assert e.ids == v2.fresh(2, QUESTIONS[0])


def test_answers_do_not_depend_on_the_cache_state(v2):
    """Every path to the same (frame, question) gives the same ids: other frames cached in any order,
    several questions before it, the frame evaluated long ago or just now, evicted and evaluated
    again. Checked for all 4 frames x 3 questions against a fresh decoder per case."""
    d = v2.decoder("f16", max_kv_states=3)
    try:
        order = [(i, q) for q in QUESTIONS for i in (3, 0, 2, 1)]        # 4 frames, LRU of 3: evictions
        for step, (i, q) in enumerate(order + order[::-1]):
            img = v2.images[i]
            got = d.generate(v2.prompt(q, img), img, GREEDY16).ids
            assert got == v2.fresh(i, q), (step, i, q, d.kv_state_keys())
    finally:
        d.close()


def test_frame_tail_goes_with_the_image(v2, dec):
    """The template's "\n" after the image is evaluated with the image, as its token-embedding rows
    (load checks they give the tokens' logits), so a question evaluates only its own text. Against
    a decoder without the tail: the same logits within rounding (other batches). A suffix that does
    not start with the tail is answered from the image's cells alone, the same on every path."""
    p = v2.prompt(QUESTIONS[1], v2.images[0])
    assert [v2.tok.sp.id_to_piece(i) for i in dec.frame_tail] == ["▁", "<0x0A>"]
    assert dec.frame_tail == p.suffix[:2]
    plain = v2.decoder("f16", frame_tail=False)
    assert plain.frame_tail == ()                                          # the default: off
    try:
        for i in (0, 3):
            img = v2.images[i]
            p = v2.prompt(QUESTIONS[1], img)
            ids = dec.generate(p, img, GREEDY16).ids
            want = teacher_forced_logits(plain, p, img, ids)
            got = teacher_forced_logits(dec, p, img, ids)
            assert got.shape == want.shape
            assert np.abs(got - want).max() / want.std() < 0.01
            odd = PromptIds(p.prefix, p.suffix[1:], p.image_tokens)      # starts with "\n", not "▁"
            first = dec.generate(odd, img, GREEDY16)                       # frame cached by the above
            assert first.timings["evaluated_prompt_tokens"] == len(odd.suffix)
            dec.clear_cache()
            assert dec.generate(odd, img, GREEDY16).ids == first.ids       # frame evaluated for it
            assert dec.generate(p, img, GREEDY16).ids == ids               # and the tail is back
            want = teacher_forced_logits(plain, odd, img, first.ids)
            got = teacher_forced_logits(dec, odd, img, first.ids)
            assert np.abs(got - want).max() / want.std() < 0.01
    finally:
        plain.close()


def test_question_batch_padding(v2, dec, monkeypatch):
    """A question batch up to PAD_MAX short of a multiple of 16 is padded with copies of its last token
    (faster kernels) whose cells are removed: the same logits as unpadded within rounding, nothing
    left in the KV cache past the question, and the same answer on every path."""
    mod = llama_batch
    img = v2.images[0]
    words = "is there a red cup on the table near the door or not at all today".split()
    want_len = {m - k for m in (16, 32) for k in range(1, mod.PAD_MAX + 1)}
    assert dec.pad_max == mod.PAD_MAX_BY_LIBRARY[dec.library]        # ik_llama.cpp: no padding
    found = []
    for n in range(1, len(words) + 1):
        p = v2.prompt(" ".join(words[:n]) + "?", img)
        if len(p.suffix) - len(dec.frame_tail) in want_len:
            found.append(p)
    assert found, "no question of a padded length"

    def first_logits(p, pad):
        monkeypatch.setattr(dec, "pad_max", mod.PAD_MAX if pad else 0)
        pos, skip = dec.place(p, img)
        dec.context.question(p.suffix[skip:], pos)
        out = dec.context.logits().copy()
        top = dec.llama.llama_memory_seq_pos_max(dec.kv.mem, 0)
        return out, top, pos + len(p.suffix) - skip - 1
    for p in found:
        padded, top, last = first_logits(p, True)
        plain, top_plain, _ = first_logits(p, False)
        assert top == top_plain == last                                   # the padding's cells are gone
        assert np.abs(padded - plain).max() / plain.std() < 0.01
        monkeypatch.setattr(dec, "pad_max", mod.PAD_MAX)
        a = dec.generate(p, img, GREEDY16).ids
        dec.clear_cache()
        assert dec.generate(p, img, GREEDY16).ids == a


def test_image_longer_than_n_batch(v2, dec):
    """With n_batch 64 the 144 image rows go in three batches instead of one: other arithmetic (the
    contract holds per set of parameters), so the logits agree closely, not bit for bit."""
    d = v2.decoder("f16", n_batch=64)
    try:
        assert d.n_batch == 64 and dec.n_batch >= 144
        for i in (0, 3):
            img = v2.images[i]
            p = v2.prompt(QUESTIONS[1], img)
            ids = dec.generate(p, img, GREEDY16).ids
            want = teacher_forced_logits(dec, p, img, ids)
            got = teacher_forced_logits(d, p, img, ids)
            assert np.abs(got - want).max() / want.std() < 0.01
            assert d.generate(p, img, GREEDY16).ids == d.generate(p, img, GREEDY16).ids
    finally:
        d.close()


def test_lru_eviction(v2):
    d = v2.decoder("f16", max_kv_states=2)
    try:
        imgs = v2.images[:3]
        ans = [d.generate(v2.prompt(QUESTIONS[2], im), im, GREEDY16) for im in imgs]
        assert d.kv_state_keys() == [imgs[1].key, imgs[2].key]           # the first one went
        d.generate(v2.prompt(QUESTIONS[0], imgs[1]), imgs[1], GREEDY16)    # touch 1: now 2 is LRU
        assert d.kv_state_keys() == [imgs[2].key, imgs[1].key]
        again_prompt = v2.prompt(QUESTIONS[2], imgs[0])
        again = d.generate(again_prompt, imgs[0], GREEDY16)                # evicted: image evaluated again
        assert again.cached_prefix_tokens == len(again_prompt.prefix)
        assert again.timings["evaluated_prompt_tokens"] == again_prompt.image_tokens + len(again_prompt.suffix)
        assert again.ids == ans[0].ids                                       # into a recycled buffer
        assert d.kv_state_keys() == [imgs[1].key, imgs[0].key]
        frame_bytes = next(iter(d.kv.frames.values())).nbytes
        for im in v2.images:                                               # evictions: buffers reused
            d.generate(v2.prompt(QUESTIONS[1], im), im, GREEDY16)
        assert len(d.kv.spare) <= 1 and d.kv_state_bytes() <= d.kv.prefix[1].nbytes + 3 * frame_bytes
        d.clear_cache()
        assert d.generate(again_prompt, imgs[0], GREEDY16).ids == ans[0].ids
    finally:
        d.close()


@pytest.mark.parametrize("kind", ["llamacpp", "torch"])
def test_prefill_leaves_a_question_only_its_text(v2, kind):
    """prefill() evaluates prefix + image ahead of time; the answer is identical to the one of a
    fresh decoder of the same kind that evaluates the frame for its question."""
    def make():
        if kind == "llamacpp":
            return v2.decoder("f16")
        return TorchDecoder.from_state(v2.ckpt.config.llm, v2.ckpt.state, v2.tok)

    def without_prefill(i, q):
        fresh = make()
        try:
            return fresh.generate(v2.prompt(q, v2.images[i]), v2.images[i], GREEDY16).ids
        finally:
            fresh.close()
    d = make()
    try:
        img = v2.images[2]
        p = v2.prompt(QUESTIONS[0], img)
        assert d.prefill(p, img) is True and d.kv_state_keys() == [img.key]
        assert d.prefill(p, img) is False                  # cached already: nothing evaluated
        g = d.generate(p, img, GREEDY16)
        assert g.cached_prefix_tokens == len(p.prefix) + p.image_tokens
        if kind == "llamacpp":
            assert g.timings["evaluated_prompt_tokens"] == len(p.suffix) - len(d.frame_tail)
        assert g.ids == without_prefill(2, QUESTIONS[0])
        # an interrupted prefill caches nothing, and the frame is evaluated by its question instead
        other = v2.images[3]
        calls = []

        def interrupt():
            calls.append(1)                                # llama.cpp polls it during the evaluation
            return len(calls) > 3 or kind == "torch"       # torch evaluates in one call, checked first
        assert d.prefill(v2.prompt(QUESTIONS[0], other), other, interrupt) is False
        assert d.kv_state_keys() == [img.key]
        if kind == "llamacpp":
            assert len(calls) == 4                         # it stopped inside the image evaluation
        g = d.generate(v2.prompt(QUESTIONS[1], other), other, GREEDY16)
        assert g.ids == without_prefill(3, QUESTIONS[1]) and d.kv_state_keys() == [img.key, other.key]
        # a prefill that is never interrupted, behind others, also answers the same
        assert d.prefill(v2.prompt("", v2.images[0]), v2.images[0], lambda: False) is True
        g = d.generate(v2.prompt(QUESTIONS[2], v2.images[0]), v2.images[0], GREEDY16)
        assert g.ids == without_prefill(0, QUESTIONS[2])
    finally:
        d.close()


def test_interrupt_returns_within_milliseconds(v2):
    """A request that arrives during an idle prefill waits for the next graph node, not the image."""
    import time
    d = v2.decoder("f16")
    try:
        img = v2.images[1]
        polls, fired = [], []

        def interrupt():
            polls.append(1)
            if len(polls) == 5:
                fired.append(time.perf_counter())
            return len(polls) >= 5
        assert d.prefill(v2.prompt("", img), img, interrupt) is False
        waited_ms = (time.perf_counter() - fired[0]) * 1e3
        print(f"\nprefill returned {waited_ms:.2f} ms after the interrupt ({len(polls)} polls)")
        assert waited_ms < 50 and d.kv_state_keys() == []
        assert d.generate(v2.prompt(QUESTIONS[0], img), img, GREEDY16).ids == v2.fresh(1, QUESTIONS[0])
    finally:
        d.close()


def test_context_size_bounds_the_answer(v2):
    """n_ctx counts the cells of one prompt and its answer (cached frames live outside the context):
    an answer running into the end of the context stops there ("length"), no error."""
    d = v2.decoder("f16", max_kv_states=4, n_ctx=256)
    try:
        assert d.n_ctx == 256
        for i in range(4):
            d.generate(v2.prompt(QUESTIONS[0], v2.images[i]), v2.images[i], GREEDY16)
        assert d.kv_state_keys() == [im.key for im in v2.images]     # all four kept
        p = v2.prompt(QUESTIONS[0], v2.images[1])
        b = d.generate(p, v2.images[1], GREEDY16)
        g = d.generate(p, v2.images[1], GenerationParams(max_new_tokens=200, min_new_tokens=200))
        assert g.finish_reason == "length" and len(g.ids) == d.n_ctx - p.total + 1
        assert g.ids[:len(b.ids)] == b.ids
        c = d.generate(p, v2.images[1], GREEDY16)              # still cached, still the same
        assert c.ids == b.ids and c.cached_prefix_tokens == len(p.prefix) + p.image_tokens
    finally:
        d.close()


def test_cancellation_between_tokens(v2, dec):
    img = v2.images[0]
    p = v2.prompt(QUESTIONS[0], img)
    seen = []
    g = dec.generate(p, img, GenerationParams(max_new_tokens=16, min_new_tokens=16),
                     on_token=lambda t, s: seen.append(t), cancel=lambda: len(seen) >= 3)
    assert g.finish_reason == "cancelled" and len(g.ids) == 3 and seen == g.ids
    g0 = dec.generate(p, img, GREEDY16, cancel=lambda: True)
    assert g0.finish_reason == "cancelled" and g0.ids == []
    # nothing of the cancelled answers stayed behind
    assert dec.generate(p, img, GREEDY16).ids == v2.fresh(0, QUESTIONS[0])


def test_streaming_callback_order(v2, dec):
    img = v2.images[3]
    calls = []
    g = dec.generate(v2.prompt(QUESTIONS[1], img), img, GREEDY16, on_token=lambda t, s: calls.append((t, s)))
    assert [t for t, _ in calls] == g.ids
    assert calls[-1][1] == g.text
    for (_, s), ids in zip(calls, (g.ids[:i + 1] for i in range(len(g.ids)))):
        assert s == v2.tok.decode(ids).rstrip("\ufffd").strip()     # an unfinished character held back
    assert g.finish_reason in ("stop", "length") and g.completion_tokens == len(g.ids)
    assert g.first_token_ms > 0 and g.decode_ms > 0 and g.prefill_ms > 0


def test_min_new_tokens_and_length(v2, dec):
    img = v2.images[2]
    g = dec.generate(v2.prompt(QUESTIONS[0], img), img, GenerationParams(max_new_tokens=24, min_new_tokens=24))
    assert len(g.ids) == 24 and g.finish_reason == "length"
    g = dec.generate(v2.prompt(QUESTIONS[0], img), img, GenerationParams(max_new_tokens=5))
    assert len(g.ids) == 5 and g.finish_reason == "length"


def test_sampling_is_reproducible_with_a_seed(v2, dec):
    img = v2.images[1]
    p = v2.prompt(QUESTIONS[0], img)

    def run(seed, top_p=1.0):
        return dec.generate(p, img, GenerationParams(max_new_tokens=12, min_new_tokens=12, temperature=8.0,
                                                     top_p=top_p, seed=seed)).ids
    a, b = run(123), run(123)
    assert a == b and len(a) == 12
    assert len({tuple(run(s)) for s in (1, 2, 3, 4)}) > 1
    assert run(7, top_p=0.5) == run(7, top_p=0.5)
    assert run(2 ** 32 - 1) == run(2 ** 32 - 1)      # llama.cpp's "random seed" value stays fixed
    # sampling did not disturb the cache: greedy answers as a fresh decoder
    assert dec.generate(p, img, GREEDY16).ids == v2.fresh(1, QUESTIONS[0])


def test_bad_requests(v2, dec):
    img = v2.images[0]
    p = v2.prompt(QUESTIONS[0], img)
    with pytest.raises(RequestError, match="width"):
        dec.generate(p, ImageEmbedding(np.zeros((144, 100), np.float32)), GREEDY16)
    with pytest.raises(RequestError, match="rows"):
        dec.generate(p, ImageEmbedding(np.zeros((10, 256), np.float32)), GREEDY16)
    with pytest.raises(RequestError, match="2-D"):
        dec.generate(p, ImageEmbedding(np.zeros((144,), np.float32)), GREEDY16)
    nan = img.embeds.copy()
    nan[3, 5] = np.nan
    with pytest.raises(RequestError, match="NaN"):
        dec.generate(p, ImageEmbedding(nan), GREEDY16)
    with pytest.raises(RequestError, match="vocabulary"):
        dec.generate(PromptIds(p.prefix, (*p.suffix, 99999), p.image_tokens), img, GREEDY16)
    with pytest.raises(RequestError, match="vocabulary"):
        dec.generate(PromptIds(p.prefix, (-5,), p.image_tokens), img, GREEDY16)
    with pytest.raises(RequestError, match="context"):
        dec.generate(v2.prompt("robot " * 2000, img), img, GREEDY16)
    with pytest.raises(RequestError, match="max_new_tokens"):
        dec.generate(p, img, GenerationParams(max_new_tokens=0))
    with pytest.raises(RequestError, match="text before and after"):
        dec.generate(PromptIds(p.prefix, (), p.image_tokens), img, GREEDY16)
    # after all that, a normal request still gets the answer of a fresh decoder
    assert dec.generate(p, img, GREEDY16).ids == v2.fresh(0, QUESTIONS[0])


def test_load_errors_and_close(v2, tmp_path):
    with pytest.raises(ModelLoadError, match="missing file"):
        LlamaCppDecoder(tmp_path / "nope.gguf", v2.tok, library=v2.library)
    (tmp_path / "text.gguf").write_text("hello, not a model\n" * 100)
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        LlamaCppDecoder(tmp_path / "text.gguf", v2.tok, library=v2.library)
    data = v2.path("q8_0").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="could not load"):
        LlamaCppDecoder(tmp_path / "cut.gguf", v2.tok, library=v2.library)
    with pytest.raises(ModelLoadError, match="max_kv_states"):
        v2.decoder("q8_0", max_kv_states=0)
    # artifacts: the manifest names the file; a missing quant and a mismatched model are explained
    manifest = {"llm": v2.llm, "hidden_size": 256}
    d = LlamaCppDecoder.from_artifacts(v2.out, manifest, v2.tok,
                                       LoadOptions(quant="q8_0", threads=1, max_kv_states=3))
    assert d.describe()["quant"] == "q8_0" and d.max_kv_states == 3 and d.threads == 1
    d.close()
    d.close()                                           # idempotent
    with pytest.raises(RequestError, match="closed"):
        d.generate(v2.prompt(QUESTIONS[0]), v2.images[0], GREEDY16)
    with pytest.raises(ModelLoadError, match="no llm file for 'q5_1'"):
        LlamaCppDecoder.from_artifacts(v2.out, manifest, v2.tok, LoadOptions(quant="q5_1"))
    with pytest.raises(ModelLoadError, match="hidden_size 512"):
        LlamaCppDecoder.from_artifacts(v2.out, {**manifest, "hidden_size": 512}, v2.tok,
                                       LoadOptions(quant="q8_0", threads=1))


def test_threads_and_logging(v2, caplog):
    with caplog.at_level(logging.DEBUG, logger="mobilevlm_ros.llama_cpp"):
        d = v2.decoder("q4_k_m", threads=1, threads_batch=2)
    try:
        assert (d.threads, d.threads_batch) == (1, 2)
        assert d.llama.llama_n_threads(d.context.ctx) == 1 and d.llama.llama_n_threads_batch(d.context.ctx) == 2
        if d.library == "llama.cpp":     # ik_llama.cpp's llama_n_seq_max returns the KV size (old llama.cpp's)
            assert d.llama.llama_n_seq_max(d.context.ctx) == 1         # one sequence: the fixed KV layout
        assert any("n_ctx" in r.getMessage() for r in caplog.records)     # the library's log is routed
        img = v2.images[0]
        g = d.generate(v2.prompt(QUESTIONS[0], img), img, GREEDY16)
        assert g.ids and g.finish_reason in ("stop", "length")
    finally:
        d.close()
    # generate from another thread (the node's worker): no thread affinity
    d = v2.decoder("q4_k_m")
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("g", d.generate(v2.prompt(QUESTIONS[0]), v2.images[0],
                                                                           GREEDY16)))
    t.start()
    t.join()
    assert box["g"].ids
    d.close()


def test_weight_layout_avoids_amx(v2, caplog):
    """llama.cpp's AMX matmul segfaults on Sapphire Rapids (ggml-org/llama.cpp#20824): on a CPU
    backend with AMX the weights stay in the plain layout; elsewhere the repacked one is used.
    Repacked weights are read, not mapped (the mapped pages would stay resident beside the copy)."""
    import llama_cpp as lc

    from mobilevlm_ros.core.decoders.llama_library import cpu_has_amx

    def buffers(records):
        return [r.getMessage() for r in records if "model buffer size" in r.getMessage()]

    def mapped():
        with open("/proc/self/maps", encoding="utf-8") as f:
            return str(v2.path("q4_k_m")) in f.read()

    if v2.library == "ik_llama.cpp":             # no AMX code; repacked at load, so read, not mapped
        d = v2.decoder("q4_k_m")
        try:
            assert d.extra_buffers and not d.mmap and not mapped()
        finally:
            d.close()
        return

    with caplog.at_level(logging.DEBUG, logger="mobilevlm_ros.llama_cpp"):
        auto = v2.decoder("q4_k_m")
    try:
        assert auto.extra_buffers is (not cpu_has_amx(lc))
        assert auto.describe()["extra_buffers"] is auto.extra_buffers
        assert auto.mmap is (not auto.extra_buffers) and mapped() is auto.mmap
        loaded = buffers(caplog.records)
        assert loaded and not any("AMX" in m for m in loaded), loaded
        img = v2.images[0]
        want = auto.generate(v2.prompt(QUESTIONS[0], img), img, GREEDY16).ids
    finally:
        auto.close()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="mobilevlm_ros.llama_cpp"):
        plain = v2.decoder("q4_k_m", extra_buffers=False)
    try:
        loaded = buffers(caplog.records)
        assert loaded and not any("AMX" in m or "REPACK" in m for m in loaded), loaded
        assert plain.mmap and mapped()
        got = plain.generate(v2.prompt(QUESTIONS[0], img), img, GREEDY16).ids
        assert got
        if not auto.extra_buffers:
            assert got == want          # the same layout, the same arithmetic
    finally:
        plain.close()


def test_auto_falls_back_when_the_ik_build_does_not_load(v2, tmp_path, monkeypatch, caplog):
    """auto with an ik_llama.cpp build that this CPU could run but that does not load (a damaged
    file): llama.cpp, the reason logged; asked for by name: the error."""
    if v2.library != "llama.cpp":
        pytest.skip("library-independent: runs once, with the llama.cpp world")
    from mobilevlm_ros.core.decoders import ik_llama_api, ik_llama_lib
    for name in ("libllama.so", "libggml.so"):
        (tmp_path / name).write_bytes(b"damaged")
    (tmp_path / "build.json").write_text('{"cpu_flags": ["sse2"]}')
    monkeypatch.setenv("MOBILEVLM_IK_LLAMA_DIR", str(tmp_path))
    monkeypatch.setattr(ik_llama_lib, "_lib", None)
    monkeypatch.setattr(ik_llama_api, "_api", None)
    monkeypatch.setattr(ik_llama_lib, "cpu_flags", lambda: {"sse2"})
    manifest = {"llm": v2.llm, "hidden_size": 256}
    with caplog.at_level(logging.INFO, logger="mobilevlm_ros"):
        d = LlamaCppDecoder.from_artifacts(v2.out, manifest, v2.tok, LoadOptions(quant="q8_0", threads=1))
    try:
        assert d.library == "llama.cpp"
        assert any("auto: the ik_llama.cpp library" in r.getMessage() and "does not load" in r.getMessage()
                   for r in caplog.records)
    finally:
        d.close()
    with pytest.raises(ModelLoadError, match="does not load"):
        LlamaCppDecoder(v2.path("q8_0"), v2.tok, library="ik_llama.cpp")


def test_library_choice(monkeypatch):
    """auto: ik_llama.cpp for a CPU-only decoder where it is built and the CPU has every
    instruction-set flag of the CPU it was built for; llama.cpp otherwise (GPU layers: the build
    users make for their GPU)."""
    mod = llama_library
    monkeypatch.setattr(mod, "library_available", lambda e: True)
    monkeypatch.setattr(mod, "_ik_build_info", lambda: {"cpu_flags": ["sse2", "avx", "avx2", "fma", "f16c"]})
    monkeypatch.setattr(mod, "_cpu_flags", lambda: {"sse2", "avx", "avx2", "fma", "f16c"})
    assert mod.choose_library("auto", 0)[0] == "ik_llama.cpp"
    assert mod.choose_library("auto", -1) == ("llama.cpp", "auto: layers offloaded to a GPU")
    assert mod.choose_library("llama.cpp", 0) == ("llama.cpp", "asked for")
    assert mod.choose_library("ik_llama.cpp", 99)[0] == "ik_llama.cpp"
    monkeypatch.setattr(mod, "_cpu_flags", lambda: {"sse2", "avx"})
    library, why = mod.choose_library("auto", 0)
    assert library == "llama.cpp" and "avx2, f16c, fma" in why
    monkeypatch.setattr(mod, "library_available", lambda e: e == "llama.cpp")
    assert mod.choose_library("auto", 0) == ("llama.cpp", "auto: ik_llama.cpp is not built in this venv "
                                                         "(opt-in: scripts/build-ik-llama.sh)")
    with pytest.raises(ModelLoadError, match="unknown llama.cpp library 'vllm'"):
        mod.choose_library("vllm", 0)
    # the benches' --libraries: named ones, or every installed one
    assert mod.libraries_option("ik_llama.cpp, llama.cpp") == ["ik_llama.cpp", "llama.cpp"]
    assert mod.libraries_option("") == ["llama.cpp"]
    with pytest.raises(ValueError, match=r"unknown library \['vllm'\]"):
        mod.libraries_option("llama.cpp,vllm")
