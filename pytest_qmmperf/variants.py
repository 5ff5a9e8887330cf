"""The kernel registry: every QMM implementation the fixture can run, by name.

A variant is a function with ``mx.quantized_matmul``'s signature::

    fn(x, w, scales, biases, *, transpose, group_size, bits, mode) -> mx.array

Built in: ``mlx`` (``mx.quantized_matmul``) and ``dequant``
(``mx.dequantize`` then a dense matmul).  Parametric families such as
``tiled:160x32:wm4wn1`` resolve through a family parser the first time they
are asked for, and are cached, so each variant (and its compiled kernel) is
built once per process.

Users add their own in three ways, all ending in :func:`register_variant`:

* call it from a ``conftest.py`` (or anything imported before the tests run);
* implement the ``pytest_qmmperf_register_variants(register)`` hook;
* expose a callable under the ``qmmperf.variants`` entry-point group that
  takes the same ``register`` function (seen by ``qmmperf variants`` too).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import mlx.core as mx

    from pytest_qmmperf.workloads.qmm import QmmSpec

QmmFn = Callable[..., "mx.array"]
ENTRY_POINT_GROUP = "qmmperf.variants"


class VariantError(ValueError):
    """An unknown, invalid or unsupported variant; the message names the accepted ones."""


def _always(_spec: QmmSpec) -> str | None:
    return None


def _everywhere() -> str | None:
    return None


@dataclass(frozen=True)
class Variant:
    """A named QMM implementation.

    ``supports(spec)`` returns ``None`` when the variant can run ``spec``, or a
    one-line reason; ``available()`` returns ``None`` when the variant can run
    on this machine's MLX backend at all, or a reason (e.g. "needs Metal").
    """

    name: str
    fn: QmmFn
    description: str = ""
    supports: Callable[[QmmSpec], str | None] = field(default=_always)
    available: Callable[[], str | None] = field(default=_everywhere)
    params: dict[str, Any] = field(default_factory=dict)

    def __call__(self, x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None,
                 **kw: Any) -> mx.array:
        return self.fn(x, w, scales, biases, **kw)


@dataclass(frozen=True)
class VariantFamily:
    """A parametric family (``prefix:...``) resolved by ``parse(name) -> Variant``."""

    prefix: str
    parse: Callable[[str], Variant]
    presets: tuple[str, ...] = ()
    description: str = ""


_lock = threading.Lock()
_variants: dict[str, Variant] = {}
_families: dict[str, VariantFamily] = {}
_entry_points_loaded = False


def register_variant(
    variant: Variant | str,
    fn: QmmFn | None = None,
    *,
    description: str = "",
    supports: Callable[[QmmSpec], str | None] | None = None,
    available: Callable[[], str | None] | None = None,
    replace: bool = False,
) -> Variant:
    """Add a variant to the registry and return it.

    Either pass a ready :class:`Variant`, or a name and a function.  A name
    that is taken raises :class:`VariantError` unless ``replace=True``: two
    kernels under one name would silently run the same code.
    """
    if isinstance(variant, str):
        if fn is None:
            raise VariantError(f"register_variant({variant!r}): a function is required")
        variant = Variant(
            name=variant,
            fn=fn,
            description=description,
            supports=supports or _always,
            available=available or _everywhere,
        )
    _check_name(variant.name)
    with _lock:
        if variant.name in _variants and not replace and _variants[variant.name] is not variant:
            raise VariantError(
                f"variant {variant.name!r} is already registered; pass replace=True to override it"
            )
        _variants[variant.name] = variant
    return variant


def register_family(family: VariantFamily, *, replace: bool = False) -> VariantFamily:
    """Add a parametric family whose names look like ``prefix:...``."""
    _check_name(family.prefix)
    with _lock:
        if family.prefix in _families and not replace:
            raise VariantError(f"variant family {family.prefix!r} is already registered")
        _families[family.prefix] = family
    return family


def unregister_variant(name: str) -> None:
    """Remove a registered variant (for tests and for conftest overrides)."""
    with _lock:
        _variants.pop(name, None)


def _check_name(name: str) -> None:
    if not name or any(c.isspace() for c in name) or "," in name or "/" in name:
        raise VariantError(
            f"variant name {name!r} is not valid: use letters, digits, '-', '_', ':', 'x', '.'"
        )


def get_variant(name: str) -> Variant:
    """Return the variant called ``name``, resolving parametric families on first use."""
    load_entry_points()
    with _lock:
        found = _variants.get(name)
    if found is not None:
        return found
    prefix = name.split(":", 1)[0]
    with _lock:
        family = _families.get(prefix)
    if family is None or ":" not in name:
        known = ", ".join(variant_names())
        raise VariantError(f"unknown variant {name!r}; known variants: {known}")
    built = family.parse(name)  # raises VariantError with the family's own wording
    with _lock:
        # Another thread may have built it meanwhile: keep the first, so one
        # name always maps to one compiled kernel.
        return _variants.setdefault(built.name, built)


def variant_names(include_presets: bool = True) -> list[str]:
    """Names of registered variants, plus each family's presets."""
    load_entry_points()
    with _lock:
        names = list(_variants)
        families = list(_families.values())
    if include_presets:
        for fam in families:
            names.extend(p for p in fam.presets if p not in names)
    return names


