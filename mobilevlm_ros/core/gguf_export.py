"""The MobileLLaMA / Vicuna half of a MobileVLM checkpoint -> GGUF files for llama.cpp.

    export_gguf(checkpoint, out_dir, quants=("f16", "q8_0", "q4_k_m")) -> manifest "llm" section

Writes `llm-f16.gguf` with the `gguf` package (architecture "llama"), then derives each quantized file
from it with llama.cpp's own quantizer (`llama_model_quantize`). The conversion is driven by the
tensor shapes and the config alone (any hidden size, head dim 64/80/128, GQA), one tensor at a time:
the checkpoint's weights are memory-mapped and only the tensor being written is held in memory.

What llama.cpp expects that a plain copy would get wrong:
- Rotary layout. HF LLaMA rotates the two halves of each head (i, i + d/2); llama.cpp's LLaMA graph
  rotates adjacent pairs (2i, 2i + 1). The rows of q_proj and k_proj are reordered per head so that
  llama.cpp computes the same attention scores (`permute_qk`). Without it the file loads and runs
  and answers differently: nothing fails, which is why the tests compare greedy answers.
- Names: HF `model.layers.N.self_attn.q_proj.weight` -> GGUF `blk.N.attn_q.weight`, and so on.
- Types: 2-D weights F16, 1-D norm weights F32 (as llama.cpp keeps them in every quantization).
- Vocabulary: the full SentencePiece model (pieces, scores, token types) so that llama.cpp's own
  tokenizer agrees with ours; padded with unused tokens up to the embedding's row count. A folder
  with a byte-level BPE tokenizer.json instead (no tokenizer.model; e.g. the SmolLM2 test model of
  `mobilevlm-make-tiny --language-model smollm2`) gets a "gpt2" vocabulary: tokens, token types, merges,
  the special ids and llama.cpp's name of the pre-tokenizer.
- Tied embeddings (tie_word_embeddings): no output.weight; llama.cpp then uses token_embd as the
  output head. Grouped-query attention: head_count_kv, k/v rows of the kv heads.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import gguf  # (an ImportError here tells mobilevlm-export that GGUF export is unavailable)

from .artifacts import gguf_filename, sha256_file
from .errors import ModelLoadError
from .tokenizer import TOKENIZER_JSON

log = logging.getLogger(__name__)

# quant name -> llama_ftype (llama.h)
# (llama.cpp repacks q4_0 and iq4_nl rows for AVX2 / AVX-512 at load time; the k-quants and iq4_xs
# need rows of 256 values: tensors whose rows are not get a fallback type, see llama_model_quantize)
QUANT_FTYPES = {"f16": int(gguf.LlamaFileType.MOSTLY_F16),
                "q8_0": int(gguf.LlamaFileType.MOSTLY_Q8_0),
                "q4_k_m": int(gguf.LlamaFileType.MOSTLY_Q4_K_M),
                "q4_0": int(gguf.LlamaFileType.MOSTLY_Q4_0),
                "iq4_xs": int(gguf.LlamaFileType.MOSTLY_IQ4_XS),
                "q5_k_m": int(gguf.LlamaFileType.MOSTLY_Q5_K_M)}

Progress = Callable[[int, int, str], None]

# HF module path inside a decoder layer -> GGUF tensor stem
# HF -> GGUF tensor names come from the gguf package's own table for the llama architecture
# (gguf.TensorNameMap), the one llama.cpp's convert_hf_to_gguf.py uses; only the LLM's weights
_LAYER_MODULES = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                  "mlp.down_proj")            # one decoder layer, in llama.cpp's customary order
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)   # buffers some transformers versions saved


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a q_proj/k_proj weight [n_heads * head_dim, in] from HF's half-split
    rotary layout to llama.cpp's interleaved one: within each head, new row 2i is old row i and
    new row 2i+1 is old row i + head_dim/2."""
    rows = w.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ModelLoadError(f"cannot split {rows} rows into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return np.ascontiguousarray(w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of permute_qk: llama.cpp's interleaved rotary rows -> HF's half-split layout
    (for weights read from a GGUF file)."""
    rows = w.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ModelLoadError(f"cannot split {rows} rows into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return np.ascontiguousarray(w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


_NAME_MAP: dict = {}


def _name_map(n_blocks: int):
    """gguf's llama name table for at least n_blocks layers (built once per size class)."""
    n = max(128, 1 << (max(1, n_blocks) - 1).bit_length())
    if n not in _NAME_MAP:
        _NAME_MAP[n] = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n)
    return _NAME_MAP[n]


