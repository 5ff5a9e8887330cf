"""The prefill workload on the CPU: presets, validation, metrics, variant swap, check mode."""

from __future__ import annotations

import importlib
import json
import math
import statistics
import time
from dataclasses import replace
from itertools import count

import mlx.core as mx
import mlx.nn as nn
import pytest

from pytest_qmmperf.variants import Variant, get_variant, register_variant, unregister_variant
from pytest_qmmperf.workloads import prefill
from pytest_qmmperf.workloads.prefill import (
    GEN_HOST_BOUND_FRACTION,
    PREFILL_METRICS,
    PrefillError,
    PrefillRunner,
    PrefillSpec,
    PrefillUnavailable,
    swap_variant,
)
from pytest_qmmperf.workloads.shapes import PRESETS, get_preset, preset_names

pytest.importorskip("mlx_lm")

_names = count()


def _unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


@pytest.fixture
def counting_variant():
    """A registered variant that runs MLX's kernel and counts its calls."""
    calls = {"n": 0}
    mlx_fn = get_variant("mlx").fn

    def fn(x, w, scales, biases, **kw):
        calls["n"] += 1
        return mlx_fn(x, w, scales, biases, **kw)

    name = _unique("counting")
    register_variant(Variant(name, fn, "counts calls"))
    yield name, calls
    unregister_variant(name)


def _register(fn) -> str:
    name = _unique("test-variant")
    register_variant(Variant(name, fn, "test"))
    return name


# --- presets ----------------------------------------------------------------


def _logical_parameters(name: str) -> int:
    """Parameter count of mlx-lm's model for a preset, from shapes only (nothing evaluated)."""
    from mlx.utils import tree_flatten

    preset = get_preset(name)
    arch = importlib.import_module(f"mlx_lm.models.{preset.model_type}")
    model = arch.Model(arch.ModelArgs.from_dict(preset.config))
    return sum(v.size for _, v in tree_flatten(model.parameters()))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # The published sizes of the checkpoints the presets mirror.
        ("llama-3.2-1b", 1_235_814_400),
        ("llama-3.2-3b", 3_212_749_824),
        ("qwen2.5-0.5b", 494_032_768),
    ],
)
def test_preset_is_the_real_architecture(name, expected):
    assert _logical_parameters(name) == expected


def test_llama_3b_preset_shapes():
    c = get_preset("llama-3.2-3b").config
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]) == (3072, 28, 24)
    assert (c["num_key_value_heads"], c["intermediate_size"], c["vocab_size"]) == (8, 8192, 128256)
    assert c["rope_scaling"]["rope_type"] == "llama3" and c["tie_word_embeddings"] is True
    assert get_preset("llama-3.2-3b").summary()["head_dim"] == 128


def test_unknown_preset_lists_presets():
    with pytest.raises(KeyError, match="llama-3.2-3b.*qwen2.5-0.5b.*tiny"):
        get_preset("llama-9")
    assert set(preset_names()) == set(PRESETS)


# --- validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_tokens": 0}, r"prompt_tokens=0: must be a positive integer"),
        ({"gen_tokens": -1}, r"gen_tokens=-1: must be a positive integer"),
        ({"gen_tokens": True}, r"gen_tokens=True: must be a positive integer"),
        ({"prefill_step": 0}, r"prefill_step=0"),
        ({"bits": 7}, r"bits=7: mode 'affine' accepts bits in"),
        ({"group_size": 48}, r"group_size=48"),
        ({"mode": "int4"}, r"mode='int4': accepted modes are affine"),
        ({"dtype": "int8"}, r"dtype='int8'"),
        ({"prompt_tokens": 4000, "gen_tokens": 97}, r"4097 exceeds the context of 'tiny' \(4096"),
    ],
)
def test_spec_rejects_bad_input(kwargs, message):
    args = {"model": "tiny", "prompt_tokens": 8, "gen_tokens": 2, **kwargs}
    with pytest.raises(PrefillError, match=message):
        PrefillSpec(**args)


def test_spec_accepts_the_whole_context():
    assert PrefillSpec("tiny", prompt_tokens=4000, gen_tokens=96).params()["prompt_tokens"] == 4000


def test_unknown_model_lists_presets():
    with pytest.raises(PrefillError, match=r"unknown model 'llama-9'.*llama-3.2-1b, llama-3.2-3b"):
        PrefillSpec("llama-9", prompt_tokens=8, gen_tokens=2)