def families() -> list[VariantFamily]:
    """The registered parametric families."""
    with _lock:
        return list(_families.values())


def load_entry_points(eps: Iterable[Any] | None = None) -> None:
    """Call every ``qmmperf.variants`` entry point once with :func:`register_variant`."""
    global _entry_points_loaded
    if _entry_points_loaded and eps is None:
        return
    _entry_points_loaded = True
    for ep in eps if eps is not None else metadata.entry_points(group=ENTRY_POINT_GROUP):
        hook = ep.load()
        hook(register_variant)


# --- built-in variants -----------------------------------------------------


def _mlx_qmm(x, w, scales, biases, *, transpose=True, group_size=64, bits=4, mode="affine"):
    import mlx.core as mx

    return mx.quantized_matmul(
        x, w, scales, biases, transpose=transpose, group_size=group_size, bits=bits, mode=mode
    )


def _dequant_qmm(x, w, scales, biases, *, transpose=True, group_size=64, bits=4, mode="affine"):
    import mlx.core as mx

    wd = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode,
                       dtype=x.dtype)
    return x @ (wd.T if transpose else wd)


#: Rows of activations from which ``hybrid`` switches to dequantize + matmul.
HYBRID_MIN_ROWS = 512


def _hybrid_qmm(x, w, scales, biases, *, transpose=True, group_size=64, bits=4, mode="affine"):
    # Large M is compute-bound: a dense tensor-core GEMM on weights dequantized
    # once beats a fused QMM there, while small M (decode) is bandwidth-bound
    # and must read the packed weights only.  The dispatch is on the host, per
    # call, so one model prefills with the GEMM and decodes with the QMM.
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    kernel = _dequant_qmm if rows >= HYBRID_MIN_ROWS else _mlx_qmm
    return kernel(x, w, scales, biases, transpose=transpose, group_size=group_size, bits=bits,
                  mode=mode)


register_variant(
    Variant("mlx", _mlx_qmm, "mx.quantized_matmul: MLX's own quantized kernels")
)
register_variant(
    Variant("dequant", _dequant_qmm, "mx.dequantize to the activation dtype, then a dense matmul")
)
register_variant(
    Variant("hybrid", _hybrid_qmm,
            f"mlx below {HYBRID_MIN_ROWS} activation rows (decode), dequant at and above (prefill)")
)

# The tiled Metal/CUDA family. Imported last because it imports this module;
# it is pure Python until one of its kernels is first run.
from pytest_qmmperf import tiled as _tiled  # noqa: E402

_tiled.register()
