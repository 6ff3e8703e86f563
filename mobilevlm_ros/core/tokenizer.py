"""SentencePiece tokenizer with the semantics of the reference's slow LlamaTokenizer (use_fast=False):
text is encoded by SentencePiece as one piece (dummy prefix included), BOS is added on request, and
decoding skips special tokens.

Every published MobileVLM checkpoint has a tokenizer.model. `BPETokenizer` (a byte-level BPE
tokenizer.json, same interface) serves only folders without one, such as the SmolLM2 test model of
`mobilevlm-make-tiny --language-model smollm2`; `load_tokenizer(folder)` picks the class."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelLoadError

# transformers' clean_up_tokenization: applied at decode time when tokenizer_config.json asks for it
# (its default is true when the key is absent).
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class Tokenizer:
    def __init__(self, model_file, config_file=None):
        import sentencepiece as spm
        model_file = Path(model_file)
        if not model_file.is_file():
            raise ModelLoadError(f"missing file: {model_file}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except Exception as e:
            raise ModelLoadError(f"corrupt tokenizer {model_file}: {e}") from None
        cfg = {}
        config_file = Path(config_file) if config_file else model_file.with_name("tokenizer_config.json")
        if config_file.is_file():
            try:
                cfg = json.loads(config_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ModelLoadError(f"corrupt JSON in {config_file}: {e}") from None
        self.clean_up_spaces = bool(cfg.get("clean_up_tokenization_spaces", True))
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.special_ids = {i for i in (self.bos_id, self.eos_id, self.unk_id, self.sp.pad_id()) if i >= 0}
        self.special_strings = tuple(self.sp.id_to_piece(i) for i in sorted(self.special_ids))
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.sp.encode(text) if text else []
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids) -> str:
        text = self.sp.decode([int(i) for i in ids if int(i) not in self.special_ids])
        if self.clean_up_spaces:
            for a, b in _CLEANUPS:
                text = text.replace(a, b)
        return text


TOKENIZER_MODEL = "tokenizer.model"     # SentencePiece: every published MobileVLM checkpoint
TOKENIZER_JSON = "tokenizer.json"       # Hugging Face `tokenizers` (byte-level BPE), used only without one


def _token_content(value):
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string or an
    AddedToken dict ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class BPETokenizer:
    """A byte-level BPE tokenizer (GPT-2 style, e.g. SmolLM2's) from a Hugging Face tokenizer.json,
    with the interface of Tokenizer: encode/decode, bos_id/eos_id/unk_id/pad_id (-1 when the
    tokenizer has none), special_ids, special_strings, vocab_size.

    As the reference's tokenizer_image_token sees such a tokenizer (use_fast, add_special_tokens):
    BOS is added on request only when tokenizer_config.json says add_bos_token (GPT-2-style
    tokenizers add none by default); decoding skips every special token; clean_up_tokenization_spaces
    as tokenizer_config.json says (default false)."""

    def __init__(self, tokenizer_file, config_file=None):
        from tokenizers import Tokenizer as HFTokenizer
        tokenizer_file = Path(tokenizer_file)
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"missing file: {tokenizer_file}")
        try:
            self.tk = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:
            raise ModelLoadError(f"corrupt tokenizer {tokenizer_file}: {e}") from None
        cfg = {}
        config_file = Path(config_file) if config_file else tokenizer_file.with_name("tokenizer_config.json")
        for f in (tokenizer_file.with_name("special_tokens_map.json"), config_file):
            if f.is_file():
                try:
                    data = json.loads(f.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ModelLoadError(f"corrupt JSON in {f}: {e}") from None
                if isinstance(data, dict):
                    cfg.update(data)             # tokenizer_config.json last: it wins
        self.clean_up_spaces = bool(cfg.get("clean_up_tokenization_spaces", False))
        self.add_bos = bool(cfg.get("add_bos_token", False))

        def token_id(key):
            content = _token_content(cfg.get(key))
            tid = self.tk.token_to_id(content) if content else None
            return -1 if tid is None else int(tid)
        self.bos_id, self.eos_id, self.unk_id = token_id("bos_token"), token_id("eos_token"), token_id("unk_token")
        self.pad_id = token_id("pad_token")
        added = {int(i): t.content for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        self.special_ids = set(added) | {i for i in (self.bos_id, self.eos_id, self.unk_id, self.pad_id)
                                         if i >= 0}
        self.special_strings = tuple(added.get(i) or self.tk.id_to_token(i) for i in sorted(self.special_ids))
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids if text else []
        return [self.bos_id] + ids if add_bos and self.add_bos and self.bos_id >= 0 else ids

    def decode(self, ids) -> str:
        text = self.tk.decode([int(i) for i in ids if int(i) not in self.special_ids],
                              skip_special_tokens=False)
        if self.clean_up_spaces:
            for a, b in _CLEANUPS:
                text = text.replace(a, b)
        return text


def tokenizer_file(folder) -> Path:
    """The tokenizer file of a model folder: tokenizer.model if present (SentencePiece, as published),
    else tokenizer.json; tokenizer.model's path when neither exists (for the error message)."""
    folder = Path(folder)
    if not (folder / TOKENIZER_MODEL).is_file() and (folder / TOKENIZER_JSON).is_file():
        return folder / TOKENIZER_JSON
    return folder / TOKENIZER_MODEL


def load_tokenizer(path):
    """The tokenizer of a model folder (or of a tokenizer file): SentencePiece `Tokenizer` for
    tokenizer.model, `BPETokenizer` for a tokenizer.json in a folder without tokenizer.model."""
    path = Path(path)
    if path.is_dir():
        path = tokenizer_file(path)
        if not path.is_file():
            raise ModelLoadError(f"missing file: {path} (nor {TOKENIZER_JSON})")
    if path.name == TOKENIZER_JSON or path.suffix == ".json":
        return BPETokenizer(path)
    return Tokenizer(path)