def test_bad_model_directories(tmp_path):
    with pytest.raises(PrefillError, match="does not exist"):
        PrefillSpec(str(tmp_path / "nope"), prompt_tokens=8, gen_tokens=2)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PrefillError, match="is a file"):
        PrefillSpec(str(tmp_path / "file"), prompt_tokens=8, gen_tokens=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PrefillError, match="has no config.json"):
        PrefillSpec(str(empty), prompt_tokens=8, gen_tokens=2)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(PrefillError, match="config.json is not valid JSON"):
        PrefillSpec(str(empty), prompt_tokens=8, gen_tokens=2)
    (empty / "config.json").write_text(json.dumps(get_preset("tiny").config))
    with pytest.raises(PrefillError, match=r"has no model\*.safetensors"):
        PrefillSpec(str(empty), prompt_tokens=8, gen_tokens=2)
    (empty / "model.safetensors").write_bytes(b"garbage")
    spec = PrefillSpec(str(empty), prompt_tokens=8, gen_tokens=2)
    with pytest.raises(PrefillError, match="could not be loaded"):
        PrefillRunner(spec)


def test_unknown_variant_names_known_ones():
    with pytest.raises(PrefillError, match=r"unknown variant 'nope'.*mlx.*dequant"):
        PrefillRunner(PrefillSpec("tiny", prompt_tokens=8, gen_tokens=2, variant="nope"))


def test_missing_mlx_lm_says_what_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "mlx_lm", None)
    with pytest.raises(PrefillUnavailable, match=r'pip install "pytest-qmmperf\[lm\]"'):
        PrefillRunner(PrefillSpec("tiny", prompt_tokens=8, gen_tokens=2))


# --- metrics ----------------------------------------------------------------------


def test_round_metrics_follow_their_definitions():
    spec = PrefillSpec("tiny", prompt_tokens=96, gen_tokens=6, prefill_step=32)
    messages: list[str] = []
    runner = PrefillRunner(spec, progress=messages.append, decode_passes=3)
    cold = runner.warmup()
    assert cold > 0
    for _ in range(2):
        start = time.perf_counter()
        result = runner.run_round()
        wall = time.perf_counter() - start
        assert set(result) == set(PREFILL_METRICS)
        raw = runner.last_timings
        assert result["ttft_s"] == raw["ttft_s"] > 0
        assert result["prompt_tps"] == pytest.approx(96 / result["ttft_s"], rel=1e-12)
        assert len(raw["decode_s"]) == 3  # the round's pass and two more from the same prompt
        assert result["gen_tps"] == pytest.approx(5 / statistics.median(raw["decode_s"]), rel=1e-12)
        # Every interval lies inside the call: prefill, then three passes of 5 decode steps.
        assert result["ttft_s"] + sum(raw["decode_s"]) < wall
        # The weights are live all round, so the peak is at least their size.
        assert result["peak_memory_gb"] * 1e9 >= runner.weight_bytes
    info = runner.info()
    assert info["cold_start_s"] == cold
    assert info["quantized_layers"] == 15 and info["decode_passes"] == 3
    assert "mlx-lm" in info["conventions"]
    assert any("cold run" in m for m in messages) and any("round 2" in m for m in messages)
    assert any("32/96 prompt tokens" in m for m in messages)  # chunked prefill progress


def test_host_share_of_prefill_rises_with_the_host_s_work():
    spec = PrefillSpec("tiny", prompt_tokens=96, gen_tokens=2, prefill_step=32)
    plain = PrefillRunner(spec)
    assert plain.ttft_host_fraction is None
    plain.warmup()
    share = plain.ttft_host_fraction
    # Disjoint stretches of host time inside the measured interval: a share of it.
    assert share is not None and 0.0 < share <= 1.0
    assert plain.info()["ttft_host_fraction"] == round(share, 4)
    plain.run_round()
    assert plain.ttft_host_fraction == share  # measured once, in the warm-up

    # The same kernels with 3 ms of host time in every layer call (15 layers, 4 chunks):
    # the host now takes nearly all of the prompt's time. (The converse, more device
    # work, cannot be shown on the CPU backend: there the device's threads take the
    # host's cores too.)
    mlx_fn = get_variant("mlx").fn

    def slow_host(x, w, scales, biases, **kw):
        time.sleep(0.003)
        return mlx_fn(x, w, scales, biases, **kw)

    name = _register(slow_host)
    try:
        loaded = PrefillRunner(replace(spec, variant=name))
        loaded.warmup()
    finally:
        unregister_variant(name)
    assert loaded.ttft_host_fraction is not None
    assert loaded.ttft_host_fraction > max(share, 0.9), (loaded.ttft_host_fraction, share)


