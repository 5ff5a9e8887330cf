"""Parameters of the tiled QMM kernel family: validation, names and presets.

One set of rules for every language the kernels are generated in, so that a
tile that is accepted for Metal is the same tile that is compiled and
verified through CUDA.  Everything here is pure Python: no MLX, no GPU.

Names::

    tiled:BMxBN[xBK]:wmWMwnWN[:kS][:dMAXM]  e.g. tiled:160x32:wm4wn1, tiled:64x64x64:wm2wn2:d0,
                                         tiled:96x64x64:wm4wn2:k4
    tiled:decode[:rRwW[uU][kS]]          the one-token kernel on its own, e.g. tiled:decode:r2w4u4
    tiled:skinny[:wW[rR][h][p]]          the few-token tensor-core kernel, e.g. tiled:skinny:w4r2;
                                         h: 8-row fragments, p: weights a step ahead
    tiled:wide:wWrRmTOK[:kS][:dMAXM][:gM] weights dequantized in registers, x staged in
                                         threadgroup memory, e.g. tiled:wide:w8r2m64:g512
    tiled:dequant                        the dequant kernel, then MLX's dense matmul

``BM`` (tokens) x ``BN`` (weight rows) x ``BK`` (reduction) is the block tile,
``WM`` x ``WN`` the split of the block into SIMD groups (warps), each taking
a ``BM/WM`` x ``BN/WN`` sub-tile.  ``S`` splits K over that many blocks
per output tile (their float32 partial sums are then added in a fixed
order), for grids that would otherwise leave SMs idle.  ``MAXM`` is the largest M still sent to
the small-M kernels instead of the tile: the decode kernel at M = 1, the
skinny kernel from M = 2 (default :data:`DEFAULT_DECODE_MAX_M`; ``d0`` never).
``:gM`` (wide only) sends M and larger to the dequant kernel followed by
MLX's dense matmul.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

FAMILY = "tiled"

#: SIMD-group width on Apple GPUs and warp width on NVIDIA GPUs.
SIMD = 32
#: Threads per threadgroup that both Metal and CUDA accept.
MAX_THREADS = 1024
#: Threadgroup memory of an Apple GPU threadgroup (CUDA's static limit: below).
TG_MEMORY_LIMIT = 32768
#: Static shared memory a CUDA block may declare (what the CUDA-only forms are held to).
CUDA_SHARED_LIMIT = 49152
#: What fetching the next super-step's weights ahead adds to the 8-row skinny kernel's
#: registers at most (``p``; 30 measured, :attr:`SkinnyConfig.registers`).
PREFETCH_REGISTERS = 30
#: The largest thread-block cluster CUDA guarantees to launch.
MAX_CLUSTER = 8
#: Halves of padding per shared-memory row: keeps 16-byte rows and spreads banks.
PAD = 8
#: Fragment granularity. Tokens: 8 (Metal's 8x8 simdgroup matrix, the N of
#: CUDA's m16n8k16). Weight rows: 16 (the M of m16n8k16; 8x8 divides it).
#: Reduction: 16 (m16n8k16's K; Metal steps 8 within it).
FRAG_TOKENS = 8
FRAG_ROWS = 16
FRAG_K = 16
#: 32-bit values a thread keeps live across the K loop: its accumulators plus
#: the next tile prefetched into registers. nvcc for sm_90 spills the kernel
#: from about 120 on (tiled:128x64x64:wm2wn2 at 8 bits: 64 + 56).
MAX_LIVE_REGISTERS = 112
#: 32-bit registers one CUDA block may use (every NVIDIA GPU since sm_50): a
#: kernel that needs more is refused at launch ("too many resources
#: requested"), and MLX cannot ask nvcc for fewer (no __launch_bounds__).
REGISTERS_PER_BLOCK = 65536
#: What ptxas adds to :attr:`TileConfig.live_registers` (addresses, loop
#: state, fragments): 50-90 measured on sm_90a, so 96 is assumed.
REGISTER_OVERHEAD = 96
DEFAULT_BK = 32
#: Blocks a tile's K may be split over at most.
MAX_TILE_SPLITS = 16
#: Largest M a tile variant sends to its small-M kernels (measured on the H100:
#: at M = 16 the skinny kernel took 2.3-3.4x the floor, the tiles 10-30x).
DEFAULT_DECODE_MAX_M = 16
#: Tokens per skinny block at most (two 8-token fragments); larger M is split
#: over the grid's y axis.
SKINNY_MAX_TOKENS = 16
#: 16-row weight fragments a skinny warp takes at most.
MAX_SKINNY_ROWS = 4
#: K one skinny super-step covers: 4 lanes x 32 consecutive k each.
SKINNY_STEP_K = 128
#: The wide kernel stages each token's 128 k of a super-step in a row of this
#: many halves, its 16-byte units swizzled (the layers' qmm_wide_unit) so
#: that the CUDA layer's 16-byte fragment reads (each quarter-warp: tokens g,
#: g+1 x chunks 0-3) and the staging stores are free of bank conflicts; two
#: buffers, so that a super-step needs one barrier.
WIDE_ROW_PITCH = 128
#: Threads of a dequant block (one weight row a block, a 32-bit word a thread and step).
DEQUANT_THREADS = 256
#: Tokens one wide block stages at most (threadgroup memory: 2 x 64 x 128 halves).
MAX_WIDE_TOKENS = 64
#: :attr:`WideConfig.live_registers` at most. ptxas for sm_90a adds 60-100 to
#: it (the unrolled steps' dequantized pairs and addresses): at 160
#: (w8r2m64) it allocates 235-254 registers without spills; at 176 (w4r2m64)
#: and 200 (w4r4m16) it spills 24-100 bytes at 8 bits. Near the limit the
#: schedule decides: w4r2m48 (152) spills 8 bytes with bfloat16 at 8 bits.
MAX_WIDE_LIVE_REGISTERS = 160
#: Rows of x one decode block handles at most; larger M is split over the grid's y axis.
DECODE_MAX_TOKENS = 8
#: 16-byte weight vectors a decode lane holds per step (rows x vectors), double-buffered.
MAX_DECODE_VECTORS = 8
#: Weight rows a decode warp takes at most: at 8 tokens, 8 rows spill on sm_90a.
MAX_DECODE_ROWS = 4
#: The decode kernel's (rows, warps, vectors, splits) when not named: ``tiled:decode``.
#: (2, 4, 1) was the fastest of the 18 configurations tried over the
#: Llama-3.2-3B projections at M = 1, 8 and 16 on the H100 (docs/PERFORMANCE.md,
#: section 6c); more vectors per lane did not help there.
DECODE_DEFAULT = (2, 4, 1, 1)

#: Quantization settings the kernels implement (affine mode only).
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = ("float16", "bfloat16")


class TileError(ValueError):
    """Invalid kernel parameters; the message is one line naming them."""


def _positive(name: str, label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TileError(f"{name}: {label}={value!r} must be a positive integer")


def _non_negative(name: str, label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TileError(f"{name}: {label}={value!r} must be an integer >= 0")


def _check_splits(name: str, splits: Any) -> None:
    """Blocks an output tile's K is split over (tile and wide kernels)."""
    _positive(name, "splits", splits)
    if splits > MAX_TILE_SPLITS:
        raise TileError(f"{name}: splits={splits} exceeds {MAX_TILE_SPLITS} blocks per output tile")


