"""llama.cpp's (and ggml's) log -> the Python logger "mobilevlm_ros.llama_cpp" at DEBUG.

Process-wide, once per library (llama.cpp, ik_llama.cpp): the decoder and the GGUF export's
quantizer both route it here, so nothing reaches stderr, and the recent warnings and errors can be
quoted in the exceptions they raise (llama_log_tail).
"""
from __future__ import annotations

import collections
import ctypes
import logging
import threading

llama_log = logging.getLogger("mobilevlm_ros.llama_cpp")


class _LogRouter:
    """Collects llama.cpp's log fragments into lines, logs them at DEBUG and remembers the recent
    warnings/errors so that exceptions can quote them."""

    LEVELS = {0: "NONE", 1: "DEBUG", 2: "INFO", 3: "WARN", 4: "ERROR", 5: "CONT"}     # enum ggml_log_level

    def __init__(self):
        self.lock = threading.Lock()
        self.buf = ""
        self.level = 1
        self.problems = collections.deque(maxlen=8)

    def __call__(self, level, text, user_data):
        try:
            s = text.decode("utf-8", "replace") if text else ""
            with self.lock:
                if level != 5:
                    if self.buf:
                        self._emit(self.buf)
                        self.buf = ""
                    self.level = level
                self.buf += s
                while "\n" in self.buf:
                    line, self.buf = self.buf.split("\n", 1)
                    self._emit(line)
        except Exception:   # never let an exception cross into C
            pass

    def _emit(self, line):
        line = line.rstrip()
        if not line.strip(" ."):
            return
        llama_log.debug("[%s] %s", self.LEVELS.get(self.level, self.level), line)
        if self.level in (3, 4):
            self.problems.append(line.strip())

    def tail(self, clear=True) -> str:
        with self.lock:
            lines = list(self.problems)
            if clear:
                self.problems.clear()
        return ("; llama.cpp said: " + " | ".join(lines[-4:])) if lines else ""


_router = _LogRouter()
_routed: dict = {}          # library name -> its log callback, kept alive here


def route_llama_logs(library=None) -> None:
    """Send the library's log to Python logging at DEBUG and initialise its backend; idempotent,
    once per library (library: an API object of llama_library.import_library, default llama_cpp)."""
    if library is None:
        import llama_cpp as library
    name = getattr(library, "name", "llama.cpp")
    if name not in _routed:
        _routed[name] = library.llama_log_callback(_router)
        library.llama_log_set(_routed[name], ctypes.c_void_p(0))
        library.llama_backend_init()


def llama_log_tail() -> str:
    """Recent llama.cpp warnings/errors, formatted for an exception message ('' if none)."""
    return _router.tail()