def test_host_share_of_generation_is_measured_after_the_warm_up():
    spec = PrefillSpec("tiny", prompt_tokens=48, gen_tokens=6)
    runner = PrefillRunner(spec)
    assert runner.gen_host_fraction is None
    runner.warmup()
    share = runner.gen_host_fraction
    # host time over the interval between tokens: positive, and at most about the whole
    # step (the host cannot take longer than the step it paces, beyond timer noise)
    assert share is not None and 0.0 < share < 1.5
    info = runner.info()
    assert info["gen_host_fraction"] == round(share, 4)
    assert info["gen_host_bound"] == (share > GEN_HOST_BOUND_FRACTION)
    runner.run_round()
    assert runner.gen_host_fraction == share  # measured once, in the warm-up
    # two generated tokens are one decode step: no interval between steps to compare with
    short = PrefillRunner(PrefillSpec("tiny", prompt_tokens=16, gen_tokens=2))
    short.warmup()
    assert short.gen_host_fraction is None and "gen_host_bound" not in short.info()


def test_one_generated_token_has_no_generation_rate():
    runner = PrefillRunner(PrefillSpec("tiny", prompt_tokens=16, gen_tokens=1))
    runner.warmup()
    result = runner.run_round()
    assert set(result) == {"ttft_s", "prompt_tps", "peak_memory_gb"}


def test_seeded_weights_and_prompt_are_reproducible():
    a = PrefillRunner(PrefillSpec("tiny", prompt_tokens=16, gen_tokens=2, seed=3))
    b = PrefillRunner(PrefillSpec("tiny", prompt_tokens=16, gen_tokens=2, seed=3))
    c = PrefillRunner(PrefillSpec("tiny", prompt_tokens=16, gen_tokens=2, seed=4))
    assert mx.array_equal(a.prompt, b.prompt) and not mx.array_equal(a.prompt, c.prompt)
    wa = a.model.layers[0].mlp.up_proj.weight
    assert mx.array_equal(wa, b.model.layers[0].mlp.up_proj.weight)
    assert not mx.array_equal(wa, c.model.layers[0].mlp.up_proj.weight)
    # Per-group scales vary, so a kernel that reads the wrong group is visible.
    assert mx.std(a.model.layers[0].mlp.up_proj.scales).item() > 0


# --- variant swap -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "swapped"),
    [
        ("tiny", 15),  # 2 blocks x 7 projections + the tied head (the embedding's as_linear)
        ("tiny-qwen2", 16),  # the same + its own lm_head; the untied embedding only looks up
    ],
)
def test_variant_runs_in_every_quantized_layer(model, swapped, counting_variant):
    name, calls = counting_variant
    runner = PrefillRunner(PrefillSpec(model, prompt_tokens=8, gen_tokens=2, variant=name))
    assert runner.layers_swapped == swapped
    mx.eval(runner.model(runner.prompt[None]))
    assert calls["n"] == 15  # one call per matmul of a forward pass
    runner.warmup()
    runner.run_round()
    assert calls["n"] > 15
    runner.set_variant("mlx")
    before = calls["n"]
    runner.run_round()
    assert calls["n"] == before
    assert runner.spec.variant == "mlx"


def test_swap_applies_to_the_output_head_and_every_linear():
    runner = PrefillRunner(PrefillSpec("tiny", prompt_tokens=8, gen_tokens=2, variant="dequant"))
    kinds = {type(m).__name__ for _, m in runner.model.named_modules()}
    assert {"VariantQuantizedLinear", "VariantQuantizedEmbedding"} <= kinds
    assert "QuantizedLinear" not in kinds and "Linear" not in kinds


def test_variant_that_refuses_a_layer_is_named():
    name = _unique("refuses")
    register_variant(
        Variant(name, get_variant("mlx").fn, "test",
                supports=lambda s: "N too small" if s.N < 256 else None)
    )
    try:
        with pytest.raises(PrefillError, match=rf"variant '{name}' does not support layer .*N too"):
            PrefillRunner(PrefillSpec("tiny", prompt_tokens=8, gen_tokens=2, variant=name))
    finally:
        unregister_variant(name)


