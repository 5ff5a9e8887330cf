"""Experiment: the skinny kernel with 8-row weight fragments, CUDA only (not in the family).

    python benchmarks/gpu_skinny8.py                      # down, qo, gate_up, kv at 16, 8, 1
    python benchmarks/gpu_skinny8.py down,qo 16,8
    python benchmarks/gpu_skinny8.py --forms down,qo,gate_up 16,8   # variations of the prefetch

The family's skinny kernel feeds m16n8k16 the weights as A (16 rows) and
the tokens as B (8 of them), so a block holds 16-row fragments: down's
3072 rows make 96 blocks of 32 rows (`w16r2`) for the H100's 132 SMs. Here
the roles swap: x is A (tokens g and g + 8 of a lane, exactly the x each
lane of the skinny kernel already loads) and the weights are B (8 rows,
lane g's row), so fragments are 8 rows and `r3` makes 24-row blocks, 128 of
them for down. Each lane dequantizes one row per fragment instead of two.
The `p` form also loads the next super-step's weights and group terms
before this step's dequantization and MMAs (the registers that the
16-row kernel could not spare, PERFORMANCE.md 6l).

Built by patching the generator's skinny body and adding one struct to the
CUDA layer, then timed like ``gpu_tiles.py`` (CuPy, CUDA graph, weights
rotated through 256 MB) and checked against the float32 reference, next to
the family's skinny configurations. Float16, 4-bit, group 64. Section 6q of
docs/PERFORMANCE.md has the numbers and why it is not in the family.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from string import Template
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_decode as gd  # noqa: E402  (the CuPy float32 reference)
import gpu_kernels as gk  # noqa: E402  (the shared timing and CuPy helpers)

#: The CUDA layer's addition: 8-row fragments, x as A and the weights as B.
STRUCT = r"""
template <typename T, int TILES, int RF, int BITS>
struct QmmSkinny8 {
  static constexpr int ACC = 4 * RF;
  float acc[RF][4];
  uint32_t xw[TILES][16];
  int g;
  int t;
  __device__ __forceinline__ void init(unsigned lane) {
    g = static_cast<int>(lane) >> 2;
    t = static_cast<int>(lane) & 3;
#pragma unroll
    for (int f = 0; f < RF; ++f) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[f][e] = 0.0f;
      }
    }
  }
  __device__ __forceinline__ float value(int e) const { return acc[e / 4][e % 4]; }
  __device__ __forceinline__ int token(int e) const { return g + 8 * ((e % 4) >> 1); }
  __device__ __forceinline__ int out_row(int e) const { return 8 * (e / 4) + 2 * t + (e & 1); }
  __device__ __forceinline__ void load_x(const T* x, int m0, int ks, int K, int M) {
    const int k = ks + 32 * t;
#pragma unroll
    for (int i = 0; i < TILES; ++i) {
      const int m = m0 + 8 * i + g;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        uint4 v = qmm_zero4();
        if (k < K && m < M) {
          v = *reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * static_cast<size_t>(K) +
                                              static_cast<size_t>(k + 8 * c));
        }
        v = qmm_pair_order<BITS>(v);
        xw[i][4 * c] = v.x;
        xw[i][4 * c + 1] = v.y;
        xw[i][4 * c + 2] = v.z;
        xw[i][4 * c + 3] = v.w;
      }
    }
  }
  __device__ __forceinline__ void mma(int f, const uint32_t (&pw)[16]) {
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const uint32_t a[4] = {xw[0][2 * s], TILES > 1 ? xw[TILES - 1][2 * s] : 0u,
                             xw[0][2 * s + 1], TILES > 1 ? xw[TILES - 1][2 * s + 1] : 0u};
      const uint32_t b[2] = {pw[2 * s], pw[2 * s + 1]};
      QmmMma<T>::run(acc[f], a, b);
    }
  }
};
"""

#: The skinny body with 8-row fragments (``$RF`` of them a warp).
BODY = """  constexpr int W = $W;
  constexpr int RF = $RF;
  constexpr int BITS = $BITS;
  constexpr int GS = $GS;
  constexpr int PACK = 32 / BITS;
  constexpr int CW = BITS;
  constexpr int PW = PACK / 2;
  constexpr int ACC = 4 * RF;
