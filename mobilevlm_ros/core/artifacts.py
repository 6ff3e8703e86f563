"""The exported artifacts folder (written by `mobilevlm-export`, read by the runtime backends).

    ARTIFACTS/
      manifest.json                      what is here, where it came from, hashes
      vision-fp32.onnx (-fp16, -int8)    CLIP tower + projector: pixels [B,3,336,336] -> [B,144,hidden]
      llm-f16.gguf (-q8_0, -q4_k_m)      the language model for llama.cpp
      tokenizer.model, tokenizer_config.json, special_tokens_map.json

manifest.json:
  format "mobilevlm_ros.artifacts", format_version 1, tool_version, model_id,
  source {path, config_sha256, name_or_path}, projector_type, image_size, image_tokens, hidden_size,
  mm_hidden_size, vision_weights_source,
  vision {dtype: {file, sha256, bytes, input, output, input_dtype}},
  llm {quant: {file, sha256, bytes}}, tokenizer {file: sha256}
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import ModelLoadError

FORMAT = "mobilevlm_ros.artifacts"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def vision_filename(dtype: str) -> str:
    return f"vision-{dtype}.onnx"


def gguf_filename(quant: str) -> str:
    return f"llm-{quant}.gguf"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict:
    from .config import read_json
    m = read_json(Path(folder) / MANIFEST)
    if m.get("format") != FORMAT:
        raise ModelLoadError(f"{Path(folder) / MANIFEST}: not a mobilevlm_ros artifacts manifest")
    return m


def write_manifest(folder: Path, manifest: dict) -> None:
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    tmp = Path(folder) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(Path(folder) / MANIFEST)


def artifact_path(folder: Path, manifest: dict, section: str, key: str) -> Path:
    """The file of manifest[section][key] ("vision"/"fp32", "llm"/"q4_k_m"), checked to exist."""
    entry = manifest.get(section, {}).get(key)
    if entry is None:
        have = ", ".join(manifest.get(section, {})) or "none"
        raise ModelLoadError(f"{Path(folder) / MANIFEST}: no {section} file for '{key}' (exported: {have}); "
                             f"re-run mobilevlm-export with it")
    path = Path(folder) / entry["file"]
    if not path.is_file():
        raise ModelLoadError(f"missing file: {path} (listed in {Path(folder) / MANIFEST})")
    if "bytes" in entry and path.stat().st_size != entry["bytes"]:
        raise ModelLoadError(f"{path} has {path.stat().st_size} bytes, manifest says {entry['bytes']} "
                             "(truncated or replaced; re-export)")
    return path


# vision_dtype "auto" on a CPU takes the int8 graph when the export measured its embeddings this close
# to the float32 torch reference (cosine over the check frames, manifest.json "check")
INT8_MIN_COSINE = 0.999


def choose_vision_dtype(manifest: dict, vision_backend: str, device: str) -> tuple[str, str]:
    """(graph, why) for vision_dtype "auto": on a GPU backend the fp16 graph, on the CPU the int8
    graph if its recorded fidelity is within INT8_MIN_COSINE, else fp32."""
    graphs = manifest.get("vision", {})
    if vision_backend == "tensorrt" or (vision_backend == "onnxruntime" and str(device).startswith("cuda")):
        return ("fp16", "GPU backend") if "fp16" in graphs else ("fp32", "GPU backend, no fp16 graph exported")
    int8 = graphs.get("int8")
    if int8 is None:
        return "fp32", "no int8 graph exported"
    cosine = (int8.get("check") or {}).get("cosine")
    if cosine is None:
        return "fp32", "the int8 graph's fidelity is not recorded in manifest.json"
    if cosine < INT8_MIN_COSINE:
        return "fp32", f"the int8 graph's cosine {cosine:.5f} is below {INT8_MIN_COSINE}"
    return "int8", f"CPU, int8 cosine {cosine:.5f} >= {INT8_MIN_COSINE}"