def test_swapped_kernel_changes_the_output():
    base = PrefillRunner(PrefillSpec("tiny", prompt_tokens=8, gen_tokens=2))
    ref = base.model(base.prompt[None])
    mlx_fn = get_variant("mlx").fn
    name = _register(lambda *a, **kw: 1.5 * mlx_fn(*a, **kw))
    try:
        base.set_variant(name)
        assert not mx.allclose(base.model(base.prompt[None]), ref).item()
    finally:
        unregister_variant(name)


def test_out_of_memory_is_a_clear_error():
    def exhausted(*_a, **_k):
        raise RuntimeError("[malloc] Unable to allocate 68719476736 bytes.")

    name = _register(exhausted)
    try:
        runner = PrefillRunner(PrefillSpec("tiny", prompt_tokens=8, gen_tokens=2, variant=name))
        with pytest.raises(prefill.PrefillOutOfMemory) as info:
            runner.warmup()
    finally:
        unregister_variant(name)
    assert isinstance(info.value, PrefillError) and isinstance(info.value, RuntimeError)
    assert str(info.value).startswith(f"out of memory running tiny p8/g2 affine4g64 {name} ")
    assert "lower prompt_tokens or prefill_step" in str(info.value)


def test_other_runtime_errors_are_not_disguised():
    def broken(*_a, **_k):
        raise RuntimeError("kernel launch failed: invalid argument")

    name = _register(broken)
    try:
        runner = PrefillRunner(PrefillSpec("tiny", prompt_tokens=8, gen_tokens=2, variant=name))
        with pytest.raises(RuntimeError, match="kernel launch failed") as info:
            runner.warmup()
    finally:
        unregister_variant(name)
    assert not isinstance(info.value, PrefillError)


# --- check mode -------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny", "tiny-qwen2"])
@pytest.mark.parametrize("variant", ["mlx", "dequant"])
def test_check_passes_for_correct_kernels(model, variant):
    runner = PrefillRunner(PrefillSpec(model, prompt_tokens=24, gen_tokens=4, variant=variant))
    runner.check()
    assert runner.info()["check_relative_error"] <= prefill.CHECK_TOLERANCE


def test_check_in_half_precision_stays_within_tolerance():
    runner = PrefillRunner(PrefillSpec("tiny", prompt_tokens=16, gen_tokens=2, dtype="bfloat16"))
    runner.check()
    assert 0 < runner.check_error < prefill.CHECK_TOLERANCE / 5


def test_check_fails_on_non_finite_logits():
    mlx_fn = get_variant("mlx").fn
    name = _register(lambda *a, **kw: mlx_fn(*a, **kw) * math.nan)
    try:
        runner = PrefillRunner(PrefillSpec("tiny", prompt_tokens=8, gen_tokens=2, variant=name))
        with pytest.raises(AssertionError, match=rf"tiny with variant '{name}'.*not finite"):
            runner.check()
    finally:
        unregister_variant(name)


def test_check_fails_on_a_wrong_kernel():
    def wrong_group_scale(x, w, scales, biases, **kw):
        # Reads every group with the first group's scale and bias: a classic indexing bug.
        s = mx.broadcast_to(scales[:, :1], scales.shape)
        b = mx.broadcast_to(biases[:, :1], biases.shape)
        return mx.quantized_matmul(x, w, s, b, **kw)

    name = _register(wrong_group_scale)
    try:
        runner = PrefillRunner(PrefillSpec("tiny", prompt_tokens=8, gen_tokens=2, variant=name))
        with pytest.raises(AssertionError, match="differ from the float32 dequantize reference"):
            runner.check()
    finally:
        unregister_variant(name)


# --- local model directories and a real architecture ----------------------------


def _save_tiny(path, *, quantize: dict | None = None):
    from mlx_lm.utils import save_config, save_model

    preset = get_preset("tiny")
    arch = importlib.import_module("mlx_lm.models.llama")
    mx.random.seed(1)
    model = arch.Model(arch.ModelArgs.from_dict(preset.config))
    config = dict(preset.config)
    if quantize:
        nn.quantize(model, quantize["group_size"], quantize["bits"])
        config["quantization"] = dict(quantize)
    mx.eval(model.parameters())
    save_model(path, model)
    save_config(config, path / "config.json")
    return path