$prologue
  const int KW = K / PACK;
  const int G = K / GS;
  const int n0 = bx * 8 * RF;
  const int m0 = by * 8 * TILES;
  QmmSkinny8<T, TILES, RF, BITS> sk;
  sk.init(lane);
  $shared float red[W * ACC * $SIMD];
  for (int ks = int(warp) * 128; ks < K; ks += W * 128) {
    uint32_t wv[RF][CW];
    float sv[RF];
    float bv[RF];
#pragma unroll
    for (int f = 0; f < RF; ++f) {
      const int row = n0 + 8 * f + sk.g;
      const int k = ks + 32 * sk.t;
      const bool live = k < K && row < N;
#pragma unroll
      for (int i = 0; i < CW; i += 4) {
        uint4 v = qmm_zero4();
        if (live) {
          v = qmm_load_w_line((const uint4*)(w + size_t(row) * size_t(KW) + size_t(k / PACK + i)));
        }
        wv[f][i] = qmm_word(v, 0);
        wv[f][i + 1] = qmm_word(v, 1);
        wv[f][i + 2] = qmm_word(v, 2);
        wv[f][i + 3] = qmm_word(v, 3);
      }
      sv[f] = 0.0f;
      bv[f] = 0.0f;
      if (live) {
        const size_t gi = size_t(row) * size_t(G) + size_t(k / GS);
        sv[f] = float(scales[gi]);
        bv[f] = float(biases[gi]);
      }
    }
    sk.load_x(x, m0, ks, K, M);
#pragma unroll
    for (int f = 0; f < RF; ++f) {
      QmmDq<T, BITS> dq;
      dq.set(sv[f], bv[f]);
      uint32_t pw[16];
#pragma unroll
      for (int q = 0; q < 16; ++q) {
        pw[q] = dq.pair(wv[f][q / PW], q % PW);
      }
      sk.mma(f, pw);
    }
  }
#pragma unroll
  for (int e = 0; e < ACC; ++e) {
    red[(int(warp) * ACC + e) * $SIMD + int(lane)] = sk.value(e);
  }
  $barrier;
#pragma unroll
  for (int e = 0; e < ACC; ++e) {
    const int m = m0 + sk.token(e);
    const int n = n0 + sk.out_row(e);
    if (e % W == int(warp) && m < M && n < N) {
      float v = 0.0f;
      for (int q = 0; q < W; ++q) {
        v += red[(q * ACC + e) * $SIMD + int(lane)];
      }
      out[size_t(m) * size_t(N) + size_t(n)] = static_cast<T>(v);
    }
  }
"""

#: The same, with the next super-step's weights loaded before this one's math.
BODY_PREFETCH = """  constexpr int W = $W;
  constexpr int RF = $RF;
  constexpr int BITS = $BITS;
  constexpr int GS = $GS;
  constexpr int PACK = 32 / BITS;
  constexpr int CW = BITS;
  constexpr int PW = PACK / 2;
  constexpr int ACC = 4 * RF;
$prologue
  const int KW = K / PACK;
  const int G = K / GS;
  const int n0 = bx * 8 * RF;
  const int m0 = by * 8 * TILES;
  QmmSkinny8<T, TILES, RF, BITS> sk;
  sk.init(lane);
  $shared float red[W * ACC * $SIMD];
  uint32_t wv[RF][CW];
  float sv[RF];
  float bv[RF];
  int kl = int(warp) * 128;
#pragma unroll
  for (int f = 0; f < RF; ++f) {
    const int row = n0 + 8 * f + sk.g;
    const int k = kl + 32 * sk.t;
    const bool live = k < K && row < N;
    uint4 v = qmm_zero4();
    if (live) {
      v = qmm_load_w_line((const uint4*)(w + size_t(row) * size_t(KW) + size_t(k / PACK)));
    }
    wv[f][0] = v.x; wv[f][1] = v.y; wv[f][2] = v.z; wv[f][3] = v.w;
    sv[f] = 0.0f;
    bv[f] = 0.0f;
    if (live) {
      const size_t gi = size_t(row) * size_t(G) + size_t(k / GS);
      sv[f] = float(scales[gi]);
      bv[f] = float(biases[gi]);
    }
  }
  for (int ks = int(warp) * 128; ks < K; ks += W * 128) {
    uint32_t wn[RF][CW];
    float sn[RF];
    float bn[RF];
    const int kn = ks + W * 128;
#pragma unroll
    for (int f = 0; f < RF; ++f) {
      const int row = n0 + 8 * f + sk.g;
      const int k = kn + 32 * sk.t;
      const bool live = k < K && row < N;
#pragma unroll
      for (int i = 0; i < CW; i += 4) {
        uint4 v = qmm_zero4();
        if (live) {
          v = qmm_load_w_line((const uint4*)(w + size_t(row) * size_t(KW) + size_t(k / PACK + i)));
        }
        wn[f][i] = qmm_word(v, 0);
        wn[f][i + 1] = qmm_word(v, 1);
        wn[f][i + 2] = qmm_word(v, 2);
        wn[f][i + 3] = qmm_word(v, 3);
      }
      sn[f] = 0.0f;
      bn[f] = 0.0f;
      if (live) {
        const size_t gi = size_t(row) * size_t(G) + size_t(k / GS);
        sn[f] = float(scales[gi]);
        bn[f] = float(biases[gi]);
      }
    }
    sk.load_x(x, m0, ks, K, M);
#pragma unroll
    for (int f = 0; f < RF; ++f) {
      QmmDq<T, BITS> dq;
      dq.set(sv[f], bv[f]);
      uint32_t pw[16];
#pragma unroll
      for (int q = 0; q < 16; ++q) {
        pw[q] = dq.pair(wv[f][q / PW], q % PW);
      }
      sk.mma(f, pw);
    }
#pragma unroll
    for (int f = 0; f < RF; ++f) {
#pragma unroll
      for (int i = 0; i < CW; ++i) {
        wv[f][i] = wn[f][i];
      }
      sv[f] = sn[f];
      bv[f] = bn[f];
    }
  }
