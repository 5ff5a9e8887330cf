"""One quantized matmul: its validated spec, seeded inputs, reference and cost model.

``QmmSpec`` rejects bad shapes and unsupported quantization settings up
front with a one-line message naming the parameter and what is accepted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import mlx.core as mx

#: What MLX accepts per quantization mode: group sizes and bit widths.
MODES: dict[str, dict[str, tuple[int, ...]]] = {
    "affine": {"group_size": (32, 64, 128), "bits": (1, 2, 3, 4, 5, 6, 8)},
    "mxfp4": {"group_size": (32,), "bits": (4,)},
    "mxfp8": {"group_size": (32,), "bits": (8,)},
    "nvfp4": {"group_size": (16,), "bits": (4,)},
}
DTYPES: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4}

#: Unit roundoff of each activation dtype.
EPSILON: dict[str, float] = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}


def tolerance(dtype: str, K: int) -> float:
    """Normwise relative error allowed against the float32 reference.

    The reference dequantizes exactly in float32, so what is left is rounding
    in the activation dtype.  Some kernels (MLX's CPU QMM among them)
    accumulate in that dtype too; rounding errors of a K-term sum then grow
    like a random walk, ``eps * sqrt(K)``.  Measured on MLX 0.32 CPU, fp16:
    0.0023 at K=256, 0.0122 at K=8192; bf16: 0.018 and 0.098.  A quarter of
    ``eps * sqrt(K)`` clears those by about 2x, while a wrongly indexed
    kernel lands near 1.
    """
    return max(8 * EPSILON[dtype], 0.25 * EPSILON[dtype] * math.sqrt(K))


class QmmSpecError(ValueError):
    """A QMM shape or quantization setting that cannot run."""


@dataclass(frozen=True)
class QmmSpec:
    """A quantized matmul ``x @ w.T`` (``transpose=True``) or ``x @ w``.

    ``x`` is ``(M, K)``; the logical weight is ``(N, K)`` when transposed,
    else ``(K, N)``, quantized along its last axis in groups of ``group_size``.
    """

    M: int
    N: int
    K: int
    bits: int = 4
    group_size: int = 64
    mode: str = "affine"
    transpose: bool = True
    dtype: str = "float16"

    def __post_init__(self) -> None:
        for name in ("M", "N", "K"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise QmmSpecError(f"{name}={value!r}: must be a positive integer")
        if self.mode not in MODES:
            raise QmmSpecError(f"mode={self.mode!r}: accepted modes are {', '.join(MODES)}")
        allowed = MODES[self.mode]
        if self.bits not in allowed["bits"]:
            raise QmmSpecError(
                f"bits={self.bits!r}: mode {self.mode!r} accepts bits in {allowed['bits']}"
            )
        if self.group_size not in allowed["group_size"]:
            raise QmmSpecError(
                f"group_size={self.group_size!r}: mode {self.mode!r} accepts group_size in "
                f"{allowed['group_size']}"
            )
        if self.dtype not in DTYPES:
            raise QmmSpecError(f"dtype={self.dtype!r}: accepted dtypes are {', '.join(DTYPES)}")
        if self.mode != "affine" and self.dtype == "float32":
            raise QmmSpecError(
                f"dtype='float32' with mode={self.mode!r}: microscaling modes take float16 or "
                "bfloat16 activations"
            )
        quantized_axis = "K" if self.transpose else "N"
        length = self.K if self.transpose else self.N
        if length % self.group_size:
            raise QmmSpecError(
                f"{quantized_axis}={length}: must be a multiple of group_size={self.group_size} "
                f"(the quantized axis of a {'transposed' if self.transpose else 'plain'} weight)"
            )

    # --- cost model ----------------------------------------------------

    @property
    def flops(self) -> int:
        """Multiply-adds counted as two FLOPs."""
        return 2 * self.M * self.N * self.K

    @property
    def weight_bytes(self) -> int:
        """Packed weights plus their per-group scales (and biases in affine mode)."""
        groups = self.N * self.K // self.group_size
        if self.mode == "affine":
            per_group = 2 * DTYPES[self.dtype]  # one scale and one bias in the activation dtype
        else:
            per_group = 1  # an 8-bit shared exponent / e4m3 scale
        return self.N * self.K * self.bits // 8 + groups * per_group

    @property
    def bytes(self) -> int:
        """Minimum traffic: activations in, weights in, outputs out."""
        act = DTYPES[self.dtype]
        return self.M * self.K * act + self.weight_bytes + self.M * self.N * act

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def label(self) -> str:
        """Short human description, e.g. ``M=512 N=8192 K=3072 affine 4-bit g64 float16``."""
        layout = "" if self.transpose else " x@w"
        return (f"M={self.M} N={self.N} K={self.K} {self.mode} {self.bits}-bit g{self.group_size} "
                f"{self.dtype}{layout}")


@dataclass
class QmmInputs:
    """One set of operands, quantized the way MLX packs them."""

    x: mx.array
    w: mx.array
    scales: mx.array
    biases: mx.array | None


def make_inputs(spec: QmmSpec, seed: int = 0) -> QmmInputs:
    """Seeded random operands: activations ~ N(0, 1), weights ~ N(0, 1/sqrt(K)).

    Weights are cast to the activation dtype before quantizing so that scales
    and biases come out in that dtype, as in a converted model.
    """
    import mlx.core as mx

    dtype = getattr(mx, spec.dtype)
    kx, kw = mx.random.split(mx.random.key(seed))
    x = mx.random.normal((spec.M, spec.K), key=kx).astype(dtype)
    wshape = (spec.N, spec.K) if spec.transpose else (spec.K, spec.N)
    w = (mx.random.normal(wshape, key=kw) * (1.0 / math.sqrt(spec.K))).astype(dtype)
    packed = mx.quantize(w, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
    biases = packed[2] if len(packed) == 3 else None
    inputs = QmmInputs(x=x, w=packed[0], scales=packed[1], biases=biases)
    mx.eval(inputs.x, inputs.w, inputs.scales, *( [inputs.biases] if biases is not None else []))
    return inputs


def reference(spec: QmmSpec, inputs: QmmInputs) -> mx.array:
    """The exact product in float32: dequantize in float32, upcast activations, matmul."""
    import mlx.core as mx

    wd = mx.dequantize(
        inputs.w, inputs.scales, inputs.biases, group_size=spec.group_size, bits=spec.bits,
        mode=spec.mode, dtype=mx.float32,
    )
    x32 = inputs.x.astype(mx.float32)
    return x32 @ (wd.T if spec.transpose else wd)


def relative_error(out: mx.array, ref: mx.array) -> float:
    """Normwise relative error ``||out - ref||_F / ||ref||_F`` computed in float32."""
    import mlx.core as mx

    diff = out.astype(mx.float32) - ref
    # A real float32 reduction: .item() yields a float, never a complex.
    num = cast(float, mx.sqrt(mx.sum(diff * diff)).item())
    den = cast(float, mx.sqrt(mx.sum(ref * ref)).item())
    return float(num / den) if den > 0 else float(num)


def check_output(spec: QmmSpec, inputs: QmmInputs, out: Any, variant: str) -> float:
    """Verify a variant's output against the float32 reference; return the error.

    Raises ``AssertionError`` with shape/dtype/error details when it is wrong.
    """
    import mlx.core as mx

    if not isinstance(out, mx.array):
        raise AssertionError(
            f"variant {variant!r} returned {type(out).__name__}, expected an mlx.core.array"
        )
    expected_shape = (spec.M, spec.N)
    if tuple(out.shape) != expected_shape:
        raise AssertionError(
            f"variant {variant!r} returned shape {tuple(out.shape)}, expected {expected_shape}"
        )
    err = relative_error(out, reference(spec, inputs))
    tol = tolerance(spec.dtype, spec.K)
    if not math.isfinite(err) or err > tol:
        raise AssertionError(
            f"variant {variant!r} is wrong for {spec.label()}: relative error {err:.3g} "
            f"exceeds {tol:.3g} (the {spec.dtype} tolerance at K={spec.K} against the float32 "
            "reference)"
        )
    return err


def input_sets(spec: QmmSpec, rotate_bytes: int, max_sets: int = 128,
               first: QmmInputs | None = None) -> list[QmmInputs]:
    """Distinct seeded input sets whose total footprint reaches ``rotate_bytes``.

    Launches cycle through them so each reads operands the previous launches
    did not leave in cache (set 0 is ``first`` when given).
    """
    count = min(max_sets, max(1, math.ceil(rotate_bytes / max(1, spec.bytes))))
    head = first if first is not None else make_inputs(spec, seed=0)
    return [head] + [make_inputs(spec, seed=i) for i in range(1, count)]


def launcher(spec: QmmSpec, kernel: Any, sets: list[QmmInputs]) -> Any:
    """A timing launch: ``launch(i)`` builds (lazily) the QMM on input set ``i mod len(sets)``."""
    kw = {"transpose": spec.transpose, "group_size": spec.group_size, "bits": spec.bits,
          "mode": spec.mode}
    count = len(sets)

    def launch(i: int) -> list[Any]:
        s = sets[i % count]
        return [kernel(s.x, s.w, s.scales, s.biases, **kw)]

    return launch