def llm_tensor_names(n_layers: int, tied: bool = False) -> list[str]:
    """HF names of a LLaMA's weights, in llama.cpp's customary order."""
    names = ["model.embed_tokens.weight"]
    for i in range(n_layers):
        names += [f"model.layers.{i}.{m}.weight" for m in _LAYER_MODULES]
    return names + ["model.norm.weight"] + ([] if tied else ["lm_head.weight"])


def gguf_tensor_name(hf_name: str) -> Optional[str]:
    """GGUF name of a published LLM weight; None for weights llama.cpp does not use."""
    if hf_name.endswith(_IGNORED_SUFFIXES) or not hf_name.endswith(".weight"):
        return None
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        if len(parts) < 5 or not parts[2].isdigit() or ".".join(parts[3:-1]) not in _LAYER_MODULES:
            return None
        n_blocks = int(parts[2]) + 1
    elif hf_name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        n_blocks = 1
    else:
        return None
    return _name_map(n_blocks).get_name(hf_name, try_suffixes=(".weight",))


def _expected_shapes(cfg) -> dict[str, tuple]:
    """HF name -> shape the config implies (torch layout [out, in])."""
    h, ffn, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    if cfg.hidden_size % cfg.num_attention_heads and not getattr(cfg, "head_dim_override", 0):
        raise ModelLoadError(f"hidden_size {h} is not a multiple of num_attention_heads "
                             f"{cfg.num_attention_heads}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ModelLoadError(f"num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {cfg.num_key_value_heads}")
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,),
              "lm_head.weight": (cfg.vocab_size, h)}
    per_layer = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                 "self_attn.o_proj": (h, q), "mlp.gate_proj": (ffn, h), "mlp.up_proj": (ffn, h),
                 "mlp.down_proj": (h, ffn), "input_layernorm": (h,), "post_attention_layernorm": (h,)}
    for i in range(cfg.num_hidden_layers):
        for mod, shape in per_layer.items():
            shapes[f"model.layers.{i}.{mod}.weight"] = shape
    return shapes


def _plan(state: dict, cfg) -> list[tuple[str, str]]:
    """(HF name, GGUF name) for every tensor to write, in llama.cpp's customary order; checks that
    every weight the config implies is present with the right shape."""
    shapes = _expected_shapes(cfg)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    if tied and "lm_head.weight" in state:      # transformers ties it to embed_tokens too
        log.warning("GGUF export: tie_word_embeddings is set; ignoring the checkpoint's lm_head.weight")
    for name, shape in shapes.items():
        if name == "lm_head.weight" and tied:
            continue
        if name not in state:
            raise ModelLoadError(f"checkpoint lacks LLM weight '{name}'")
        if tuple(state[name].shape) != shape:
            raise ModelLoadError(f"LLM weight '{name}' has shape {tuple(state[name].shape)}, the config "
                                 f"implies {shape}")
    for name in state:
        if name not in shapes and gguf_tensor_name(name) is None and not name.endswith(_IGNORED_SUFFIXES):
            log.warning("GGUF export: ignoring unexpected LLM weight '%s'", name)
    return [(n, gguf_tensor_name(n)) for n in llm_tensor_names(cfg.num_hidden_layers, tied)]


def _convert(name: str, tensor, cfg) -> np.ndarray:
    """One checkpoint tensor -> the numpy array written to the GGUF (F32 norms, F16 matrices)."""
    import torch
    t = tensor.detach().to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise ModelLoadError(f"LLM weight '{name}' holds NaN or infinite values")
    a = t.numpy()
    if name.endswith("self_attn.q_proj.weight"):
        a = permute_qk(a, cfg.num_attention_heads)
    elif name.endswith("self_attn.k_proj.weight"):
        a = permute_qk(a, cfg.num_key_value_heads)
    if a.ndim == 1:
        return np.ascontiguousarray(a, dtype=np.float32)
    out = a.astype(np.float16)
    if not np.isfinite(out).all():
        big = float(np.abs(a).max())
        raise ModelLoadError(f"LLM weight '{name}' does not fit in float16 (max |w| = {big:g})")
    return np.ascontiguousarray(out)


def _vocab(tokenizer_path: Path, n_vocab: int):
    """tokens, scores, token types of a SentencePiece model, padded to n_vocab entries."""
    import sentencepiece as spm
    try:
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    except Exception as e:
        raise ModelLoadError(f"cannot read tokenizer {tokenizer_path}: {e}") from None
    n_sp = sp.get_piece_size()
    if n_sp > n_vocab:
        raise ModelLoadError(f"{tokenizer_path} has {n_sp} pieces but the model's vocab_size is {n_vocab}")
    T = gguf.TokenType
    tokens, scores, types = [], [], []
    for i in range(n_sp):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(int(T.UNKNOWN))
        elif sp.is_control(i):
            types.append(int(T.CONTROL))
        elif sp.is_byte(i):
            types.append(int(T.BYTE))
        elif sp.is_unused(i):
            types.append(int(T.UNUSED))
        else:
            types.append(int(T.NORMAL))
    for i in range(n_sp, n_vocab):      # rows of the embedding the tokenizer never produces
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(T.UNUSED))
    special = dict(bos=sp.bos_id(), eos=sp.eos_id(), unk=sp.unk_id(), pad=sp.pad_id())
    return tokens, scores, types, special, n_sp