#pragma unroll
  for (int e = 0; e < ACC; ++e) {
    red[(int(warp) * ACC + e) * $SIMD + int(lane)] = sk.value(e);
  }
  $barrier;
#pragma unroll
  for (int e = 0; e < ACC; ++e) {
    const int m = m0 + sk.token(e);
    const int n = n0 + sk.out_row(e);
    if (e % W == int(warp) && m < M && n < N) {
      float v = 0.0f;
      for (int q = 0; q < W; ++q) {
        v += red[(q * ACC + e) * $SIMD + int(lane)];
      }
      out[size_t(m) * size_t(N) + size_t(n)] = static_cast<T>(v);
    }
  }
"""



def prefetch_forms() -> dict[str, str]:
    """Variations of :data:`BODY_PREFETCH`, by name (``--forms``)."""
    p = BODY_PREFETCH
    x_load = "    sk.load_x(x, m0, ks, K, M);\n"
    next_w = "    uint32_t wn[RF][CW];\n"
    loop = "  for (int ks = int(warp) * 128; ks < K; ks += W * 128) {"
    terms_next = """      sn[f] = 0.0f;
      bn[f] = 0.0f;
      if (live) {
        const size_t gi = size_t(row) * size_t(G) + size_t(k / GS);
        sn[f] = float(scales[gi]);
        bn[f] = float(biases[gi]);
      }
"""
    terms_now = """#pragma unroll
    for (int f = 0; f < RF; ++f) {
      const int row = n0 + 8 * f + sk.g;
      const int k = ks + 32 * sk.t;
      sv[f] = 0.0f;
      bv[f] = 0.0f;
      if (k < K && row < N) {
        const size_t gi = size_t(row) * size_t(G) + size_t(k / GS);
        sv[f] = float(scales[gi]);
        bv[f] = float(biases[gi]);
      }
    }