def _check_clusters(name: str, clusters: Any) -> None:
    """Blocks of a thread-block cluster that split K (wide and skinny kernels, CUDA)."""
    _positive(name, "clusters", clusters)
    if clusters > MAX_CLUSTER:
        raise TileError(f"{name}: clusters={clusters} exceeds {MAX_CLUSTER} blocks, the "
                        "largest thread-block cluster CUDA guarantees to launch")


def _check_block_registers(name: str, threads: int, registers: int, remedy: str,
                           why: str = "refused at launch") -> None:
    """A CUDA launch is refused when a block's threads need more than its registers."""
    if threads * registers > REGISTERS_PER_BLOCK:
        raise TileError(
            f"{name}: {threads} threads x about {registers} registers each exceed the "
            f"{REGISTERS_PER_BLOCK} registers of a CUDA block ({why}); {remedy}"
        )


def _check_warps(name: str, warps: int) -> None:
    if SIMD * warps > MAX_THREADS:
        raise TileError(
            f"{name}: {warps} warps make {SIMD * warps} threads, over the "
            f"{MAX_THREADS}-thread threadgroup limit"
        )


@dataclass(frozen=True)
class DecodeConfig:
    """The small-M kernel: each warp streams ``rows`` weight rows, ``warps`` warps a block.

    Every lane reads ``vectors`` 16-byte weight vectors per row per step and
    prefetches the next step's, so a warp has up to ``2 x rows x vectors x
    512`` bytes in flight; the K of a row is shared by the 32 lanes of one
    warp (reduced with a SIMD sum), or with ``splits`` > 1 by that many
    warps of the block, each taking every ``splits``-th step (their sums
    meet in threadgroup memory).  A matrix-vector product is bound by how
    many bytes are in flight per SM and by how many steps each warp waits
    for one after another; with few rows (N) and a long K, ``vectors`` raises
    the first and ``splits`` cuts the second.
    """

    rows: int = DECODE_DEFAULT[0]
    warps: int = DECODE_DEFAULT[1]
    vectors: int = DECODE_DEFAULT[2]
    splits: int = DECODE_DEFAULT[3]

    def __post_init__(self) -> None:
        name = self.name
        _positive(name, "rows", self.rows)
        _positive(name, "warps", self.warps)
        _positive(name, "vectors", self.vectors)
        _positive(name, "splits", self.splits)
        if self.warps % self.splits:
            raise TileError(
                f"{name}: warps={self.warps} is not divisible by splits={self.splits} (each "
                "group of `splits` warps shares the same rows)"
            )
        if self.rows > MAX_DECODE_ROWS:
            raise TileError(
                f"{name}: rows={self.rows} exceeds {MAX_DECODE_ROWS} rows per warp (register "
                f"budget: {DECODE_MAX_TOKENS} tokens x rows partial sums, twice)"
            )
        if self.rows * self.vectors > MAX_DECODE_VECTORS:
            raise TileError(
                f"{name}: rows x vectors = {self.rows * self.vectors} exceeds "
                f"{MAX_DECODE_VECTORS} 16-byte vectors per lane and step (register budget: "
                "they are double-buffered)"
            )
        _check_warps(name, self.warps)

    @property
    def threads(self) -> int:
        return SIMD * self.warps

    @property
    def rows_per_block(self) -> int:
        return self.rows * self.warps // self.splits

    @property
    def name(self) -> str:
        if (self.rows, self.warps, self.vectors, self.splits) == DECODE_DEFAULT:
            return f"{FAMILY}:decode"
        name = f"{FAMILY}:decode:r{self.rows}w{self.warps}"
        name += f"u{self.vectors}" if self.vectors != 1 else ""
        return name + (f"k{self.splits}" if self.splits != 1 else "")

    def params(self) -> dict[str, Any]:
        return {"kernel": "decode", "rows": self.rows, "warps": self.warps,
                "vectors": self.vectors, "splits": self.splits}


