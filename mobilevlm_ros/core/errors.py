"""Exceptions of the inference core. Messages name the file or key at fault."""


class MobileVLMError(Exception):
    """Base class of every error the core raises on purpose."""


class ModelLoadError(MobileVLMError):
    """A model file or folder is missing, corrupt, truncated or does not match its config."""


class RequestError(MobileVLMError):
    """A question or generation parameter is invalid."""


class ImageError(MobileVLMError):
    """A camera frame cannot be turned into model input."""


class EncodeAborted(MobileVLMError):
    """An encode stopped by its Abort before it finished; nothing was computed for its frames
    (`frames`: the frames it was given, filled in by whoever knows them)."""
    frames: list = []
