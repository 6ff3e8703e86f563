"""SentencePiece tokenizer with the semantics of the reference's slow LlamaTokenizer (use_fast=False):
text is encoded by SentencePiece as one piece (dummy prefix included), BOS is added on request, and
decoding skips special tokens."""
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
