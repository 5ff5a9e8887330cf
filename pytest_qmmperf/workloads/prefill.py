"""Model prefill and decode: time to first token, prompt and generation throughput, memory.

A :class:`PrefillSpec` names a model (a preset from :mod:`.shapes` or a local
MLX model directory), the prompt and generation lengths and the quantization;
a :class:`PrefillRunner` builds that model with mlx-lm, swaps the matmul of
every quantized layer for a registry variant, and measures rounds.

Conventions (those of mlx-lm's ``generate_step`` / ``stream_generate``, which
does the generating here, except where marked):

* The prompt is ``prompt_tokens`` seeded random token ids.  It is processed
  in chunks of ``prefill_step`` tokens (the last token goes with the first
  sampling step, as in mlx-lm), greedy sampling, no stop token.
* ``ttft_s``: from handing the prompt to the model until the first generated
  token is on the host (``y.item()``), so the device work is synchronised.
  This is mlx-lm's ``prompt_time``.
* ``prompt_tps = prompt_tokens / ttft_s`` (mlx-lm's ``prompt_tps``).
* ``gen_tps = (gen_tokens - 1) / t`` where ``t`` runs from the first generated
  token to the last: ``gen_tokens - 1`` decode steps.  *Differs from mlx-lm*,
  which divides ``gen_tokens`` by the same time and so overstates the rate by
  ``gen_tokens / (gen_tokens - 1)`` (3% at 32 tokens).  With ``gen_tokens=1``
  nothing is decoded and ``gen_tps`` is not reported.  Each round times
  ``decode_passes`` decode passes from the same prefilled cache (trimmed back
  to the prompt between passes, so every pass decodes the same positions) and
  reports their median: one pass of 31 steps lasts a few tens of ms on a
  fast GPU, short enough for one clock or scheduling hiccup to move it by 10%+.
* ``peak_memory_gb``: ``mx.get_peak_memory()`` after ``mx.reset_peak_memory()``
  at the start of the round, in units of 1e9 bytes (mlx-lm's convention).  It
  includes the weights, the KV cache and the activations.
* Every round starts from a fresh KV cache and an emptied MLX buffer cache,
  with Python's garbage collector paused while timing.
* ``gen_host_fraction`` (in the info, not a metric): the host's share of a
  decode step, measured once after the warm-up; over
  :data:`GEN_HOST_BOUND_FRACTION` generation is host-bound and the gate
  reports ``gen_tps`` without enforcing it (``--qmm-gate-host-bound``).
* ``ttft_host_fraction`` (in the info, not a metric): the share of the
  prompt's processing the host spends building and queueing its chunks,
  measured once after the warm-up.  mlx-lm evaluates each chunk before it
  builds the next, so the device waits while the host builds; the larger
  the share, the more TTFT moves with the host's speed (on the H100,
  ``dequant``'s TTFT rose 34% on a host at half speed, ``mlx``'s 9.5%:
  docs/PERFORMANCE.md, section 3e).  TTFT is gated either way.
* ``cold_start_s``: the TTFT of the first run in the process, JIT compilation
  included (only kernels not compiled earlier in the process are compiled).
"""

from __future__ import annotations

import gc
import importlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pytest_qmmperf.workloads.qmm import DTYPES, MODES
from pytest_qmmperf.workloads.shapes import PRESETS, ModelPreset, preset_names

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn

    from pytest_qmmperf.variants import Variant

PREFILL_METRICS = ("ttft_s", "prompt_tps", "gen_tps", "peak_memory_gb")
INSTALL_HINT = 'pip install "pytest-qmmperf[lm]"'
#: Host share of a decode step above which generation counts as host-bound:
#: the kernel timer's rule (:data:`pytest_qmmperf.timing.HOST_BOUND_FRACTION`).
GEN_HOST_BOUND_FRACTION = 0.8


class PrefillError(ValueError):
    """A prefill workload that cannot run: bad model, lengths, quantization or variant."""


class PrefillOutOfMemory(PrefillError, RuntimeError):
    """The device ran out of memory: the workload is too big for this machine.

    Also a ``RuntimeError``, the type MLX raises for it, so handlers of either see it.
    """


class PrefillUnavailable(RuntimeError):
    """mlx-lm (the ``lm`` extra) is not installed."""


def require_mlx_lm() -> None:
    """Raise :class:`PrefillUnavailable` unless mlx-lm can be imported."""
    try:
        importlib.import_module("mlx_lm")
    except ImportError as exc:
        raise PrefillUnavailable(
            f"model prefill benchmarks need mlx-lm: {INSTALL_HINT} ({exc})"
        ) from None


