"""The ik_llama.cpp build (scripts/build-ik-llama.sh) and the project's ctypes binding of it
(ik_llama_lib): struct layouts against the header the library was built from, the CPU check that
keeps a binary off a CPU that cannot run it, license notices, and no file shared with a package."""
from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess

import pytest

from mobilevlm_ros.core.decoders import ik_llama_lib as lib
from mobilevlm_ros.core.errors import ModelLoadError

BUILD = lib.build_info()
needs_build = pytest.mark.skipif(BUILD is None, reason=f"ik_llama.cpp is not built in {lib.lib_dir()} "
                                                       "(opt-in: MOBILEVLM_IK_LLAMA=1 scripts/setup.sh)")


def _header_fields(header: str, struct: str) -> list:
    """The field names of `struct <struct> {...}` in llama.h, in order (its fields are one
    declaration each, function pointers through typedefs)."""
    m = re.search(r"struct\s+" + struct + r"\s*\{(.*?)\n\s*\}", header, re.S)
    assert m, f"struct {struct} not found in llama.h"
    body = re.sub(r"//[^\n]*|/\*.*?\*/", "", m.group(1), flags=re.S)
    return [re.findall(r"\w+", decl)[-1] for decl in body.split(";") if decl.strip()]


@needs_build
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) to read the header's layouts")
def test_struct_layouts_match_the_header(tmp_path):
    """Every struct passed by value: the same fields in the same order as llama.h, and every
    offset, field size and struct size as the C compiler lays them out."""
    inc = lib.lib_dir() / "include"
    header = (inc / "llama.h").read_text()
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "llama.h"', "int main(void) {"]
    for cname, py in lib.STRUCTS.items():
        names = [f[0] for f in py._fields_]
        assert _header_fields(header, cname) == names, cname
        lines.append(f'printf("{cname} . %zu %zu\\n", sizeof(struct {cname}), _Alignof(struct {cname}));')
        for n in names:
            lines.append(f'printf("{cname} {n} %zu %zu\\n", offsetof(struct {cname}, {n}), '
                         f'sizeof(((struct {cname} *)0)->{n}));')
    lines += ["return 0; }"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    subprocess.run(["cc", "-std=c11", "-I", str(inc), str(src), "-o", str(tmp_path / "layout")], check=True)
    out = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True, text=True).stdout
    import ctypes
    got = {}
    for line in out.splitlines():
        cname, field, a, b = line.split()
        got[cname, field] = (int(a), int(b))
    for cname, py in lib.STRUCTS.items():
        assert got[cname, "."] == (ctypes.sizeof(py), ctypes.alignment(py)), cname
        for n, _t in py._fields_:
            desc = getattr(py, n)
            assert got[cname, n] == (desc.offset, desc.size), f"{cname}.{n}"


@needs_build
def test_build_is_for_this_cpu_with_its_license():
    """build.json names the flags of the CPU it was compiled on, which this CPU has (the set-up built
    it here); the LICENSE of ik_llama.cpp (with llama.cpp's and ggml's authors) lies beside it."""
    assert BUILD["source_sha256"] and BUILD["cmake_flags"]
    assert lib.missing_cpu_flags(BUILD, lib.cpu_flags()) == []
    if lib.cpu_flags():
        assert "sse2" in BUILD["cpu_flags"]
    notice = (lib.lib_dir() / "LICENSE").read_text()
    for who in ("MIT License", "ggml authors", "llama.cpp authors", "ik_llama.cpp authors"):
        assert who in notice


def test_missing_cpu_flags():
    info = {"cpu_flags": ["sse2", "avx2", "avx512f", "avx512_vnni", "fma"]}
    assert lib.missing_cpu_flags(info, {"sse2", "avx2", "fma", "avx512f", "avx512_vnni", "amx_int8"}) == []
    assert lib.missing_cpu_flags(info, {"sse2", "avx2", "fma"}) == ["avx512_vnni", "avx512f"]
    assert lib.missing_cpu_flags({}, set()) == []
    # flags that are not instruction sets (a hypervisor's, mitigations) are never required
    assert lib.missing_cpu_flags({"cpu_flags": ["hypervisor", "ibrs", "avx2"]}, {"avx2"}) == []


def test_load_refuses_a_build_this_cpu_cannot_run(tmp_path, monkeypatch):
    """No build: a clear error. A build for a CPU with AVX-512 on one without: refused before the
    library is even opened (opening it would run its initialisers)."""
    monkeypatch.setattr(lib, "_lib", None)
    monkeypatch.setenv("MOBILEVLM_IK_LLAMA_DIR", str(tmp_path))
    with pytest.raises(ModelLoadError, match="ik_llama.cpp engine is not built"):
        lib.load()
    (tmp_path / "libllama.so").write_bytes(b"not a library")
    (tmp_path / "libggml.so").write_bytes(b"not a library")
    (tmp_path / "build.json").write_text('{"cpu_flags": ["sse2", "avx512f", "avx512bw"]}')
    monkeypatch.setattr(lib, "cpu_flags", lambda: {"sse2", "avx2"})
    with pytest.raises(ModelLoadError, match="avx512bw, avx512f, which this CPU lacks"):
        lib.load()
    monkeypatch.setattr(lib, "cpu_flags", lambda: {"sse2", "avx512f", "avx512bw"})
    with pytest.raises(ModelLoadError, match="does not load"):
        lib.load()


def _owners() -> dict:
    owners: dict = {}
    for d in md.distributions():
        for f in d.files or ():
            owners.setdefault(os.path.normpath(str(d.locate_file(f))), set()).add(d.metadata["Name"])
    return owners


def test_no_file_shared_with_a_package():
    """pip uninstall of one package never deletes another's files: llama-cpp-python's files belong
    to it alone (ik-llama-cpp-python's wheel installed the same include/ and lib/pkgconfig/ paths),
    and the ik_llama.cpp build's folder holds no file of any package."""
    owners = _owners()
    shared = sorted(p for p, o in owners.items() if len(o) > 1 and any("llama" in n.lower() for n in o))
    assert shared == []
    d = os.path.normpath(str(lib.lib_dir()))
    assert [p for p in owners if p == d or p.startswith(d + os.sep)] == []
