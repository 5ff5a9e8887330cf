"""The weight loads' cache hints, A/B in one process: kernels alone on a CUDA GPU.

    python benchmarks/gpu_load_hints.py --forms plain,shipped --out results/load_hints

The CUDA layer reads packed weights through three helpers (``qmm_load_w``
for the wide kernel, ``qmm_load_w_line`` for the skinny kernel, both
predicated, and ``qmm_load_w_guarded`` for the decode kernel), each one
inline-PTX load with cache hints.  Each form below rewrites every helper in the generated
source (the Metal layer's are plain loads either way) and yields kernels
under their own names, so one process compiles every form and times them
round by round, in alternating order, on the same operands:

* ``shipped``: the layer as it is;
* ``plain``: ``live ? *p : zeros`` (``*p`` in the guarded helper), what the
  compiler makes of a plain load;
* any other name in :data:`FORMS`: that PTX load in every helper;
* any of these followed by ``+`` and a name in :data:`X_FORMS`: in
  addition, the skinny kernels' activation loads (``qmm_skinny_x``, plain
  loads as shipped) through that PTX load, volatile inside their guard.

Each case is a kernel configuration on a Llama-3.2-3B projection at one M,
timed like ``gpu_tiles.py`` (CuPy's NVRTC, a replayed CUDA graph of 50 or more
launches, median of 3), 4-bit group 64, float16.  Prints each time, then
per case the median over rounds and its ratio to the first form's; writes
``load_hints.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_kernels as gk  # noqa: E402  (the shared timing and CuPy helpers)

FORMS = {
    "nc": "ld.global.nc.v4.u32",
    "nc_na": "ld.global.nc.L1::no_allocate.v4.u32",
    "l2_128": "ld.global.nc.L1::no_allocate.L2::128B.v4.u32",
    "l2_256": "ld.global.nc.L1::no_allocate.L2::256B.v4.u32",
    "g_256": "ld.global.L2::256B.v4.u32",
}
#: The skinny kernels' activation loads (read by every block: x stays in L2).
X_FORMS = {
    "x_nc": "ld.global.nc.v4.u32",
    "x_na": "ld.global.nc.L1::no_allocate.v4.u32",
    "x_el": "ld.global.nc.L1::evict_last.v4.u32",
}
#: (configuration, projection, M): where each kernel of the family reads weights.
CASES = (
    *(("tiled:decode", shape, 1) for shape in ("qo", "kv", "gate_up", "down")),
    ("tiled:skinny:w16r2", "down", 16), ("tiled:skinny:w16r3h", "down", 16),
    ("tiled:skinny:w8r2", "gate_up", 16),
    ("tiled:skinny:w16r2", "down", 8), ("tiled:skinny:w8r2", "qo", 16),
    ("tiled:wide:w8r2m64:k2", "gate_up", 128), ("tiled:wide:w4r2m32:k4", "down", 128),
    ("tiled:wide:w8r2m64", "gate_up", 2048),
)
# The helpers (their bodies), and the load instruction in each: two predicated, one
# guarded by its caller.
_HELPER = re.compile(r"(__device__ __forceinline__ uint4 qmm_load_w\w*"
                     r"\(const uint4\* p(?P<live>, bool live)?\) \{\n)(.*?)(\n\}\n)", re.S)
_LOAD = re.compile(r"(@q |asm volatile\(\")(ld\.global\S*)")


_X_LOAD = "v = *reinterpret_cast<const uint4*>(x + "


def layer_in_form(text: str, form: str) -> str:
    """The CUDA layer ``text`` with every weight-load helper in ``form`` (``W[+X]``)."""
    form, _, x_form = form.partition("+")
    if len(_HELPER.findall(text)) != 3 or len(_LOAD.findall(text)) != 3:
        raise SystemExit("the CUDA layer's weight-load helpers changed shape; update "
                         "gpu_load_hints.py")
    if form == "plain":
        text = _HELPER.sub(
            lambda m: m.group(1) + ("  return live ? *p : make_uint4(0u, 0u, 0u, 0u);"
                                    if m.group("live") else "  return *p;") + m.group(4), text)
    elif form != "shipped":
        text = _LOAD.sub(lambda m: m.group(1) + FORMS[form], text)
    if not x_form:
        return text
    if text.count(_X_LOAD) != 1 or "void qmm_skinny_x" not in text:
        raise SystemExit("the skinny kernels' x load changed shape; update gpu_load_hints.py")
    helper = ("__device__ __forceinline__ uint4 qmm_load_x_form(const uint4* p) {\n"
              "  uint4 v;\n"
              f'  asm volatile("{X_FORMS[x_form]} {{%0, %1, %2, %3}}, [%4];\\n"\n'
              '               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));\n'
              "  return v;\n}\n\n")
    loader = re.search(r"template <[^\n]*>\n__device__ __forceinline__ void qmm_skinny_x", text)
    if loader is None:
        raise SystemExit("the skinny kernels' x loader changed shape; update gpu_load_hints.py")
    at = loader.start()
    text = (text[:at] + helper + text[at:]).replace(
        _X_LOAD, "v = qmm_load_x_form(reinterpret_cast<const uint4*>(x + ")
    # The statement needs one more closing parenthesis.
    return re.sub(r"(qmm_load_x_form\(reinterpret_cast<const uint4\*>\([^;]*?\)\));",
                  r"\1);", text, count=1, flags=re.S)

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forms", default="plain,shipped",
                        help="comma-separated, of plain, shipped, " + ", ".join(FORMS))
    parser.add_argument("--names", nargs="*", default=None,
                        help="only the cases of these configurations (default: all of CASES)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("load_hints_out"))
    args = parser.parse_args(argv)
    forms = [f for f in args.forms.split(",") if f]
    unknown = [f for f in forms if f.partition("+")[0] not in ("plain", "shipped", *FORMS)
               or f.partition("+")[2] not in ("", *X_FORMS)]
    if unknown or not forms:
        parser.error(f"--forms {args.forms!r}: accepted are plain, shipped, "
                     + ", ".join(FORMS) + ", each optionally +" + ", +".join(X_FORMS))
    cases = [c for c in CASES if args.names is None or c[0] in args.names]
    if not cases:
        parser.error(f"--names {args.names}: accepted are "
                     + ", ".join(sorted({c[0] for c in CASES})))

    from pytest_qmmperf.tiled import source
    from pytest_qmmperf.workloads.qmm import QmmSpec

    cuda = source.DIALECTS["cuda"]
    layer = type(cuda).layer
    launches: dict[tuple[str, str, str, int], Any] = {}
    for form in forms:
        type(cuda).layer = lambda self, f=form: (  # type: ignore[method-assign]
            layer_in_form(layer(self), f) if self.language == "cuda" else layer(self))
        for name, shape, M in cases:
            N, K = gk.SHAPES[shape]
            launches[form, name, shape, M] = gk.cupy_kernel(name, M, N, K)
    type(cuda).layer = layer  # type: ignore[method-assign]

    rows: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        order = forms if rnd % 2 == 0 else forms[::-1]
        for name, shape, M in cases:
            N, K = gk.SHAPES[shape]
            floor = gk.floor_s(QmmSpec(M=M, N=N, K=K))
            sets = gk.cupy_operands(M, N, K, gk.rotation(QmmSpec(M=M, N=N, K=K).weight_bytes))
            for form in order:
                launch = launches[form, name, shape, M]
                t = gk.kernel_time(launch, sets)
                rows.append({"round": rnd, "form": form, "name": name, "shape": shape, "M": M,
                             "us": t * 1e6, "floor_x": t / floor})
                print(f"r{rnd} {form:8s} {name:24s} {shape:8s} M={M:5d} {t * 1e6:8.2f} us "
                      f"{t / floor:5.2f}x floor", flush=True)
    print("\nmedian over rounds (ratio to the first form):")
    for name, shape, M in cases:
        line = f"{name:24s} {shape:8s} M={M:5d}"
        first = None
        for form in forms:
            v = statistics.median(r["us"] for r in rows if (r["form"], r["name"], r["shape"],
                                                             r["M"]) == (form, name, shape, M))
            first = first or v
            line += f" | {form} {v:7.2f} ({v / first:.3f})"
        print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load_hints.json").write_text(json.dumps(
        {"command": " ".join(sys.argv), "forms": forms, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