# --- which model -----------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a preset, or a local directory and its config."""

    name: str
    preset: ModelPreset | None
    path: Path | None
    config: dict[str, Any]

    @property
    def context(self) -> int | None:
        value = self.config.get("max_position_embeddings")
        if value is None:
            value = self.config.get("text_config", {}).get("max_position_embeddings")
        return int(value) if value else None

    @property
    def vocab_size(self) -> int:
        value = self.config.get("vocab_size") or self.config.get("text_config", {}).get(
            "vocab_size"
        )
        if not value:
            raise PrefillError(f"model {self.name!r}: config.json has no vocab_size")
        return int(value)

    @property
    def quantization(self) -> dict[str, Any] | None:
        q = self.config.get("quantization")
        return q if isinstance(q, dict) else None


def _looks_like_path(model: str) -> bool:
    return (
        os.sep in model
        or (os.altsep is not None and os.altsep in model)
        or model.startswith((".", "~"))
    )


def resolve_model(model: str) -> ModelSource:
    """Resolve a preset name or a local MLX model directory (reads its ``config.json``).

    Raises :class:`PrefillError` naming the input: an unknown preset lists the
    presets; a directory must hold ``config.json`` and ``model*.safetensors``.
    """
    if model in PRESETS:
        preset = PRESETS[model]
        return ModelSource(model, preset, None, dict(preset.config))
    path = Path(model).expanduser()
    if not path.exists():
        if _looks_like_path(model):
            raise PrefillError(f"model directory {model!r} does not exist")
        raise PrefillError(
            f"unknown model {model!r}: not a preset ({', '.join(preset_names())}) "
            "nor a local MLX model directory"
        )
    if not path.is_dir():
        raise PrefillError(f"model {model!r} is a file; give a preset or an MLX model directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise PrefillError(
            f"model directory {model!r} has no config.json (an MLX model directory holds "
            "config.json and model*.safetensors)"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrefillError(
            f"model directory {model!r}: config.json is not valid JSON ({exc})"
        ) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise PrefillError(f"model directory {model!r}: config.json has no model_type")
    if not any(path.glob("model*.safetensors")):
        raise PrefillError(f"model directory {model!r} has no model*.safetensors weights")
    return ModelSource(str(path), None, path, config)


# --- the workload ----------------------------------------------------------


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PrefillError(f"{name}={value!r}: must be a positive integer")


@dataclass(frozen=True)
class PrefillSpec:
    """One prefill-and-decode workload, validated on construction.

    ``model`` is a preset name or a local MLX model directory.  ``dtype``
    (activations and quantization scales) defaults to the model's own: the
    preset's released dtype, or the dtype of the directory's weights.
    """

    model: str
    prompt_tokens: int
    gen_tokens: int
    bits: int = 4
    group_size: int = 64
    mode: str = "affine"
    variant: str = "mlx"
    prefill_step: int = 2048
    seed: int = 0
    dtype: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.model, os.PathLike):
            object.__setattr__(self, "model", os.fspath(self.model))
        if not isinstance(self.model, str) or not self.model:
            raise PrefillError(f"model={self.model!r}: give a preset name or a directory")
        for name in ("prompt_tokens", "gen_tokens", "prefill_step"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise PrefillError(f"seed={self.seed!r}: must be a non-negative integer")
        if self.mode not in MODES:
            raise PrefillError(f"mode={self.mode!r}: accepted modes are {', '.join(MODES)}")
        allowed = MODES[self.mode]
        if self.bits not in allowed["bits"]:
            raise PrefillError(
                f"bits={self.bits!r}: mode {self.mode!r} accepts bits in {allowed['bits']}"
            )
        if self.group_size not in allowed["group_size"]:
            raise PrefillError(
                f"group_size={self.group_size!r}: mode {self.mode!r} accepts group_size in "
                f"{allowed['group_size']}"
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise PrefillError(f"dtype={self.dtype!r}: accepted dtypes are {', '.join(DTYPES)}")
        if not isinstance(self.variant, str) or not self.variant:
            raise PrefillError(f"variant={self.variant!r}: give a registered variant name")
        source = resolve_model(self.model)
        context = source.context
        total = self.prompt_tokens + self.gen_tokens
        if context is not None and total > context:
            raise PrefillError(
                f"prompt_tokens={self.prompt_tokens} + gen_tokens={self.gen_tokens} = {total} "
                f"exceeds the context of {self.model!r} ({context} tokens)"
            )

    def params(self) -> dict[str, Any]:
        """What identifies this workload in a baseline."""
        return asdict(self)

    def label(self) -> str:
        return (
            f"{self.model} p{self.prompt_tokens}/g{self.gen_tokens} "
            f"{self.mode}{self.bits}g{self.group_size} {self.variant}"
        )


# --- building the model ----------------------------------------------------


def _quant_predicate(group_size: int) -> Callable[[str, Any], bool]:
    """mlx-lm's rule (``quantize_model``): quantize what can be, whose rows split into groups."""

    def predicate(_path: str, module: Any) -> bool:
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0

    return predicate


def _build_preset(
    preset: ModelPreset, spec: PrefillSpec, progress: Callable[[str], None]
) -> nn.Module:
    """mlx-lm's model for the preset, with seeded random weights, quantized as ``spec`` asks."""
    import mlx.core as mx

    arch = importlib.import_module(f"mlx_lm.models.{preset.model_type}")
    args = arch.ModelArgs.from_dict(preset.config)
    mx.random.seed(spec.seed)
    # Construction only records random-init graphs (MLX is lazy); nothing is
    # computed for the weights replaced below.
    model = arch.Model(args)
    dtype = getattr(mx, spec.dtype or preset.dtype)
    if spec.mode == "affine":
        _random_affine(model, spec, dtype, progress)
    else:
        _random_by_block(model, spec, dtype, progress)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def _random_affine(model: nn.Module, spec: PrefillSpec, dtype: Any,
                   progress: Callable[[str], None]) -> None:
    """Draw affine-quantized weights directly: random codes, random per-group scales.

    Drawing packed codes costs ``bits/32`` of drawing floats and needs no
    quantization pass (a 0.5B model builds in about a second on two CPU cores
    instead of eight).  Dequantized, a layer's weights are uniform on
    ``[-a, a]`` with ``a`` matching nn.Linear's init (``1/sqrt(in)``) or
    nn.Embedding's standard deviation, with per-group scales varied by +-50% so
    that a kernel reading another group's scale gives different numbers.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    predicate = _quant_predicate(spec.group_size)
    targets = [
        (path, m)
        for path, m in _leaf_modules(model)
        if isinstance(m, (nn.Linear, nn.Embedding)) and predicate(path, m)
    ]
    keys = mx.random.split(mx.random.key(spec.seed), max(len(targets), 1))
    levels = 2**spec.bits - 1
    built: list[tuple[str, nn.Module]] = []
    for i, (path, m) in enumerate(targets):
        rows, cols = m.weight.shape
        embedding = isinstance(m, nn.Embedding)
        half_range = math.sqrt(3.0 / cols) if embedding else 1.0 / math.sqrt(cols)
        k_hi, k_lo, k_s = mx.random.split(keys[i], 3)
        words = (rows, cols * spec.bits // 32)
        hi = mx.random.randint(0, 1 << 16, words, dtype=mx.uint32, key=k_hi)
        lo = mx.random.randint(0, 1 << 16, words, dtype=mx.uint32, key=k_lo)
        packed = (hi << 16) | lo
        jitter = mx.random.uniform(0.5, 1.5, (rows, cols // spec.group_size), key=k_s)
        scales = (jitter * (2 * half_range / levels)).astype(dtype)
        biases = (-0.5 * levels) * scales
        cls = nn.QuantizedEmbedding if embedding else nn.QuantizedLinear
        q = cls.__new__(cls)
        nn.Module.__init__(q)  # skip the class's own init: it would draw and quantize again
        q.group_size, q.bits, q.mode = spec.group_size, spec.bits, spec.mode
        if embedding:
            q.num_embeddings, q.dims = rows, cols
        q.weight, q.scales, q.biases = packed, scales, biases
        if "bias" in m:
            q.bias = m.bias
        q.freeze()
        mx.eval(q.parameters())
        built.append((path, q))
        if (i + 1) % 64 == 0 and i + 1 < len(targets):
            progress(f"{spec.model}: {i + 1}/{len(targets)} quantized layers drawn")
    model.update_modules(tree_unflatten(built))


def _random_by_block(model: nn.Module, spec: PrefillSpec, dtype: Any,
                     progress: Callable[[str], None]) -> None:
    """Float random init, cast and quantized with MLX one block at a time.

    Evaluating block by block keeps at most one block's float32 weights alive:
    a 3B model never holds its 13 GB of float32.
    """
    import mlx.core as mx
    import mlx.nn as nn

    predicate = _quant_predicate(spec.group_size)
    layers = model.layers
    for i, block in enumerate(layers):
        block.set_dtype(dtype)
        nn.quantize(block, spec.group_size, spec.bits, mode=spec.mode, class_predicate=predicate)
        mx.eval(block.parameters())
        if (i + 1) % 8 == 0 and i + 1 < len(layers):
            progress(f"{spec.model}: {i + 1}/{len(layers)} blocks built")
    model.set_dtype(dtype)
    nn.quantize(model, spec.group_size, spec.bits, mode=spec.mode, class_predicate=predicate)


def _load_directory(source: ModelSource, spec: PrefillSpec) -> nn.Module:
    """Load with mlx-lm's loader (no tokenizer, no network); quantize unless already quantized."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import load_model

    assert source.path is not None
    have = source.quantization
    if have is not None:
        got = (have.get("bits"), have.get("group_size"), have.get("mode", "affine"))
        want = (spec.bits, spec.group_size, spec.mode)
        if got != want:
            raise PrefillError(
                f"model directory {spec.model!r} is quantized with bits={got[0]}, "
                f"group_size={got[1]}, mode={got[2]!r}; pass those (asked for bits={want[0]}, "
                f"group_size={want[1]}, mode={want[2]!r})"
            )
    try:
        model, _config = load_model(source.path, lazy=False)
    # RuntimeError: mx.load's error for a truncated or corrupt safetensors file.
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise PrefillError(f"model directory {spec.model!r} could not be loaded: {exc}") from None
    if spec.dtype is not None:
        model.set_dtype(getattr(mx, spec.dtype))
    if have is None:
        nn.quantize(
            model, spec.group_size, spec.bits, mode=spec.mode,
            class_predicate=_quant_predicate(spec.group_size),
        )
    mx.eval(model.parameters())
    return model


# --- swapping the matmul of quantized layers -------------------------------


def _quantized_classes() -> tuple[type, type]:
    """The two layer classes that route through a registry variant (built on first use)."""
    global _SWAP_CLASSES
    if _SWAP_CLASSES is not None:
        return _SWAP_CLASSES
    import mlx.nn as nn

    class VariantQuantizedLinear(nn.QuantizedLinear):
        """A ``QuantizedLinear`` whose matmul is ``self.variant`` (same weights, same layout)."""

        def __init__(self, source: nn.QuantizedLinear, variant: Variant):
            nn.Module.__init__(self)
            self.group_size, self.bits, self.mode = source.group_size, source.bits, source.mode
            for key, value in source.items():
                self[key] = value
            self.variant = variant
            self.freeze()

        def __call__(self, x: mx.array) -> mx.array:
            out = self.variant.fn(
                x, self["weight"], self["scales"], self.get("biases"), transpose=True,
                group_size=self.group_size, bits=self.bits, mode=self.mode,
            )
            if "bias" in self:
                out = out + self["bias"]
            return out

    class VariantQuantizedEmbedding(nn.QuantizedEmbedding):
        """Tied output head: ``as_linear`` (the vocabulary projection) runs the variant."""

        def __init__(self, source: nn.QuantizedEmbedding, variant: Variant):
            nn.Module.__init__(self)
            self.group_size, self.bits, self.mode = source.group_size, source.bits, source.mode
            self.num_embeddings, self.dims = source.num_embeddings, source.dims
            for key, value in source.items():
                self[key] = value
            self.variant = variant
            self.freeze()

        def as_linear(self, x: mx.array) -> mx.array:
            return self.variant.fn(
                x, self["weight"], self["scales"], self.get("biases"), transpose=True,
                group_size=self.group_size, bits=self.bits, mode=self.mode,
            )

    _SWAP_CLASSES = (VariantQuantizedLinear, VariantQuantizedEmbedding)
    return _SWAP_CLASSES


_SWAP_CLASSES: tuple[type, type] | None = None


def _layer_spec(module: Any, m: int, dtype: str) -> Any:
    """The QmmSpec of one quantized layer at ``m`` rows, for ``Variant.supports``."""
    from pytest_qmmperf.workloads.qmm import QmmSpec

    n, packed = module["weight"].shape
    k = packed * 32 // module.bits
    return QmmSpec(M=m, N=n, K=k, bits=module.bits, group_size=module.group_size,
                   mode=module.mode, dtype=dtype)


def swap_variant(model: nn.Module, variant: Variant, *, rows: tuple[int, ...] = (1,)) -> int:
    """Route the matmul of every quantized layer of ``model`` through ``variant``.

    Quantized linear layers run ``variant`` in ``__call__``; a quantized
    embedding runs it in ``as_linear`` (the tied output head), its lookups
    are unchanged.  Calling again with another variant re-routes the same
    layers.  Returns how many quantized layers were routed (an untied
    embedding counts, though only lookups run on it).  ``rows`` are the
    matmul heights the run will use; a layer the variant does not support at
    one of them raises :class:`PrefillError` naming layer and reason.
    """
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    linear_cls, embedding_cls = _quantized_classes()
    reason = variant.available()
    if reason:
        raise PrefillError(f"variant {variant.name!r} cannot run here: {reason}")
    replaced: list[tuple[str, nn.Module]] = []
    count = 0
    for path, module in _leaf_modules(model):
        if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        dtype = str(module["scales"].dtype).rsplit(".", 1)[-1]
        if dtype in DTYPES:
            for m in rows:
                why = variant.supports(_layer_spec(module, m, dtype))
                if why:
                    raise PrefillError(
                        f"variant {variant.name!r} does not support layer {path} at {m} rows: {why}"
                    )
        count += 1
        if isinstance(module, (linear_cls, embedding_cls)):
            module.variant = variant
        elif isinstance(module, nn.QuantizedLinear):
            replaced.append((path, linear_cls(module, variant)))
        else:
            replaced.append((path, embedding_cls(module, variant)))
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    return count


def _resolve_variant(name: str) -> Variant:
    from pytest_qmmperf.variants import VariantError, get_variant

    try:
        return get_variant(name)
    except VariantError as exc:
        raise PrefillError(str(exc)) from None


# --- measuring -------------------------------------------------------------


#: How MLX's backends word an allocation failure (CPU, Metal, CUDA).
_OOM_WORDS = ("out of memory", "unable to allocate", "failed to allocate", "malloc]",
              "attempting to allocate", "cudaerrormemoryallocation", "insufficient memory")


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(word in text for word in _OOM_WORDS)


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


class PrefillRunner:
    """Builds a :class:`PrefillSpec`'s model once and measures it round by round.

    ``decode_passes`` decode passes are timed per round and their median is
    the round's ``gen_tps`` (see the module docstring).  ``progress`` receives
    one line per phase and round.
    """

    def __init__(
        self,
        spec: PrefillSpec,
        progress: Callable[[str], None] | None = None,
        *,
        decode_passes: int = 3,
    ) -> None:
        require_mlx_lm()
        import mlx.core as mx
        from mlx_lm.utils import get_total_parameters

        _positive_int("decode_passes", decode_passes)
        self.spec = spec
        self.decode_passes = decode_passes
        self._progress = progress or (lambda _msg: None)
        self.source = resolve_model(spec.model)
        variant = _resolve_variant(spec.variant)

        t0 = time.perf_counter()
        what = "random weights" if self.source.preset else "weights from disk"
        self._progress(f"building {spec.model} ({what}, {spec.mode} {spec.bits}-bit, "
                       f"group {spec.group_size})")
        if self.source.preset is not None:
            self.model = _build_preset(self.source.preset, spec, self._progress)
        else:
            self.model = _load_directory(self.source, spec)
        self.build_s = time.perf_counter() - t0
        self._rows = (1, min(spec.prefill_step, spec.prompt_tokens))
        self.layers_swapped = swap_variant(self.model, variant, rows=self._rows)
        if self.layers_swapped == 0:
            raise PrefillError(
                f"model {spec.model!r} has no quantized layers for variant {spec.variant!r} "
                f"to run in (group_size={spec.group_size} divides none of its layers)"
            )
        self.parameters = int(get_total_parameters(self.model))
        self.weight_bytes = int(sum(
            v.nbytes for _, v in _flat_arrays(self.model.parameters())
        ))
        self.dtype = _model_dtype(self.model)
        key = mx.random.key(spec.seed + 1)  # not the weights' stream
        self.prompt = mx.random.randint(
            0, self.source.vocab_size, (spec.prompt_tokens,), key=key
        ).astype(mx.uint32)
        mx.eval(self.prompt)
        self._rounds = 0
        self._cold_start_s: float | None = None
        self._decode_step_s: list[float] = []
        #: Host share of a decode step (:meth:`_host_share_of_generation`), from the warm-up.
        self.gen_host_fraction: float | None = None
        #: Host share of the prompt's processing (:meth:`_host_share_of_prefill`), likewise.
        self.ttft_host_fraction: float | None = None

    # -- public API used by the fixture --------------------------------

    def set_variant(self, name: str) -> None:
        """Re-route the quantized layers through another variant (same weights)."""
        variant = _resolve_variant(name)
        swap_variant(self.model, variant, rows=self._rows)
        self.spec = replace(self.spec, variant=name)
        self._rounds = 0
        self._cold_start_s = None
        self._decode_step_s = []

    def check(self) -> None:
        """Check mode: a short prefill and two generated tokens; logits must be finite.

        Also compares the last prompt position's logits with the same model run
        through a float32 dequantize-then-matmul reference in every quantized
        layer (see :data:`CHECK_TOLERANCE`).  Raises ``AssertionError`` naming
        the model, variant and what was wrong.
        """
        import mlx.core as mx

        n = min(self.spec.prompt_tokens, 16)
        prompt = self.prompt[:n]
        # Chunked as in a measured run, so the cache path is checked too.
        steps = self._generate_logprobs(prompt, max_tokens=2)
        label = f"{self.spec.model} with variant {self.spec.variant!r}"
        for i, lp in enumerate(steps):
            finite = mx.all(mx.isfinite(lp)).item()
            if not finite:
                where = "the prompt's logits" if i == 0 else f"generated token {i}'s logits"
                raise AssertionError(f"{label}: {where} are not finite (NaN or inf)")
        got = steps[0].astype(mx.float32)
        variant = _resolve_variant(self.spec.variant)
        swap_variant(self.model, _reference_variant(), rows=())
        try:
            ref = self._logits(prompt)
        finally:
            swap_variant(self.model, variant, rows=())
        err = _relative_error(got, ref)
        self.check_error = err
        if not math.isfinite(err) or err > CHECK_TOLERANCE:
            raise AssertionError(
                f"{label}: logits differ from the float32 dequantize reference by a relative "
                f"error of {err:.3g} (> {CHECK_TOLERANCE}): the variant computes something else"
            )

    def warmup(self) -> float:
        """The first, cold run (JIT compilation included), then one warm run; returns its TTFT."""
        self._progress(f"{self.spec.label()}: cold run (compiles kernels)")
        cold = self._measure(label="cold run")
        self._cold_start_s = cold["ttft_s"]
        self._progress(f"{self.spec.label()}: cold run TTFT {cold['ttft_s']:.3f} s; warm-up run")
        self._measure(label="warm-up")
        return self._cold_start_s

    def run_round(self) -> dict[str, float]:
        """One measured round: fresh KV cache, prompt, ``gen_tokens`` generated."""
        self._rounds += 1
        result = self._measure(label=f"round {self._rounds}")
        parts = [f"TTFT {result['ttft_s']:.4g} s", f"prompt {result['prompt_tps']:.4g} tok/s"]
        if "gen_tps" in result:
            parts.append(f"gen {result['gen_tps']:.4g} tok/s")
        parts.append(f"peak {result['peak_memory_gb']:.3g} GB")
        self._progress(f"{self.spec.label()}: round {self._rounds}: {', '.join(parts)}")
        return result

    def info(self) -> dict[str, Any]:
        """How it was measured: conventions, model summary, sizes."""
        src = self.source
        model_info: dict[str, Any]
        if src.preset is not None:
            model_info = {"preset": src.preset.name, **src.preset.summary(),
                          "weights": f"random, seed {self.spec.seed}"}
        else:
            c = src.config
            model_info = {"directory": str(src.path), "model_type": c.get("model_type"),
                          "context": src.context, "weights": "from disk"}
        info: dict[str, Any] = {
            "model": model_info,
            "dtype": self.dtype,
            "parameters": self.parameters,
            "weight_bytes": self.weight_bytes,
            "quantized_layers": self.layers_swapped,
            "build_s": round(self.build_s, 3),
            "decode_passes": self.decode_passes,
            "conventions": (
                "mlx-lm generate_step; ttft_s = prompt handed over -> first token on host; "
                "prompt_tps = prompt_tokens/ttft_s; gen_tps = (gen_tokens-1)/(last token - "
                "first token), median of decode_passes passes per round (mlx-lm divides "
                "gen_tokens instead); peak_memory_gb = mx.get_peak_memory()/1e9 per round; "
                "fresh KV cache per round; ttft_host_fraction = time building and queueing "
                "the prompt's chunks / TTFT, once after the warm-up"
            ),
        }
        if self._cold_start_s is not None:
            info["cold_start_s"] = self._cold_start_s
        if self._decode_step_s:
            info["decode_step_ms_median"] = round(1e3 * _median(self._decode_step_s), 4)
        if self.gen_host_fraction is not None:
            info["gen_host_fraction"] = round(self.gen_host_fraction, 4)
            info["gen_host_bound"] = self.gen_host_fraction > GEN_HOST_BOUND_FRACTION
        if self.ttft_host_fraction is not None:
            info["ttft_host_fraction"] = round(self.ttft_host_fraction, 4)
        if hasattr(self, "check_error"):
            info["check_relative_error"] = self.check_error
        from pytest_qmmperf.hardware import backend_name, import_mlx
        from pytest_qmmperf.timing import cuda_graphs_enabled

        if backend_name(import_mlx()) == "cuda":
            # Benchmark sessions turn graphs off (pytest_qmmperf.timing); say which ran.
            info["cuda_graphs"] = cuda_graphs_enabled()
        return info

    # -- internals -------------------------------------------------------

    def _generate(self, prompt: mx.array, cache: list[Any], max_tokens: int,
                  callback: Callable[[int, int], None] | None = None,
                  ) -> tuple[list[float], list[int]]:
        """Run mlx-lm's generate_step; return when each token reached the host, and the tokens."""
        from mlx_lm.generate import generate_step

        stamps: list[float] = []
        tokens: list[int] = []
        gen = generate_step(
            prompt, self.model, max_tokens=max_tokens, prompt_cache=cache,
            prefill_step_size=self.spec.prefill_step, prompt_progress_callback=callback,
        )
        for token, _logprobs in gen:  # generate_step hands over token.item(): synchronised
            stamps.append(time.perf_counter())
            tokens.append(int(token))
        return stamps, tokens

    def _measure(self, label: str) -> dict[str, float]:
        import mlx.core as mx
        from mlx_lm.generate import generation_stream
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

        spec = self.spec
        callback = None
        if label == "cold run" and spec.prompt_tokens > spec.prefill_step:
            def callback(done: int, total: int) -> None:
                if 0 < done < total:
                    self._progress(f"{spec.label()}: {label}: {done}/{total} prompt tokens")

        mx.synchronize(generation_stream)
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        cache = make_prompt_cache(self.model)
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            t0 = time.perf_counter()
            stamps, tokens = self._generate(self.prompt, cache, spec.gen_tokens, callback)
            mx.synchronize(generation_stream)  # the step queued after the last token
            decode_times = []
            if spec.gen_tokens > 1:
                decode_times.append(stamps[-1] - stamps[0])
                passes = self.decode_passes - 1 if can_trim_prompt_cache(cache) else 0
                first = mx.array(tokens[:1], dtype=mx.uint32)
                for _ in range(passes):
                    # Back to the prompt: the next pass decodes the same positions.
                    trim_prompt_cache(cache, cache[0].offset - spec.prompt_tokens)
                    t, _ = self._generate(first, cache, spec.gen_tokens)
                    mx.synchronize(generation_stream)
                    # Its first token costs one step plus pipeline start; time the rest.
                    decode_times.append(t[-1] - t[0])
        except RuntimeError as exc:
            if _is_out_of_memory(exc):
                raise PrefillOutOfMemory(
                    f"out of memory running {spec.label()} ({exc}); lower prompt_tokens or "
                    "prefill_step"
                ) from None
            raise
        finally:
            if gc_was_enabled:
                gc.enable()
        if label == "warm-up" and spec.gen_tokens > 2 and can_trim_prompt_cache(cache):
            # after the timing, which the warm-up does not keep
            self.gen_host_fraction = self._host_share_of_generation(cache, tokens[0])
        if label == "warm-up":
            self.ttft_host_fraction = self._host_share_of_prefill()
        peak = mx.get_peak_memory()
        del cache
        #: The raw intervals behind the last result, for reports and tests.
        self.last_timings = {"ttft_s": stamps[0] - t0, "decode_s": list(decode_times)}
        ttft = stamps[0] - t0
        result = {
            "ttft_s": ttft,
            "prompt_tps": spec.prompt_tokens / ttft,
            "peak_memory_gb": peak / 1e9,
        }
        if decode_times:
            steps = spec.gen_tokens - 1
            decode_s = _median(decode_times)
            result["gen_tps"] = steps / decode_s
            if label.startswith("round"):
                self._decode_step_s.append(decode_s / steps)
        return result

    def _host_share_of_generation(self, cache: list[Any], first: int) -> float | None:
        """The share of a decode step the host spends building and dispatching the next one.

        Decodes ``gen_tokens - 1`` steps from the prompt's cache (trimmed back
        to the prompt, as the timed passes are) with generate_step's own
        pipelining: step n + 1 is built and queued with ``mx.async_eval``
        before the host waits for step n's token.  The median time spent
        building and queueing, over the median interval between tokens, is
        near 1 when the device waits for the host: then gen_tps measures the
        host's dispatch rate, which moves 17-50% between processes on the
        H100 (docs/PERFORMANCE.md, section 3b), not the kernels.  ``None``
        when fewer than two steps are decoded.
        """
        import mlx.core as mx
        from mlx_lm.generate import generation_stream
        from mlx_lm.models.cache import trim_prompt_cache

        steps = self.spec.gen_tokens - 1
        if steps < 2:
            return None
        trim_prompt_cache(cache, cache[0].offset - self.spec.prompt_tokens)

        def step(y: mx.array) -> mx.array:
            with mx.stream(generation_stream):
                logits = self.model(y[None], cache=cache)[:, -1, :]
                logprobs = logits - mx.logsumexp(logits, keepdims=True)
                return mx.argmax(logprobs, axis=-1)  # greedy, as the timed passes

        y = step(mx.array([first], dtype=mx.uint32))
        mx.async_eval(y)
        host: list[float] = []
        arrived: list[float] = []
        for _ in range(steps):
            t0 = time.perf_counter()
            queued = step(y)
            mx.async_eval(queued)
            host.append(time.perf_counter() - t0)
            y.item()
            arrived.append(time.perf_counter())
            y = queued
        mx.synchronize(generation_stream)
        intervals = [b - a for a, b in zip(arrived, arrived[1:], strict=False)]
        return _median(host) / max(_median(intervals), 1e-12)

    def _host_share_of_prefill(self) -> float:
        """The share of the prompt's processing the host spends building and queueing it.

        Processes the prompt as mlx-lm's generate_step does (chunks of
        ``prefill_step`` tokens, each evaluated before the next is built and
        MLX's buffer cache emptied after it; the last token with the first
        sampling step) from a fresh cache, and returns the time spent
        building each chunk's graph and queueing it with ``mx.async_eval``
        over the time from the start to the first token on the host.  The
        device idles while the host builds a chunk, so this share of TTFT
        moves with the host's speed.
        """
        import mlx.core as mx
        from mlx_lm.generate import generation_stream
        from mlx_lm.models.cache import make_prompt_cache

        mx.synchronize(generation_stream)
        mx.clear_cache()
        cache = make_prompt_cache(self.model)
        step = self.spec.prefill_step
        host = 0.0
        with mx.stream(generation_stream):
            start = time.perf_counter()
            y = self.prompt
            while y.size > 1:
                n = min(step, y.size - 1)
                t0 = time.perf_counter()
                self.model(y[:n][None], cache=cache)
                states = [c.state for c in cache]
                mx.async_eval(states)
                host += time.perf_counter() - t0
                mx.eval(states)
                y = y[n:]
                mx.clear_cache()
            t0 = time.perf_counter()
            logits = self.model(y[None], cache=cache)[:, -1, :]
            token = mx.argmax(logits - mx.logsumexp(logits, keepdims=True), axis=-1)
            mx.async_eval(token)
            host += time.perf_counter() - t0
            token.item()
            total = time.perf_counter() - start
        del cache
        return host / max(total, 1e-12)

    def _logits(self, prompt: mx.array) -> mx.array:
        """Last-position log-probabilities of one forward pass over ``prompt`` (float32)."""
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        logits = self.model(prompt[None], cache=make_prompt_cache(self.model))[0, -1]
        logits = logits.astype(mx.float32)
        out = logits - mx.logsumexp(logits, keepdims=True)
        mx.eval(out)
        return out

    def _generate_logprobs(self, prompt: mx.array, max_tokens: int) -> list[mx.array]:
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        out = []
        step = max(1, min(self.spec.prefill_step, len(prompt) // 2))
        for _token, logprobs in generate_step(
            prompt, self.model, max_tokens=max_tokens,
            prompt_cache=make_prompt_cache(self.model), prefill_step_size=step,
        ):
            out.append(logprobs)
        return out


#: Check mode's bound on the normwise relative error of the last prompt
#: position's log-probabilities against the same model run through a float32
#: dequantize-then-matmul reference.  Rounding in the model's dtype through
#: every layer measured 0.010 (qwen2.5-0.5b, bfloat16, 24 layers) and 0.006
#: (tiny, bfloat16) with MLX's own kernels on the CPU backend; a kernel that
#: reads the wrong rows, groups or scales lands near 1.
CHECK_TOLERANCE = 0.1


def _reference_variant() -> Variant:
    from pytest_qmmperf.variants import Variant

    def reference_qmm(x, w, scales, biases, *, transpose=True, group_size=64, bits=4,
                      mode="affine"):
        import mlx.core as mx

        wd = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode,
                           dtype=mx.float32)
        out = x.astype(mx.float32) @ (wd.T if transpose else wd)
        return out.astype(x.dtype)

    return Variant("reference-f32", reference_qmm, "float32 dequantize + matmul (check only)")


def _relative_error(got: mx.array, ref: mx.array) -> float:
    import mlx.core as mx

    diff = got - ref
    num = cast(float, mx.sqrt(mx.sum(diff * diff)).item())
    den = cast(float, mx.sqrt(mx.sum(ref * ref)).item())
    return num / den if den > 0 else num


def _flat_arrays(params: Any) -> list[tuple[str, Any]]:
    from mlx.utils import tree_flatten

    return cast("list[tuple[str, Any]]", tree_flatten(params))


def _leaf_modules(model: nn.Module) -> list[tuple[str, Any]]:
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    return cast("list[tuple[str, Any]]", leaves)


def _model_dtype(model: nn.Module) -> str:
    """The dtype of the first floating-point parameter (the activations' dtype)."""
    import mlx.core as mx

    for _, v in _flat_arrays(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return str(v.dtype).rsplit(".", 1)[-1]
    return "unknown"