@dataclass(frozen=True)
class SkinnyConfig:
    """The few-token kernel on tensor cores: 16 weight rows per block, ``warps`` warps split K.

    Every lane owns 32 consecutive k of two weight rows (one or two 16-byte
    vectors each) and of its tokens, and feeds them to the matrix unit in
    an order of k that is the same for both operands (a sum over k does not
    care), so no lane waits for another's data; the warps' partial sums meet
    in threadgroup memory.  Dequantization costs the same at 1 token as at
    16, so from 2 tokens on it beats the decode kernel.  With ``rows`` > 1
    a block takes ``rows`` x 16 weight rows and each lane reuses its tokens'
    activations for all of them, so x is read from L2 ``rows`` times less.

    With ``half`` (``h`` in the name) the fragments are 8 rows: the CUDA
    layer swaps m16n8k16's operands (x as A, the weights as B), so a block
    can hold 8 x ``rows`` rows, e.g. 128 blocks of 24 for a 3072-row
    projection instead of 96 of 32, and each lane dequantizes one row per
    fragment.  ``prefetch`` (``p``, 8-row fragments only) asks for the next
    super-step's weights before this one's are dequantized.
    docs/PERFORMANCE.md, section 6q, measured both.

    ``clusters`` (``:cS``, CUDA on sm_90 and later) splits K over the S
    blocks of a thread-block cluster as well: block b's warps take super-steps
    b * warps + w, (b + S) * warps + w, ..., and after the block's warps have
    added their sums, each block reads the S blocks' sums of the outputs it
    owns from their shared memory, adds them in block order and writes them.
    So S blocks of ``rows`` fragments each read only their share of x, where
    one block of S x ``rows`` fragments would leave SMs idle.  On an H100 it
    was slower at every Llama-3.2-3B shape and configuration tried
    (docs/PERFORMANCE.md, section 6x).  Metal has no clusters and refuses it.
    """

    warps: int = 8
    rows: int = 1
    half: bool = False
    prefetch: bool = False
    clusters: int = 1

    def __post_init__(self) -> None:
        name = self.name
        _positive(name, "warps", self.warps)
        _positive(name, "rows", self.rows)
        _check_warps(name, self.warps)
        _check_clusters(name, self.clusters)
        if self.rows > MAX_SKINNY_ROWS * (2 if self.half else 1):
            raise TileError(
                f"{name}: rows={self.rows} exceeds {MAX_SKINNY_ROWS} 16-row fragments per warp "
                f"({2 * MAX_SKINNY_ROWS} of 8 rows; register budget: each holds its packed "
                "weights and accumulators)"
            )
        if self.prefetch and not self.half:
            raise TileError(
                f"{name}: prefetch (p) needs 8-row fragments (h): with 16-row fragments the "
                "next super-step's weights do not fit in a lane's registers"
            )
        _check_block_registers(
            name, self.threads, self.launch_registers, "use fewer warps or rows",
            "even without fetching ahead: its launch bounds would make it spill"
            if self.launch_bounds else "refused at launch")
        # A cluster split runs on CUDA only, whose blocks may declare more.
        limit, of = ((CUDA_SHARED_LIMIT, "static shared memory of a CUDA block")
                     if self.clusters > 1 else (TG_MEMORY_LIMIT, "Apple GPUs"))
        if self.shared_bytes > limit:
            raise TileError(
                f"{name}: needs {self.shared_bytes} bytes of threadgroup memory (warps x rows x "
                f"32 lanes x 8 partial sums), over the {limit}-byte limit of {of}"
            )

    @property
    def threads(self) -> int:
        return SIMD * self.warps

    @property
    def fragment_rows(self) -> int:
        return FRAG_ROWS // 2 if self.half else FRAG_ROWS

    @property
    def rows_per_block(self) -> int:
        return self.fragment_rows * self.rows

    @property
    def registers(self) -> int:
        """Registers per thread, as ptxas allocates them for sm_90a at 8 bits (the widest)
        when nothing holds it back: 95, 128 and 224 measured at 1, 2 and 4 rows; with
        8-row fragments at most 62, 76, 104 and 122 at 1-4 rows over the bit widths and
        dtypes, and up to 30 more with prefetch (134 at 3 rows)."""
        if self.half:
            return 44 + 20 * self.rows + (PREFETCH_REGISTERS if self.prefetch else 0)
        return 64 + 32 * self.rows + (32 if self.rows >= 3 else 0)

    @property
    def launch_bounds(self) -> bool:
        """Whether the CUDA kernel declares launch bounds of its threads: with prefetch,
        where :attr:`registers` would not fit a block, so that ptxas keeps to the block's
        share of the 65536 (``w16r3hp``: 90-128 registers over bit widths, dtypes and
        groups, no spills, where it takes up to 134 and does not launch).  Elsewhere the
        kernels stay as measured: bounds change ptxas's schedule even where they do not
        bind."""
        return self.prefetch and self.threads * self.registers > REGISTERS_PER_BLOCK

    @property
    def launch_registers(self) -> int:
        """What the block's registers are checked with: with launch bounds, the form
        without prefetch has to fit, so that the bounds only cost fetching ahead, not
        spills."""
        return self.registers - PREFETCH_REGISTERS if self.launch_bounds else self.registers

    @property
    def shared_bytes(self) -> int:
        """The warps' partial sums: 4 floats per lane and 8-token fragment, two token
        fragments, each 16-row fragment (half as many for 8-row fragments)."""
        return self.warps * self.rows * SIMD * 4 * 2 * 4 * self.fragment_rows // FRAG_ROWS

    @property
    def name(self) -> str:
        default = SkinnyConfig.__dataclass_fields__
        cluster = f":c{self.clusters}" if self.clusters != 1 else ""
        if (self.warps, self.rows, self.half, self.prefetch) == (
                default["warps"].default, default["rows"].default, False, False):
            return f"{FAMILY}:skinny{cluster}"
        return (f"{FAMILY}:skinny:w{self.warps}" + (f"r{self.rows}" if self.rows != 1 else "")
                + ("h" if self.half else "") + ("p" if self.prefetch else "") + cluster)

    def params(self) -> dict[str, Any]:
        return {"kernel": "skinny", "warps": self.warps, "rows": self.rows,
                "fragment_rows": self.fragment_rows, "prefetch": self.prefetch,
                "clusters": self.clusters}


