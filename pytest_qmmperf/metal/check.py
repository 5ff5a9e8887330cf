"""Syntax and type check of generated Metal without a Mac.

Parses a kernel, wrapped exactly as ``mx.fast.metal_kernel`` wraps it
(:func:`pytest_qmmperf.metal.translation_unit`), with clang's C++ front end
through the ``libclang`` wheel, after ``syntax_stub.h`` declares Metal's
types, address spaces and SIMD-group functions.  Two Metal constructs that
C++ lacks are rewritten first, and nothing else:

* a ``threadgroup`` array declared in a kernel becomes ``static`` (C++ allows
  an address-space-qualified variable only with static storage);
* the attributes of the explicit instantiation ``template [[host_name(...)]]
  [[kernel]] ...`` are dropped (C++ allows none there).

Unknown Metal attributes (``[[kernel]]``, ``[[buffer(0)]]``,
``[[thread_index_in_simdgroup]]``) are warnings and ignored; every error is
reported.  This is what runs in CI; the Metal compiler itself only runs on
macOS.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

STUB = Path(__file__).resolve().parent / "syntax_stub.h"

_TG_ARRAY = re.compile(r"^(\s*)threadgroup(\s+\w+\s+\w+\s*\[)", re.MULTILINE)
_INSTANTIATION = re.compile(r"^template \[\[host_name\(\"[^\"]*\"\)\]\] \[\[kernel\]\] ",
                            re.MULTILINE)


@dataclass(frozen=True)
class Diagnostic:
    line: int
    column: int
    severity: str
    message: str
    text: str  # the offending source line

    def __str__(self) -> str:
        where = f"{self.line}:{self.column}: {self.severity}"
        return f"{where}: {self.message}\n    {self.text.strip()}"


def as_cxx(metal_source: str) -> str:
    """Apply the two rewrites above to a Metal translation unit."""
    out = _TG_ARRAY.sub(r"\1static threadgroup\2", metal_source)
    return _INSTANTIATION.sub("template ", out)


def libclang_reason() -> str | None:
    """``None`` when libclang's Python bindings load, else why not."""
    try:
        import clang.cindex as ci

        ci.Index.create()
    except Exception as exc:  # the bindings raise several types when libclang.so is absent
        return f"libclang is unavailable ({exc}); pip install libclang"
    return None


def check(sources: Iterable[str]) -> list[Diagnostic]:
    """Errors clang finds in one translation unit made of the stub and ``sources``."""
    import clang.cindex as ci

    text = STUB.read_text() + "\n" + "\n".join(as_cxx(s) for s in sources)
    lines = text.splitlines()
    unit = ci.Index.create().parse(
        "qmmperf_kernels.metal.cpp",
        args=["-x", "c++", "-std=c++17", "-fsyntax-only", "-Wno-unknown-attributes",
              "-ferror-limit=0"],
        unsaved_files=[("qmmperf_kernels.metal.cpp", text)],
    )
    found = []
    for diag in unit.diagnostics:
        if diag.severity < ci.Diagnostic.Error:
            continue
        line = diag.location.line
        found.append(Diagnostic(
            line=line, column=diag.location.column,
            severity="fatal" if diag.severity >= ci.Diagnostic.Fatal else "error",
            message=diag.spelling, text=lines[line - 1] if 0 < line <= len(lines) else "",
        ))
    return found