def _bpe_pre(pre_tokenizer) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) of a tokenizer.json pre-tokenizer it implements."""
    def byte_level(p):
        return isinstance(p, dict) and p.get("type") == "ByteLevel" and p.get("use_regex", True)
    if byte_level(pre_tokenizer):
        return "gpt-2"
    parts = pre_tokenizer.get("pretokenizers") if isinstance(pre_tokenizer, dict) else None
    if (pre_tokenizer or {}).get("type") == "Sequence" and isinstance(parts, list) and len(parts) == 2 \
            and parts[0].get("type") == "Digits" and parts[0].get("individual_digits") and byte_level(parts[1]):
        return "smollm"     # each digit alone, then GPT-2's byte-level split (SmolLM / SmolLM2)
    log.warning("GGUF export: pre-tokenizer %s has no known llama.cpp name; writing 'default' (our "
                "decoders take token ids, only llama.cpp's own tokenizer would split text differently)",
                pre_tokenizer)
    return "default"


def _bpe_vocab(tokenizer_path: Path, n_vocab: int) -> dict:
    """A byte-level BPE tokenizer.json as llama.cpp's "gpt2" vocabulary, padded to n_vocab entries:
    tokens (the BPE's byte-level strings), token types (special added tokens CONTROL, other added
    ones USER_DEFINED), merges, the special ids of tokenizer_config.json and the pre-tokenizer."""
    import json

    from .tokenizer import BPETokenizer
    try:
        data = json.loads(Path(tokenizer_path).read_text(encoding="utf-8"))
        model = data["model"]
        vocab = model["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"cannot read tokenizer {tokenizer_path}: {type(e).__name__}: {e}") from None
    if model.get("type") != "BPE" or not isinstance(vocab, dict):
        raise ModelLoadError(f"{tokenizer_path}: only BPE tokenizer.json files are supported "
                             f"(found {model.get('type')})")
    tok = BPETokenizer(tokenizer_path)      # the same ids as the decoders get
    T = gguf.TokenType
    added = {int(t["id"]): t for t in data.get("added_tokens") or []}
    n_tok = max([*vocab.values(), *added, -1]) + 1
    if n_tok > n_vocab:
        raise ModelLoadError(f"{tokenizer_path} has {n_tok} tokens but the model's vocab_size is {n_vocab}")
    by_id = {int(i): t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(int(T.CONTROL if added[i].get("special") else T.USER_DEFINED))
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(int(T.NORMAL))
        else:                           # ids no token has, and rows past the tokenizer's end
            tokens.append(f"[PAD{i}]")
            types.append(int(T.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {"tokens": [t.encode("utf-8") for t in tokens], "types": types, "merges": merges,
            "special": dict(bos=tok.bos_id, eos=tok.eos_id, unk=tok.unk_id, pad=tok.pad_id),
            "pre": _bpe_pre(data.get("pre_tokenizer")), "add_bos": tok.add_bos, "n_tok": n_tok}


def _progress_fn(progress) -> Progress:
    if callable(progress):
        return progress
    if progress:   # True: one line per step on stderr (what mobilevlm-export passes when not quiet)
        def show(step, total, desc):
            print(f"  gguf [{step}/{total}] {desc}", file=sys.stderr, flush=True)
        return show
    return lambda step, total, desc: None


def write_f16_gguf(checkpoint, path: Path, progress: Progress = lambda *a: None, step0: int = 0,
                   total: int = 0) -> int:
    """Write the F16 GGUF of checkpoint's LLM to `path`; returns the number of steps reported."""
    cfg = checkpoint.config.llm
    state = checkpoint.llm_state()
    plan = _plan(state, cfg)
    n_vocab = state["model.embed_tokens.weight"].shape[0]
    bpe = None
    if Path(checkpoint.tokenizer_path).name == TOKENIZER_JSON:
        bpe = _bpe_vocab(checkpoint.tokenizer_path, n_vocab)
        if bpe["n_tok"] < n_vocab:
            log.info("GGUF export: padding the vocabulary from %d BPE tokens to %d", bpe["n_tok"], n_vocab)
    else:
        tokens, scores, types, special, n_sp = _vocab(checkpoint.tokenizer_path, n_vocab)
        if n_sp < n_vocab:
            log.info("GGUF export: padding the vocabulary from %d SentencePiece pieces to %d", n_sp, n_vocab)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(Path(checkpoint.path).name)
    w.add_file_type(QUANT_FTYPES["f16"])
    w.add_vocab_size(n_vocab)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))

    if bpe is None:
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        pad = special["pad"] if special["pad"] >= 0 else special["unk"]   # published: pad = unk = 0
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(bpe["pre"])
        w.add_token_list(bpe["tokens"])
        w.add_token_types(bpe["types"])
        w.add_token_merges(bpe["merges"])
        special = bpe["special"]
        pad = special["pad"]
    bos = special["bos"] if special["bos"] >= 0 else cfg.bos_token_id
    eos = special["eos"] if special["eos"] >= 0 else cfg.eos_token_id
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    if special["unk"] >= 0:
        w.add_unk_token_id(special["unk"])
    if pad is not None and pad >= 0:
        w.add_pad_token_id(pad)
    w.add_add_bos_token(True if bpe is None else bool(bpe["add_bos"]))
    w.add_add_eos_token(False)

    # Tensor infos first (name, shape, type, size), then the data, one tensor at a time.
    for hf, gg in plan:
        shape = tuple(state[hf].shape)
        if len(shape) == 1:
            w.add_tensor_info(gg, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            w.add_tensor_info(gg, shape, np.dtype(np.float16), 2 * int(np.prod(shape)))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for k, (hf, gg) in enumerate(plan):
            w.write_tensor_data(_convert(hf, state[hf], cfg))
            progress(step0 + k + 1, total, f"f16: {gg}")
    finally:
        w.close()
    return len(plan)


def quantize_gguf(src: Path, dst: Path, quant: str, threads: int = 0) -> None:
    """llama.cpp's quantizer: F16 GGUF `src` -> `dst` in `quant` (q8_0, q4_k_m)."""
    try:
        import llama_cpp
    except Exception as e:
        raise ModelLoadError(f"quantizing to {quant} needs llama-cpp-python, which does not import: "
                             f"{type(e).__name__}: {e}") from None
    from .decoders.llama_log import llama_log_tail, route_llama_logs
    route_llama_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[quant]
    params.nthread = int(threads)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise ModelLoadError(f"llama.cpp could not quantize {src} to {quant} (code {rc})"
                             + llama_log_tail())


def export_gguf(checkpoint, out_dir, quants=("f16", "q8_0", "q4_k_m"),
                progress: Union[Progress, bool, None] = None) -> dict:
    """Export the LLM of `checkpoint` (core.checkpoint.Checkpoint) into out_dir as llm-<quant>.gguf.

    Returns the manifest "llm" section: {quant: {"file", "sha256", "bytes"}} in the order asked.
    `progress` is a callback progress(step, total, description), True for lines on stderr, or None.
    Files are written under a temporary name and renamed when complete. The F16 file is the source
    of the quantized ones; when "f16" is not among `quants` it is deleted at the end.
    """
    quants = list(dict.fromkeys(str(q).lower() for q in quants))
    bad = [q for q in quants if q not in QUANT_FTYPES]
    if bad or not quants:
        raise ValueError(f"unknown GGUF quantization {bad or quants} (choose from {', '.join(QUANT_FTYPES)})")
    report = _progress_fn(progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_tensors = len(_plan(checkpoint.llm_state(), checkpoint.config.llm))
    others = [q for q in quants if q != "f16"]
    total = n_tensors + len(others) + len(quants)
    f16 = out_dir / gguf_filename("f16")
    tmp = f16.with_name(f16.name + ".tmp")
    step = write_f16_gguf(checkpoint, tmp, report, 0, total)
    tmp.replace(f16)
    for q in others:
        dst = out_dir / gguf_filename(q)
        qtmp = dst.with_name(dst.name + ".tmp")
        try:
            quantize_gguf(f16, qtmp, q)
            qtmp.replace(dst)
        finally:
            if qtmp.exists():
                qtmp.unlink()
        step += 1
        report(step, total, f"quantized {dst.name}")
    section = {}
    for q in quants:
        p = out_dir / gguf_filename(q)
        section[q] = {"file": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size}
        step += 1
        report(step, total, f"sha256 {p.name}")
    if "f16" not in quants:
        f16.unlink()
    return section


__all__ = ["export_gguf", "write_f16_gguf", "quantize_gguf", "permute_qk", "unpermute_qk",
           "gguf_tensor_name", "llm_tensor_names", "QUANT_FTYPES"]