@dataclass(frozen=True)
class TileConfig:
    """A block tile ``bm x bn x bk`` split ``wm x wn`` over SIMD groups.

    Construction validates everything that does not depend on the problem
    shape and raises :class:`TileError` with a one-line reason.
    """

    bm: int
    bn: int
    bk: int = DEFAULT_BK
    wm: int = 2
    wn: int = 2
    decode_max_m: int = DEFAULT_DECODE_MAX_M
    splits: int = 1

    def __post_init__(self) -> None:
        name = self.name
        for label in ("bm", "bn", "bk", "wm", "wn"):
            _positive(name, label.upper(), getattr(self, label))
        _check_splits(name, self.splits)
        _non_negative(name, "decode_max_m", self.decode_max_m)
        if self.bm % self.wm:
            raise TileError(
                f"{name}: BM={self.bm} is not divisible by WM={self.wm} (each of the WM x WN "
                "SIMD groups takes an equal BM/WM x BN/WN sub-tile)"
            )
        if self.bn % self.wn:
            raise TileError(
                f"{name}: BN={self.bn} is not divisible by WN={self.wn} (each of the WM x WN "
                "SIMD groups takes an equal BM/WM x BN/WN sub-tile)"
            )
        if self.warp_tile_m % FRAG_TOKENS:
            raise TileError(
                f"{name}: the SIMD-group tile BM/WM={self.warp_tile_m} must be a multiple of "
                f"{FRAG_TOKENS} tokens (an 8x8 simdgroup matrix; the N of CUDA's m16n8k16)"
            )
        if self.warp_tile_n % FRAG_ROWS:
            raise TileError(
                f"{name}: the SIMD-group tile BN/WN={self.warp_tile_n} must be a multiple of "
                f"{FRAG_ROWS} weight rows (the M of CUDA's m16n8k16)"
            )
        if self.bk % FRAG_K:
            raise TileError(
                f"{name}: BK={self.bk} must be a multiple of {FRAG_K} (the K of CUDA's m16n8k16)"
            )
        if self.threads > MAX_THREADS:
            raise TileError(
                f"{name}: WM x WN = {self.wm * self.wn} SIMD groups make {self.threads} threads, "
                f"over the {MAX_THREADS}-thread threadgroup limit"
            )
        if self.shared_bytes > TG_MEMORY_LIMIT:
            raise TileError(
                f"{name}: needs {self.shared_bytes} bytes of threadgroup memory "
                f"((BM+BN) x (BK+{PAD}) halves), over the {TG_MEMORY_LIMIT}-byte limit of "
                "Apple GPUs"
            )
        _check_block_registers(
            name, self.threads, self.live_registers + REGISTER_OVERHEAD,
            "use at most 256 threads (WM x WN <= 8) or a smaller SIMD-group tile")
        if self.live_registers > MAX_LIVE_REGISTERS:
            raise TileError(
                f"{name}: a thread keeps {self.live_registers} registers live across the K loop "
                f"({self.accumulators} accumulators of its {self.warp_tile_m}x{self.warp_tile_n} "
                f"SIMD-group tile, {self.live_registers - self.accumulators} for the prefetched "
                f"tile), over {MAX_LIVE_REGISTERS}: they would spill; raise WM or WN, or lower BK"
            )

    # --- derived tile arithmetic -------------------------------------

    @property
    def threads(self) -> int:
        return SIMD * self.wm * self.wn

    @property
    def warp_tile_m(self) -> int:
        return self.bm // self.wm

    @property
    def warp_tile_n(self) -> int:
        return self.bn // self.wn

    @property
    def pitch(self) -> int:
        """Elements per shared-memory row (BK plus padding)."""
        return self.bk + PAD

    @property
    def shared_bytes(self) -> int:
        """Threadgroup memory: a BM x BK activation tile and a BN x BK weight tile, 2-byte."""
        return (self.bm + self.bn) * self.pitch * 2

    @property
    def accumulators(self) -> int:
        return self.warp_tile_m * self.warp_tile_n // SIMD

    @property
    def live_registers(self) -> int:
        """Accumulators plus the registers holding the next tile (at 8 bits, the widest).

        Activations travel as 16-byte vectors (4 registers), weights as words
        with their scale and bias (3 registers each).
        """
        vectors = -(-self.bm * self.bk // 8 // self.threads)
        words = -(-self.bn * self.bk // 4 // self.threads)
        return self.accumulators + 4 * vectors + 3 * words

    @property
    def name(self) -> str:
        shape = f"{self.bm}x{self.bn}"
        if self.bk != DEFAULT_BK:
            shape += f"x{self.bk}"
        name = f"{FAMILY}:{shape}:wm{self.wm}wn{self.wn}"
        if self.splits != 1:
            name += f":k{self.splits}"
        if self.decode_max_m != DEFAULT_DECODE_MAX_M:
            name += f":d{self.decode_max_m}"
        return name

    def params(self) -> dict[str, Any]:
        return {
            "kernel": "tiled", "BM": self.bm, "BN": self.bn, "BK": self.bk, "WM": self.wm,
            "WN": self.wn, "splits": self.splits, "decode_max_m": self.decode_max_m,
            "threads": self.threads,
            "shared_bytes": self.shared_bytes,
        }


@dataclass(frozen=True)
class WideConfig:
    """Weights dequantized in registers, activations staged in threadgroup memory.

    A block takes ``tokens`` tokens and ``warps`` x ``rows`` x 16 weight rows;
    each warp owns ``rows`` 16-row fragments. Per 128-k super-step the block
    stages its tokens' activations in threadgroup memory once, and every lane
    reads its own 32 consecutive k of its two weight rows per fragment
    straight from device memory (no weight tile in threadgroup memory),
    dequantizes them and feeds them to the matrix unit against each 8-token
    fragment of x: each weight is dequantized once per block and used
    ``tokens / 8`` times, each activation fragment read from threadgroup
    memory once per warp and used ``rows`` times. The skinny kernel's lane
    layout, for tens to thousands of tokens. ``splits`` splits K over that
    many blocks (float32 partial sums added in order, as for a tile);
    ``decode_max_m`` as for a tile; ``gemm_min_m`` hands M from there on to
    :class:`DequantConfig`'s kernel and MLX's dense matmul; ``mlx_max_m``
    hands M up to it to ``mx.quantized_matmul``.

    The matrix unit is the layer's choice: on Hopper (sm_90a) a configuration
    of 64 tokens, whole warpgroups (warps a multiple of 4) and two or more
    fragments a warp multiplies with ``wgmma``, straight from x's staged copy
    in wgmma's layout (three buffers, 48 KiB at 64 tokens); every other
    configuration, and every other GPU, with ``mma.sync`` (Metal: simdgroup
    matrices) from two buffers.

    ``clusters`` (``:cS``, CUDA on sm_90 and later) splits K over the S
    blocks of a thread-block cluster instead: after the K loop each block
    puts the partial sums of the outputs it does not own into their owner's
    shared memory (where x was staged; in :attr:`cluster_rounds` rounds where
    they do not fit at once), and each owner adds the S blocks' sums in block
    order and writes ``T``, so no planes and no second kernel (PERFORMANCE.md
    6v).  Metal has no clusters and refuses it.
    """

    warps: int = 4
    rows: int = 2
    tokens: int = 64
    splits: int = 1
    clusters: int = 1
    decode_max_m: int = DEFAULT_DECODE_MAX_M
    #: From this M on, the weights are dequantized by the family's dequant kernel
    #: and multiplied by MLX's dense matmul (``g`` in the name); 0: never.
    gemm_min_m: int = 0
    #: Up to this M, MLX's own ``mx.quantized_matmul`` runs instead (``q`` in
    #: the name); 0: never.  A custom kernel costs MLX's host ~16 us more per
    #: launch than a built-in one (PERFORMANCE.md 6n), which decides a decode
    #: step of ~200 launches whenever the host bounds it, however fast the
    #: kernel.
    mlx_max_m: int = 0

    def __post_init__(self) -> None:
        name = self.name
        for label in ("warps", "rows", "tokens"):
            _positive(name, label, getattr(self, label))
        _check_splits(name, self.splits)
        _check_warps(name, self.warps)
        _check_clusters(name, self.clusters)
        _non_negative(name, "decode_max_m", self.decode_max_m)
        _non_negative(name, "gemm_min_m", self.gemm_min_m)
        _non_negative(name, "mlx_max_m", self.mlx_max_m)
        if 0 < self.gemm_min_m <= self.mlx_max_m:
            raise TileError(
                f"{name}: mlx_max_m={self.mlx_max_m} must be under gemm_min_m={self.gemm_min_m}"
            )
        if 0 < self.gemm_min_m <= self.decode_max_m:
            raise TileError(
                f"{name}: gemm_min_m={self.gemm_min_m} must exceed decode_max_m="
                f"{self.decode_max_m} (or be 0): the small-M kernels take M <= decode_max_m"
            )
        if self.tokens % FRAG_TOKENS or self.tokens > MAX_WIDE_TOKENS:
            raise TileError(
                f"{name}: tokens={self.tokens} must be a multiple of {FRAG_TOKENS} (8-token "
                f"fragments) up to {MAX_WIDE_TOKENS} (threadgroup memory)"
            )
        if self.rows > MAX_SKINNY_ROWS:
            raise TileError(
                f"{name}: rows={self.rows} exceeds {MAX_SKINNY_ROWS} 16-row fragments per warp "
                "(register budget: each holds its packed weights, twice, and accumulators)"
            )
        if self.live_registers > MAX_WIDE_LIVE_REGISTERS:
            raise TileError(
                f"{name}: a thread keeps {self.live_registers} registers live across the K loop "
                f"({self.accumulators} accumulators, the rest the next super-step's weights and "
                f"activations), over {MAX_WIDE_LIVE_REGISTERS}: they would spill; use fewer rows "
                "or tokens, or more warps"
            )
        _check_block_registers(name, self.threads, self.live_registers + REGISTER_OVERHEAD,
                               "use fewer warps")
        if self.clusters > 1:
            if self.splits > 1:
                raise TileError(
                    f"{name}: splits K both into planes (k{self.splits}) and over a cluster "
                    f"(c{self.clusters}); use one"
                )
            if (self.clusters - 1) * self.threads * 16 > self.cuda_shared_bytes:
                raise TileError(
                    f"{name}: one 16-byte group of sums a thread from each of the cluster's "
                    f"other {self.clusters - 1} blocks needs "
                    f"{(self.clusters - 1) * self.threads * 16} bytes, more than the "
                    f"{self.cuda_shared_bytes} its x buffers free; use fewer clusters or more "
                    "tokens"
                )
            staged = self.cluster_tiles * FRAG_TOKENS * (self.rows_per_block + 8) * 2
            if staged > self.cuda_shared_bytes:
                raise TileError(
                    f"{name}: the {self.cluster_tiles * FRAG_TOKENS} token rows a block of the "
                    f"cluster writes need {staged} bytes staged, more than the "
                    f"{self.cuda_shared_bytes} its x buffers free; use more tokens or fewer "
                    "rows"
                )

    @property
    def threads(self) -> int:
        return SIMD * self.warps

    @property
    def rows_per_block(self) -> int:
        return FRAG_ROWS * self.rows * self.warps

    @property
    def cluster_tiles(self) -> int:
        """8-token tiles of each fragment that the cluster's first block owns (tile i
        belongs to block i % clusters; the others own as many or one fewer)."""
        return -(-(self.tokens // FRAG_TOKENS) // self.clusters)

    @property
    def cluster_rounds(self) -> int:
        """Rounds in which a cluster's blocks exchange their partial sums (the CUDA
        layer's ``QmmClusterSum``): a block owns up to ``rows`` x :attr:`cluster_tiles`
        16-byte groups of each thread's sums and receives the other blocks' groups of
        them in its x buffers, as many a round as fit."""
        owned = self.rows * self.cluster_tiles
        per_round = self.cuda_shared_bytes // ((self.clusters - 1) * self.threads * 16)
        return -(-owned // per_round)

    @property
    def accumulators(self) -> int:
        return self.rows * FRAG_ROWS * self.tokens // SIMD

    @property
    def shared_bytes(self) -> int:
        """The staged activations: two buffers of ``tokens`` rows of
        :data:`WIDE_ROW_PITCH` halves (the CUDA layer's wgmma form takes a
        third, inside CUDA's 48 KiB of static shared memory)."""
        return 2 * self.tokens * WIDE_ROW_PITCH * 2

    @property
    def wgmma(self) -> bool:
        """Whether the CUDA layer multiplies with ``wgmma`` on Hopper (its
        ``qmm_wide_wgmma``: 64 tokens, whole warpgroups, two or more fragments a warp)."""
        return self.tokens == 64 and self.warps % 4 == 0 and self.rows >= 2

    @property
    def cuda_shared_bytes(self) -> int:
        """The staged activations on a Hopper GPU: a third buffer for ``wgmma``."""
        return (3 if self.wgmma else 2) * self.tokens * WIDE_ROW_PITCH * 2

    @property
    def live_registers(self) -> int:
        """Accumulators, the next super-step's activations (16-byte vectors, 4 registers
        each), and this and the next super-step's weights at 8 bits (the widest: 8 words
        per row and fragment, two rows, plus a scale and a bias each)."""
        vectors = -(-self.tokens * SKINNY_STEP_K // 8 // self.threads)
        return self.accumulators + 4 * vectors + 2 * self.rows * 2 * (8 + 2)

    @property
    def name(self) -> str:
        name = f"{FAMILY}:wide:w{self.warps}r{self.rows}m{self.tokens}"
        if self.splits != 1:
            name += f":k{self.splits}"
        if self.clusters != 1:
            name += f":c{self.clusters}"
        if self.decode_max_m != DEFAULT_DECODE_MAX_M:
            name += f":d{self.decode_max_m}"
        if self.gemm_min_m:
            name += f":g{self.gemm_min_m}"
        if self.mlx_max_m:
            name += f":q{self.mlx_max_m}"
        return name

    def params(self) -> dict[str, Any]:
        return {"kernel": "wide", "warps": self.warps, "rows": self.rows,
                "tokens": self.tokens, "splits": self.splits, "clusters": self.clusters,
                "decode_max_m": self.decode_max_m, "gemm_min_m": self.gemm_min_m,
                "mlx_max_m": self.mlx_max_m,
                "threads": self.threads, "shared_bytes": self.shared_bytes}


@dataclass(frozen=True)
class DequantConfig:
    """The dequant kernel: the packed weight to a dense ``(N, K)`` matrix in ``T``.

    A block takes one weight row; each thread turns 32-bit words of it
    (``32 / bits`` values of one quantization group) into ``T`` with the
    layers' ``QmmDq`` and writes them back in order, so that a warp reads and
    writes contiguous memory. As a variant (``tiled:dequant``)
    it is followed by MLX's dense matmul, ``x @ W.T``, at every M; a wide
    configuration with ``:gM`` uses it from M on.
    """

    @property
    def threads(self) -> int:
        return DEQUANT_THREADS

    @property
    def name(self) -> str:
        return f"{FAMILY}:dequant"

    def params(self) -> dict[str, Any]:
        return {"kernel": "dequant", "threads": self.threads}


KernelConfig = TileConfig | DecodeConfig | SkinnyConfig | WideConfig | DequantConfig


def output_planes(config: KernelConfig) -> int:
    """Planes of ``out``: a tile or wide kernel split over K writes one float32 plane
    per part (``(splits, M, N)``), which the variant adds; every other kernel, 1."""
    if isinstance(config, (TileConfig, WideConfig)):
        return config.splits
    return 1

_TILE_RE = re.compile(
    r"^(?P<bm>\d+)x(?P<bn>\d+)(?:x(?P<bk>\d+))?:wm(?P<wm>\d+)wn(?P<wn>\d+)"
    r"(?::k(?P<k>\d+))?(?::d(?P<d>\d+))?$"
)
_SKINNY_RE = re.compile(
    r"^skinny(?::w(?P<w>\d+)(?:r(?P<r>\d+))?(?P<h>h)?(?P<p>p)?)?(?::c(?P<c>\d+))?$"
)
_WIDE_RE = re.compile(
    r"^wide:w(?P<w>\d+)r(?P<r>\d+)m(?P<m>\d+)(?::k(?P<k>\d+))?(?::c(?P<c>\d+))?(?::d(?P<d>\d+))?"
    r"(?::g(?P<g>\d+))?(?::q(?P<q>\d+))?$"
)
_DECODE_RE = re.compile(r"^decode(?::r(?P<r>\d+)w(?P<w>\d+)(?:u(?P<u>\d+))?(?:k(?P<k>\d+))?)?$")

GRAMMAR = (
    f"{FAMILY}:BMxBN[xBK]:wmWMwnWN[:kSPLITS][:dMAXM] (e.g. {FAMILY}:160x32:wm4wn1) "
    f"or {FAMILY}:decode[:rROWSwWARPS[uVECTORS][kSPLITS]] "
    f"or {FAMILY}:skinny[:wWARPS[rROWS][h][p]][:cCLUSTER] "
    f"or {FAMILY}:wide:wWARPSrROWSmTOKENS[:kSPLITS][:cCLUSTER][:dMAXM][:gMINM][:qMAXM] "
    f"or {FAMILY}:dequant"
)


def parse_name(name: str) -> KernelConfig:
    """Parse a family name into its validated configuration.

    ``tiled:160x32x32:wm4wn1`` and ``tiled:160x32:wm4wn1`` are the same
    kernel; :attr:`TileConfig.name` gives the canonical spelling.
    """
    prefix, _, rest = name.partition(":")
    if prefix != FAMILY or not rest:
        raise TileError(f"{name!r} is not a {FAMILY} variant name: expected {GRAMMAR}")
    m = _TILE_RE.match(rest)
    if m:
        return TileConfig(
            bm=int(m["bm"]), bn=int(m["bn"]), bk=int(m["bk"] or DEFAULT_BK),
            wm=int(m["wm"]), wn=int(m["wn"]),
            decode_max_m=int(m["d"]) if m["d"] is not None else DEFAULT_DECODE_MAX_M,
            splits=int(m["k"] or 1),
        )
    m = _SKINNY_RE.match(rest)
    if m:
        clusters = int(m["c"] or 1)
        if m["w"] is None:
            return SkinnyConfig(clusters=clusters)
        return SkinnyConfig(warps=int(m["w"]), rows=int(m["r"] or 1), half=m["h"] is not None,
                            prefetch=m["p"] is not None, clusters=clusters)
    m = _WIDE_RE.match(rest)
    if m:
        return WideConfig(
            warps=int(m["w"]), rows=int(m["r"]), tokens=int(m["m"]), splits=int(m["k"] or 1),
            clusters=int(m["c"] or 1),
            decode_max_m=int(m["d"]) if m["d"] is not None else DEFAULT_DECODE_MAX_M,
            gemm_min_m=int(m["g"] or 0), mlx_max_m=int(m["q"] or 0),
        )
    if rest == "dequant":
        return DequantConfig()
    m = _DECODE_RE.match(rest)
    if m:
        if m["r"] is None:
            return DecodeConfig()
        return DecodeConfig(rows=int(m["r"]), warps=int(m["w"]), vectors=int(m["u"] or 1),
                            splits=int(m["k"] or 1))
    raise TileError(f"{name!r}: cannot parse the parameters; expected {GRAMMAR}")


#: The seed's ablation rows, in its order. 32x32 2x2 is MLX's own Metal
#: default, 160x32 4x1 the seed's retile; 192x32 and 256x32 keep the 4x1
#: split of the retile (their SIMD-group tiles are 48x32 and 64x32), so the
#: rows differ only in BM. Then the small-M kernels alone, the wide
#: kernel's configuration that was fastest from 512 tokens on on the H100
#: (docs/PERFORMANCE.md, section 6k), the same with the dequant kernel and
#: MLX's dense matmul from 512 tokens on (section 6m), and that with a single
#: token left to ``mx.quantized_matmul`` (section 6n: where generation is
#: bound by the host, MLX's launch of its own kernel costs it less).
PRESETS: tuple[str, ...] = (
    f"{FAMILY}:32x32:wm2wn2",
    f"{FAMILY}:64x64:wm2wn2",
    f"{FAMILY}:160x32:wm4wn1",
    f"{FAMILY}:160x32:wm2wn2",
    f"{FAMILY}:192x32:wm4wn1",
    f"{FAMILY}:256x32:wm4wn1",
    f"{FAMILY}:decode",
    f"{FAMILY}:skinny",
    f"{FAMILY}:wide:w8r2m64",
    f"{FAMILY}:wide:w8r2m64:g512",
    f"{FAMILY}:wide:w8r2m64:g512:q1",
)


def spec_reason(config: KernelConfig, *, M: int, N: int, K: int, bits: int, group_size: int,
                mode: str, transpose: bool, dtype: str) -> str | None:
    """Why ``config`` cannot run this problem, or ``None`` when it can.

    Shared by the variant's ``supports(spec)`` and by the launch path, so a
    problem that is refused up front is refused with the same words later.
    """
    if mode != "affine":
        return f"mode={mode!r}: the {FAMILY} kernels implement affine quantization only"
    if not transpose:
        return f"transpose=False: the {FAMILY} kernels compute x @ w.T only"
    if bits not in BITS:
        return f"bits={bits}: the {FAMILY} kernels support bits in {BITS}"
    if group_size not in GROUP_SIZES:
        return f"group_size={group_size}: the {FAMILY} kernels support group_size in {GROUP_SIZES}"
    if dtype not in DTYPES:
        return f"dtype={dtype!r}: the {FAMILY} kernels take activations in {DTYPES}"
    if K % group_size:
        return f"K={K}: must be a multiple of group_size={group_size}"
    if isinstance(config, TileConfig) and M > config.decode_max_m and K % config.bk:
        return f"K={K}: must be a multiple of BK={config.bk} for {config.name}"
    if N * K * bits // 32 < 8:
        # MLX passes inputs of fewer than 8 elements in Metal's constant
        # address space, which the kernels' device-pointer loads cannot read.
        return f"N={N}, K={K}: the packed weight must hold at least 8 words"
    return None