def test_local_unquantized_directory_is_quantized_as_asked(tmp_path, counting_variant):
    name, calls = counting_variant
    path = _save_tiny(tmp_path / "tiny-f32")
    spec = PrefillSpec(str(path), prompt_tokens=16, gen_tokens=3, bits=8, variant=name)
    runner = PrefillRunner(spec)
    assert runner.model.layers[0].mlp.up_proj.bits == 8
    runner.check()
    runner.warmup()
    assert set(runner.run_round()) == set(PREFILL_METRICS)
    assert calls["n"] > 0
    assert runner.info()["model"]["directory"] == str(path)


def test_local_quantized_directory_must_match_the_asked_quantization(tmp_path):
    path = _save_tiny(tmp_path / "tiny-4bit", quantize={"group_size": 64, "bits": 4})
    runner = PrefillRunner(PrefillSpec(str(path), prompt_tokens=16, gen_tokens=2))
    runner.check()
    with pytest.raises(PrefillError, match=r"with bits=4, group_size=64.*asked for bits=8"):
        PrefillRunner(PrefillSpec(str(path), prompt_tokens=16, gen_tokens=2, bits=8))


def test_real_architecture_qwen():
    # The real Qwen2.5-0.5B shapes; float32 because MLX's CPU backend runs
    # half-precision quantized matmuls about 8x slower (the preset is bfloat16).
    spec = PrefillSpec("qwen2.5-0.5b", prompt_tokens=4, gen_tokens=2, dtype="float32")
    runner = PrefillRunner(spec, decode_passes=1)
    assert runner.parameters == 494_032_768
    assert runner.layers_swapped == 24 * 7 + 1
    runner.warmup()
    result = runner.run_round()
    assert result["prompt_tps"] == pytest.approx(4 / result["ttft_s"], rel=1e-12)
    assert result["gen_tps"] == pytest.approx(1 / runner.last_timings["decode_s"][0], rel=1e-12)
    # 4-bit weights plus scales: about 0.3 GB, far below the 2 GB of float32.
    assert 0.2 < runner.weight_bytes / 1e9 < 0.4
    assert result["peak_memory_gb"] * 1e9 >= runner.weight_bytes


def test_swap_variant_is_idempotent_on_the_same_model():
    runner = PrefillRunner(PrefillSpec("tiny", prompt_tokens=8, gen_tokens=2))
    assert swap_variant(runner.model, get_variant("dequant")) == 15
    assert swap_variant(runner.model, get_variant("mlx")) == 15


# --- benchmarks/gpu_prefill.py: the GPU figures' script, run here with the tiny model ----


def _gpu_prefill():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "gpu_prefill.py"
    spec = importlib.util.spec_from_file_location("gpu_prefill", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_spread_and_schedule():
    gp = _gpu_prefill()
    assert gp.spread_pct([126.0, 167.0, 150.0]) == pytest.approx(100 * 41 / 150)
    assert math.isnan(gp.spread_pct([1.0]))
    assert gp.schedule(["mlx", "dequant"], 3) == [
        (1, "mlx"), (1, "dequant"), (2, "dequant"), (2, "mlx"), (3, "mlx"), (3, "dequant")]


def test_gpu_script_end_to_end_on_tiny(tmp_path, capsys):
    gp = _gpu_prefill()
    out = tmp_path / "res"
    args = ["--model", "tiny", "--prompt-tokens", "48", "--gen-tokens", "4", "--prefill-step",
            "16", "--variants", "mlx", "--runs", "2", "--rounds", "2", "--out", str(out)]
    assert gp.main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    mlx = summary["per_variant"]["mlx"]
    assert mlx["runs"] == [1, 2] and len(mlx["cold_start_s"]) == 2
    medians = mlx["run_medians"]["ttft_s"]
    assert mlx["spread_pct"]["ttft_s"] == pytest.approx(gp.spread_pct(medians))
    run1 = json.loads((out / "run1-mlx.json").read_text())
    assert run1["naive"]["gen_tps"] == pytest.approx(4 / run1["timings"][0]["decode_s"][0])
    assert run1["check_relative_error"] <= prefill.CHECK_TOLERANCE
    assert "TTFT spread" in printed and printed.rstrip().endswith("summary.md")
    # A second invocation reuses what is there instead of measuring again.
    assert gp.main(args) == 0
    assert "reusing" in capsys.readouterr().out
