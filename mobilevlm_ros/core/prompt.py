"""The reference "v1" conversation prompt, tokenized around the image slot.

    "<system> USER: <image>\\n<question> ASSISTANT:"

Each side of <image> is tokenized on its own; only the first gets BOS. The image embeddings take the
place of <image>. The part before the image is the same for every question, so decoders cache it;
so are the first tokens after it (`frame_tail`), which a decoder may evaluate with the image.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import RequestError
from .tokenizer import Tokenizer

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200     # the reference's placeholder id, for comparing prompt ids
STOP_STRING = "</s>"


def v1_prompt(question: str) -> str:
    return f"{SYSTEM} USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


@dataclass(frozen=True)
class PromptIds:
    prefix: tuple[int, ...]     # BOS + system + "USER: ", before the image
    suffix: tuple[int, ...]     # "\n<question> ASSISTANT:", after the image
    image_tokens: int

    @property
    def total(self) -> int:
        return len(self.prefix) + self.image_tokens + len(self.suffix)

    def reference_ids(self) -> list[int]:
        """As the reference's tokenizer_image_token returns them (one placeholder for the image)."""
        return [*self.prefix, IMAGE_TOKEN_INDEX, *self.suffix]


def build_prompt(tokenizer: Tokenizer, question: str, image_tokens: int) -> PromptIds:
    for s in (IMAGE_TOKEN, *tokenizer.special_strings):
        if s in question:
            raise RequestError(f"question must not contain the special token '{s}'")
    before, after = v1_prompt(question).split(IMAGE_TOKEN)
    return PromptIds(tuple(tokenizer.encode(before, add_bos=True)), tuple(tokenizer.encode(after)),
                     image_tokens)


def frame_tail(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The tokens that open the text after the image whatever the question (MobileLLaMA: "▁" and
    "\\n"): the common start of the suffixes of two questions that begin with different characters.
    A question whose suffix does not start with them (its first characters merged with the
    newline) must be evaluated from the image without them."""
    a = build_prompt(tokenizer, "A", 0).suffix
    b = build_prompt(tokenizer, "1", 0).suffix
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return tuple(a[:n])
