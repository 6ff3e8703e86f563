"""Command-line options whose values come from a list core defines once (quantizations, backends,
decoders, llama.cpp libraries, vision graphs): the tools and benches take their choices, and build
their help texts, from those lists, so that a new entry reaches every command at once.

A single value uses argparse's `choices=`; a comma-separated list uses `type=CommaList(...)`, which
keeps the list on the parser (test/test_options.py checks every command against core's lists).
"""
from __future__ import annotations

import argparse
from typing import Sequence


class CommaList:
    """argparse `type=` for a comma-separated list of names from `choices` (any case; repeats
    once); an unknown name is a usage error that lists the choices."""

    def __init__(self, choices: Sequence[str], what: str, allow_empty: bool = False):
        self.choices = tuple(choices)
        self.what = what
        self.allow_empty = allow_empty      # "" = the command's own default (e.g. every installed one)

    def __call__(self, text: str) -> list:
        names = list(dict.fromkeys(n.strip().lower() for n in str(text).split(",") if n.strip()))
        bad = [n for n in names if n not in self.choices]
        if bad or not (names or self.allow_empty):
            raise argparse.ArgumentTypeError(f"unknown {self.what} {','.join(bad) or repr(text)} "
                                             f"(choose from {self.names})")
        return names

    @property
    def names(self) -> str:
        return ",".join(self.choices)

    def __repr__(self) -> str:                  # argparse names the type in some messages
        return f"{self.what} list"
