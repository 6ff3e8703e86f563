"""Language decoders behind one interface: `torch` (the reference) and `llamacpp` (GGUF)."""
from .base import Decoder

__all__ = ["Decoder"]