"""
    for piece in (x_load, next_w, loop, terms_next, "      sv[f] = sn[f];\n      bv[f] = bn[f];\n"):
        assert piece in p, piece
    x_first = p.replace(x_load, "").replace(next_w, x_load + next_w)
    no_unroll = "#pragma unroll 1\n" + loop
    return {
        "p": p,
        # this step's x loaded before the next step's weights are asked for
        "p_xfirst": x_first,
        # only the weights ahead; the groups' scales and biases loaded in the step
        "p_wonly": p.replace(terms_next, "").replace(
            "      sv[f] = sn[f];\n      bv[f] = bn[f];\n", "").replace(x_load, x_load + terms_now),
        "p_nounroll": p.replace(loop, no_unroll),
        "p_xfirst_nounroll": x_first.replace(loop, no_unroll),
    }


#: (warps, fragments, prefetch) of the experiment.
CONFIGS = ((16, 3, False), (16, 3, True), (12, 3, True), (16, 2, True), (8, 3, True),
           (8, 4, True), (16, 4, True), (12, 4, False))
FAMILY = ("tiled:skinny:w16r2", "tiled:skinny:w8r2", "tiled:skinny:w12r2", "tiled:skinny:w16",
          "tiled:skinny")


def skinny8(warps: int, frags: int, M: int, N: int, K: int, prefetch: bool,
            body: str | None = None) -> Any:
    """``launch(x, w, scales, biases, out)`` of the 8-row kernel, through CuPy.

    ``body`` replaces the kernel body (:func:`prefetch_forms`)."""
    import cupy as cp

    from pytest_qmmperf import cuda
    from pytest_qmmperf.tiled import SkinnyConfig, source

    dialect = source.DIALECTS["cuda"]
    layer = type(dialect).layer
    saved_body = source._SKINNY_BODY
    text = (body or (BODY_PREFETCH if prefetch else BODY)).replace(
        "constexpr int RF = $RF;", f"constexpr int RF = {frags};")
    type(dialect).layer = lambda self: layer(self) + STRUCT  # type: ignore[method-assign]
    source._SKINNY_BODY = Template(text)
    try:
        src = source.generate(SkinnyConfig(warps=warps), bits=4, group_size=64, language="cuda")
    finally:
        source._SKINNY_BODY = saved_body
        type(dialect).layer = layer  # type: ignore[method-assign]
    tiles = source.skinny_tiles(M)
    template: list[tuple[str, str | int]] = [("T", "float16"), ("TILES", tiles)]
    code = cuda.translation_unit(src, dtype="float16", template=template,
                                 default_header=gk.CUPY_HEADER)
    fname = "mlx::core::cu::" + cuda.kernel_name(src, template)
    fn = cp.RawModule(code=code, options=("--std=c++17",),
                      name_expressions=[fname]).get_function(fname)
    blocks = (-(-N // (8 * frags)), -(-M // (8 * tiles)), 1)
    xs = cp.array([M, K], dtype=cp.int32)
    wsh = cp.array([N, K * 4 // 32], dtype=cp.int32)

    def launch(x: Any, w: Any, s: Any, b: Any, out: Any) -> None:
        fn(blocks, (32 * warps, 1, 1), (x, xs, cp.int32(2), w, wsh, s, b, out))

    launch.registers = fn.num_regs  # type: ignore[attr-defined]
    return launch


def forms_main(argv: list[str]) -> int:
    """``--forms SHAPES MS``: the prefetch variations and the plain form, per configuration."""
    import cupy as cp

    shapes = argv[0].split(",") if argv else ["down", "qo", "gate_up"]
    m_values = [int(v) for v in argv[1].split(",")] if len(argv) > 1 else [16, 8]
    for shape in shapes:
        N, K = gk.SHAPES[shape]
        for M in m_values:
            spec, sets, ref, scale = gd.problem(M, N, K)
            x, w, s, b, out = sets[0]
            rows = []
            for warps, frags in ((16, 3), (12, 3), (8, 4)):
                for name, body in (("plain", BODY), *prefetch_forms().items()):
                    launch = skinny8(warps, frags, M, N, K, False, body)
                    out.fill(0)
                    launch(x, w, s, b, out)
                    err = float(cp.abs(out.astype(cp.float32) - ref).max()) / scale
                    if err > 1e-2:
                        raise SystemExit(f"8-row w{warps}r{frags} {name}: relative error "
                                         f"{err:.2g} on {shape} M={M}")
                    t = statistics.median(gk.event_time(launch, sets) for _ in range(3))
                    rows.append((t * 1e6, f"8-row w{warps}r{frags} {name} "
                                          f"({launch.registers} registers)"))
            floor = gk.floor_s(spec) * 1e6
            print(f"{shape} M={M} floor {floor:.2f} us:", flush=True)
            for t, name in sorted(rows):
                print(f"    {name:46s} {t:7.2f} us {t / floor:5.2f}x", flush=True)
            del sets, ref
            cp.get_default_memory_pool().free_all_blocks()
    return 0


def main(argv: list[str]) -> int:
    import cupy as cp

    if argv[:1] == ["--forms"]:
        return forms_main(argv[1:])
    shapes = argv[0].split(",") if argv else ["down", "qo", "gate_up", "kv"]
    m_values = [int(v) for v in argv[1].split(",")] if len(argv) > 1 else [16, 8, 1]
    for shape in shapes:
        N, K = gk.SHAPES[shape]
        for M in m_values:
            spec, sets, ref, scale = gd.problem(M, N, K)
            x, w, s, b, out = sets[0]
            rows = []
            for name in FAMILY:
                launch = gk.cupy_kernel(name, M, N, K)
                t = statistics.median(gk.event_time(launch, sets) for _ in range(3))
                rows.append((t * 1e6, name))
            for warps, frags, prefetch in CONFIGS:
                launch = skinny8(warps, frags, M, N, K, prefetch)
                out.fill(0)
                launch(x, w, s, b, out)
                err = float(cp.abs(out.astype(cp.float32) - ref).max()) / scale
                if err > 1e-2:
                    raise SystemExit(f"8-row w{warps}r{frags}: relative error {err:.2g} on "
                                     f"{shape} M={M}")
                t = statistics.median(gk.event_time(launch, sets) for _ in range(3))
                rows.append((t * 1e6, f"8-row w{warps}r{frags}{'p' if prefetch else ''} "
                                      f"({launch.registers} registers)"))
            floor = gk.floor_s(spec) * 1e6
            print(f"{shape} M={M} floor {floor:.2f} us:", flush=True)
            for t, name in sorted(rows):
                print(f"    {name:38s} {t:7.2f} us {t / floor:5.2f}x", flush=True)
            del sets, ref
            cp.get_default_memory_pool().free_all_blocks()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
