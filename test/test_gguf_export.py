"""gguf_export: checkpoint LLM -> GGUF (F16 written here, Q8_0 / Q4_K_M by llama.cpp's quantizer).

Checked: the metadata llama.cpp needs (hparams, full SentencePiece vocabulary with token types),
tensor names and types, that llama.cpp's loader and tokenizer accept every file, the manifest
section, vocabulary padding, and that the conversion is driven by shapes alone: a GQA model with
head dim 80 (the MobileLLaMA-2.7B head size) gives llama.cpp the logits of the torch reference.
Decoding parity and the rotary-permutation check are in test_llamacpp_decoder.py.
"""
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from helpers.skips import skip_reason_if_missing

for _mod in ("llama_cpp", "gguf"):
    _reason = skip_reason_if_missing(_mod)
    if _reason:
        print(f"test_gguf_export skipped: {_reason}")
        pytest.skip(_reason, allow_module_level=True)

import gguf  # noqa: E402
import torch  # noqa: E402

from mobilevlm_ros.core.artifacts import gguf_filename, sha256_file  # noqa: E402
from mobilevlm_ros.core.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from mobilevlm_ros.core.config import LlamaConfig  # noqa: E402
from mobilevlm_ros.core.errors import ModelLoadError  # noqa: E402
from mobilevlm_ros.core.gguf_export import (QUANT_FTYPES, export_gguf, gguf_tensor_name,  # noqa: E402
                                            permute_qk)
from mobilevlm_ros.core.tokenizer import Tokenizer  # noqa: E402

QUANTS = ("f16", "q8_0", "q4_k_m")


@pytest.fixture(scope="session")
def gguf_v2(tiny_v2, tmp_path_factory):
    """(checkpoint, artifacts folder, manifest llm section) of tiny-v2 in all three quantizations."""
    ckpt = load_checkpoint(tiny_v2)
    out = tmp_path_factory.mktemp("gguf-v2")
    steps = []
    section = export_gguf(ckpt, out, QUANTS, progress=lambda s, t, d: steps.append((s, t, d)))
    return ckpt, out, section, steps


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


def test_manifest_section_and_progress(gguf_v2):
    ckpt, out, section, steps = gguf_v2
    assert list(section) == list(QUANTS)
    for q, e in section.items():
        p = out / e["file"]
        assert e["file"] == gguf_filename(q)
        assert p.stat().st_size == e["bytes"] and e["sha256"] == sha256_file(p)
    assert not list(out.glob("*.tmp"))
    # smaller as they should be: q8_0 about half of f16, q4_k_m smaller still
    assert section["q4_k_m"]["bytes"] < section["q8_0"]["bytes"] < 0.6 * section["f16"]["bytes"]
    nums = [s for s, _, _ in steps]
    assert nums == list(range(1, len(steps) + 1)) and steps[-1][1] == len(steps)


def test_metadata(gguf_v2):
    ckpt, out, section, _ = gguf_v2
    cfg = ckpt.config.llm
    tok = Tokenizer(ckpt.tokenizer_path)
    for q in QUANTS:
        r = gguf.GGUFReader(out / section[q]["file"])
        assert _field(r, "general.architecture") == "llama"
        assert _field(r, "general.file_type") == QUANT_FTYPES[q]
        expect = {"llama.context_length": cfg.max_position_embeddings,
                  "llama.embedding_length": cfg.hidden_size,
                  "llama.block_count": cfg.num_hidden_layers,
                  "llama.feed_forward_length": cfg.intermediate_size,
                  "llama.attention.head_count": cfg.num_attention_heads,
                  "llama.attention.head_count_kv": cfg.num_key_value_heads,
                  "llama.rope.dimension_count": cfg.head_dim,
                  "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                  "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.model": "llama",
                  "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}
        for k, v in expect.items():
            assert _field(r, k) == v, k
        assert math.isclose(_field(r, "llama.rope.freq_base"), cfg.rope_theta)
        assert math.isclose(_field(r, "llama.attention.layer_norm_rms_epsilon"), cfg.rms_norm_eps,
                            rel_tol=1e-6)
        tokens = _field(r, "tokenizer.ggml.tokens")
        types = _field(r, "tokenizer.ggml.token_type")
        scores = _field(r, "tokenizer.ggml.scores")
        assert len(tokens) == len(types) == len(scores) == tok.vocab_size == cfg.vocab_size
        assert tokens[:3] == ["<unk>", "<s>", "</s>"]
        assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
        assert tokens[3 + 0x0A] == "<0x0A>" and types[3 + 0x0A] == gguf.TokenType.BYTE
        assert sum(t == gguf.TokenType.BYTE for t in types) == 256
        assert all(tokens[i] == tok.sp.id_to_piece(i) for i in range(0, tok.vocab_size, 97))
        tensors = {t.name: t for t in r.tensors}
        assert len(tensors) == 3 + 9 * cfg.num_hidden_layers
        for name, t in tensors.items():
            if name.endswith("norm.weight"):
                assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            elif q == "f16":
                assert t.tensor_type == gguf.GGMLQuantizationType.F16, name
        if q == "q8_0":
            assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
        if q == "q4_k_m":
            assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_K
        # GGUF shapes are [in, out]
        assert list(tensors["blk.0.ffn_down.weight"].shape) == [cfg.intermediate_size, cfg.hidden_size]


def test_f16_tensors_hold_the_weights(gguf_v2):
    """token_embd is the embedding as float16; attn_q/attn_k are the permuted projections."""
    ckpt, out, section, _ = gguf_v2
    cfg, state = ckpt.config.llm, ckpt.llm_state()
    r = gguf.GGUFReader(out / section["f16"]["file"])
    t = {x.name: np.asarray(x.data) for x in r.tensors}
    emb = state["model.embed_tokens.weight"].float().numpy().astype(np.float16)
    assert np.array_equal(t["token_embd.weight"], emb)
    q = state["model.layers.1.self_attn.q_proj.weight"].float().numpy()
    assert np.array_equal(t["blk.1.attn_q.weight"], permute_qk(q, cfg.num_attention_heads).astype(np.float16))
    assert not np.array_equal(t["blk.1.attn_q.weight"], q.astype(np.float16))
    v = state["model.layers.1.self_attn.v_proj.weight"].float().numpy().astype(np.float16)
    assert np.array_equal(t["blk.1.attn_v.weight"], v)
    assert t["output_norm.weight"].dtype == np.float32


def test_permute_qk_is_the_rotary_layout_change():
    """HF rotates (x_i, x_{i+d/2}); after permute_qk the same pair sits at rows (2i, 2i+1)."""
    heads, hd = 3, 10
    w = np.arange(heads * hd * 2, dtype=np.float32).reshape(heads * hd, 2)
    p = permute_qk(w, heads)
    for h in range(heads):
        for i in range(hd // 2):
            assert np.array_equal(p[h * hd + 2 * i], w[h * hd + i])
            assert np.array_equal(p[h * hd + 2 * i + 1], w[h * hd + i + hd // 2])
    with pytest.raises(ModelLoadError):
        permute_qk(np.zeros((9, 2), np.float32), 2)


def test_tensor_names():
    assert gguf_tensor_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"
    assert gguf_tensor_name("model.layers.12.self_attn.o_proj.weight") == "blk.12.attn_output.weight"
    assert gguf_tensor_name("model.layers.3.post_attention_layernorm.weight") == "blk.3.ffn_norm.weight"
    assert gguf_tensor_name("model.layers.3.self_attn.rotary_emb.inv_freq") is None


def test_llama_cpp_loads_every_file_and_tokenizes_like_sentencepiece(gguf_v2):
    import llama_cpp as lc

    from mobilevlm_ros.core.decoders.llama_log import route_llama_logs
    from mobilevlm_ros.core.decoders.llamacpp_decoder import LlamaCppDecoder
    from mobilevlm_ros.core.prompt import build_prompt
    ckpt, out, section, _ = gguf_v2
    tok = Tokenizer(ckpt.tokenizer_path)
    for q in QUANTS:
        dec = LlamaCppDecoder(out / section[q]["file"], tok, quant=q, threads=1, n_ctx=512)
        assert dec.n_embd == ckpt.config.llm.hidden_size and dec.n_vocab == ckpt.config.llm.vocab_size
        assert dec.describe() == {"decoder": "llamacpp", "library": "llama.cpp", "quant": q,
                                  "file": str(out / section[q]["file"]),
                                  "threads": 1, "gpu_layers": 0, "n_ctx": 512,
                                  "extra_buffers": dec.extra_buffers, "mmap": dec.mmap}
        dec.close()
    # llama.cpp's own tokenizer, from the exported vocabulary, agrees with SentencePiece
    route_llama_logs()
    mp = lc.llama_model_default_params()
    mp.vocab_only = True
    model = lc.llama_model_load_from_file(str(out / section["f16"]["file"]).encode(), mp)
    assert model
    try:
        vocab = lc.llama_model_get_vocab(model)
        p = build_prompt(tok, "What colour is the 1234 robot? Ünïcode ✓ tab\there", 144)
        before, after = "A chat between", "\nWhat colour is the 1234 robot? Ünïcode ✓ tab\there ASSISTANT:"
        for text, bos in ((before, True), (after, False)):
            raw = text.encode()
            buf = (lc.llama_token * 256)()
            n = lc.llama_tokenize(vocab, raw, len(raw), buf, 256, bos, False)
            assert list(buf[:n]) == tok.encode(text, add_bos=bos), text
        assert p.prefix[0] == 1
    finally:
        lc.llama_model_free(model)


def _synthetic_checkpoint(tokenizer_path: Path, *, hidden, layers, heads, kv_heads, ffn, vocab, seed=0):
    """An LLM-only Checkpoint stand-in with random weights (q/k scaled up so RoPE matters)."""
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab)
    g = torch.Generator().manual_seed(seed)
    hd = hidden // heads

    def rnd(*shape, gain=1.0):
        return (torch.randn(*shape, generator=g) * gain / math.sqrt(shape[-1])).to(torch.bfloat16)
    state = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g).to(torch.bfloat16),
             "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
             "lm_head.weight": rnd(vocab, hidden, gain=4.0)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state.update({p + "self_attn.q_proj.weight": rnd(heads * hd, hidden, gain=3.0),
                      p + "self_attn.k_proj.weight": rnd(kv_heads * hd, hidden, gain=3.0),
                      p + "self_attn.v_proj.weight": rnd(kv_heads * hd, hidden),
                      p + "self_attn.o_proj.weight": rnd(hidden, heads * hd),
                      p + "mlp.gate_proj.weight": rnd(ffn, hidden), p + "mlp.up_proj.weight": rnd(ffn, hidden),
                      p + "mlp.down_proj.weight": rnd(hidden, ffn),
                      p + "input_layernorm.weight": (1 + 0.1 * torch.randn(hidden, generator=g)).to(torch.bfloat16),
                      p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)})
    folder = tokenizer_path.parent

    class _Cfg:
        llm = cfg
    ckpt = Checkpoint.__new__(Checkpoint)
    ckpt.path, ckpt.config, ckpt.state, ckpt.vision = folder, _Cfg(), state, None
    return ckpt


def _torch_logits(ckpt, ids):
    from mobilevlm_ros.core.llama import LlamaForCausalLM
    cfg = ckpt.config.llm
    with torch.device("meta"):
        llm = LlamaForCausalLM(cfg)
    llm.load_state_dict({k: v.float() for k, v in ckpt.state.items()}, strict=True, assign=True)
    with torch.inference_mode():
        return llm(llm.embed(torch.tensor([ids])))[0][0, -1].numpy()


def _llama_logits(path, tok, ids):
    from mobilevlm_ros.core.decoders.llamacpp_decoder import LlamaCppDecoder
    dec = LlamaCppDecoder(path, tok, threads=2, n_ctx=256, max_kv_states=1)
    try:
        dec.context.tokens(ids, 0, logits=True)
        return dec.context.logits().copy()
    finally:
        dec.close()


def test_shape_driven_head_dim_80_gqa_and_padded_vocab(tiny_v2, tmp_path):
    """Head dim 80 (MobileLLaMA-2.7B), grouped KV heads, embedding rows beyond the tokenizer's
    pieces: llama.cpp's logits on the F16 file match the torch reference's (and do not without the
    rotary permutation, so the comparison is sharp enough to see it)."""
    tok = Tokenizer(Path(tiny_v2) / "tokenizer.model")
    ckpt = _synthetic_checkpoint(Path(tiny_v2) / "tokenizer.model", hidden=320, layers=2, heads=4,
                                 kv_heads=2, ffn=512, vocab=tok.vocab_size + 48)
    section = export_gguf(ckpt, tmp_path, ["f16", "q8_0"])
    r = gguf.GGUFReader(tmp_path / section["f16"]["file"])
    assert _field(r, "llama.rope.dimension_count") == 80
    assert _field(r, "llama.attention.head_count_kv") == 2
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == tok.vocab_size + 48 and tokens[-1] == f"[PAD{tok.vocab_size + 47}]"
    assert set(types[tok.vocab_size:]) == {gguf.TokenType.UNUSED}

    ids = tok.encode("A chat between a curious user and an artificial intelligence assistant. "
                     "USER: what is on the table near the window? ASSISTANT:", add_bos=True)
    ref = _torch_logits(ckpt, ids)
    got = _llama_logits(tmp_path / section["f16"]["file"], tok, ids)
    err = float(np.abs(got - ref).max() / ref.std())
    print(f"head dim 80 / GQA: max |llama.cpp - torch| = {err:.4f} logit std (f16)")
    assert err < 0.05 and int(got.argmax()) == int(ref.argmax())

    import mobilevlm_ros.core.gguf_export as ge
    orig = ge.permute_qk
    try:
        ge.permute_qk = lambda w, n: w
        bad = export_gguf(ckpt, tmp_path / "noperm", ["f16"])
    finally:
        ge.permute_qk = orig
    got_bad = _llama_logits(tmp_path / "noperm" / bad["f16"]["file"], tok, ids)
    err_bad = float(np.abs(got_bad - ref).max() / ref.std())
    print(f"  without the rotary permutation: {err_bad:.4f} logit std")
    assert err_bad > 10 * err


def test_bad_inputs(gguf_v2, tmp_path):
    ckpt, out, _, _ = gguf_v2
    with pytest.raises(ValueError, match="q3"):
        export_gguf(ckpt, tmp_path, ["q3"])
    # a checkpoint missing a layer weight
    broken = Checkpoint(ckpt.path, ckpt.config, dict(ckpt.state), ckpt.vision)
    del broken.state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ModelLoadError, match="up_proj"):
        export_gguf(broken, tmp_path, ["f16"])
    # a config that disagrees with the weights
    bad_cfg = dataclasses.replace(ckpt.config, llm=dataclasses.replace(ckpt.config.llm, intermediate_size=512))
    with pytest.raises(ModelLoadError, match="shape"):
        export_gguf(Checkpoint(ckpt.path, bad_cfg, ckpt.state, ckpt.vision), tmp_path, ["f16"])
    assert not list(tmp_path.glob("*.gguf"))


def test_progress_true_prints(gguf_v2, tmp_path, capsys):
    ckpt = gguf_v2[0]
    export_gguf(ckpt, tmp_path, ["q8_0"], progress=True)
    err = capsys.readouterr().err
    assert "gguf [" in err and "quantized llm-q8_0.gguf" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llm-q8_0.gguf"]   # the f16 source is gone


def test_quiet_llama_cpp(gguf_v2, capfd, caplog):
    """llama.cpp's log does not reach stderr; it goes to Python logging at DEBUG."""
    import logging

    from mobilevlm_ros.core.decoders.llamacpp_decoder import LlamaCppDecoder
    ckpt, out, section, _ = gguf_v2
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG, logger="mobilevlm_ros.llama_cpp"):
        dec = LlamaCppDecoder(out / section["q8_0"]["file"], Tokenizer(ckpt.tokenizer_path), threads=1)
        dec.close()
    captured = capfd.readouterr()
    assert "llama" not in captured.err and "ggml" not in captured.err, captured.err[:500]
    assert any("llama_context" in r.getMessage() or "llama_model_loader" in r.getMessage()
               for r in caplog.records)
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "mobilevlm_ros.llama_cpp")
