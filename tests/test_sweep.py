"""``qmmperf sweep``: formatting by hand-checked examples, and real runs with the tiny model."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from itertools import count

import pytest

from pytest_qmmperf import sweep
from pytest_qmmperf.cli import main
from pytest_qmmperf.sweep import (
    SweepError,
    SweepResult,
    SweepRow,
    change_pct,
    format_markdown,
    format_table,
    format_value,
    parse_variants,
    run_sweep,
    to_json,
)
from pytest_qmmperf.variants import Variant, get_variant, register_variant, unregister_variant

pytest.importorskip("mlx_lm")

_names = count()
TINY = ["--model", "tiny", "--prompt-tokens", "64", "--gen-tokens", "4", "--prefill-step", "32",
        "--rounds", "2", "--quiet"]


# --- pure formatting ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "value", "text"),
    [
        ("ttft_s", 47.3312, "47.33"),
        ("ttft_s", 1.23456, "1.235"),
        ("ttft_s", 0.48612, "0.4861"),
        ("prompt_tps", 212.4, "212"),
        ("prompt_tps", 20613.2, "20613"),
        ("gen_tps", 24.06, "24.1"),
        ("gen_tps", 3.14159, "3.14"),
        ("peak_memory_gb", 2.6849, "2.68"),
        ("peak_memory_gb", 0.0023543, "0.00235"),
        ("gen_tps", math.nan, "-"),
    ],
)
def test_format_value(metric, value, text):
    assert format_value(metric, value) == text


def test_change_pct():
    assert change_pct(38.99, 47.33) == pytest.approx(-17.621, abs=1e-3)
    assert change_pct(258, 212) == pytest.approx(21.698, abs=1e-3)
    assert math.isnan(change_pct(1.0, 0.0)) and math.isnan(change_pct(math.nan, 1.0))


def _seed_result() -> SweepResult:
    """The seed story's numbers, three rounds each."""
    params = {"model": "llama-3.2-3b", "prompt_tokens": 10049, "gen_tokens": 32, "bits": 4,
              "group_size": 64, "mode": "affine", "prefill_step": 2048, "seed": 0, "dtype": None}
    rows = [
        SweepRow("mlx", {"ttft_s": [47.30, 47.33, 47.40], "prompt_tps": [212.4, 212.3, 212.0],
                         "gen_tps": [24.0, 24.1, 23.9], "peak_memory_gb": [2.68, 2.68, 2.68]},
                 cold_start_s=81.9, check_relative_error=0.01),
        SweepRow("tiled:160x32:wm4wn1",
                 {"ttft_s": [38.99, 39.10, 38.90], "prompt_tps": [257.7, 257.0, 258.3],
                  "gen_tps": [24.0, 24.2, 24.1], "peak_memory_gb": [2.48, 2.48, 2.48]}),
        SweepRow("broken", error="check failed: logits are not finite"),
    ]
    return SweepResult(params, rows, {"rounds": 3, "hardware_key": "apple-m3-max-40c-64gb-metal"})


def test_text_table_by_hand():
    assert format_table(_seed_result()).splitlines() == [
        "llama-3.2-3b, 10049 prompt + 32 generated tokens, affine 4-bit group 64, "
        "prefill step 2048",
        "",
        "Variant              TTFT (s)  Prompt tok/s  Gen tok/s  Memory (GB)  "
        "Change vs first row",
        "-------------------  --------  ------------  ---------  -----------  " + "-" * 43,
        "mlx                     47.33           212       24.0         2.68  baseline",
        "tiled:160x32:wm4wn1     38.99           258       24.1         2.48  "
        "TTFT -17.6%, gen +0.4%, mem -7.5%",
        "broken                      -             -          -            -  "
        "failed: check failed: logits are not finite",
        "",
        "Medians of 3 rounds per variant on apple-m3-max-40c-64gb-metal; gen tok/s counts "
        "decode steps after the first token; memory is MLX's peak (1 GB = 1e9 bytes).",
    ]


def test_markdown_table_by_hand():
    lines = format_markdown(_seed_result()).splitlines()
    assert lines[2] == ("| Variant | TTFT (s) | Prompt tok/s | Gen tok/s | Memory (GB) | "
                        "Change vs first row |")
    assert lines[3] == "| --- | ---: | ---: | ---: | ---: | --- |"
    assert lines[4] == "| mlx | 47.33 | 212 | 24.0 | 2.68 | baseline |"
    assert lines[5] == ("| tiled:160x32:wm4wn1 | 38.99 | 258 | 24.1 | 2.48 | "
                        "TTFT -17.6%, gen +0.4%, mem -7.5% |")


def test_json_keeps_samples_and_has_no_nan():
    doc = to_json(_seed_result())
    json.dumps(doc, allow_nan=False)  # strict JSON
    assert doc["schema_version"] == 1 and doc["kind"] == "qmmperf-sweep"
    mlx, tiled, broken = doc["rows"]
    assert mlx["samples"]["ttft_s"] == [47.30, 47.33, 47.40]
    assert mlx["median"]["ttft_s"] == 47.33 and mlx["cold_start_s"] == 81.9
    assert tiled["change_vs_first_pct"]["ttft_s"] == pytest.approx(-17.621, abs=1e-3)
    assert broken["error"].startswith("check failed") and broken["median"] == {}


def test_parse_variants():
    assert parse_variants("mlx, dequant") == ["mlx", "dequant"]
    with pytest.raises(SweepError, match="listed twice"):
        parse_variants("mlx,mlx")
    with pytest.raises(SweepError, match="comma-separated list"):
        parse_variants("mlx,,dequant")
    with pytest.raises(SweepError, match=r"unknown variant 'nope'; known variants: mlx"):
        parse_variants("mlx,nope")


# --- real runs ---------------------------------------------------------------------------


def test_run_sweep_on_tiny():
    lines: list[str] = []
    result = run_sweep("tiny", prompt_tokens=64, gen_tokens=4, variants=["mlx", "dequant"],
                       rounds=3, prefill_step=32, progress=lines.append)
    assert [r.variant for r in result.rows] == ["mlx", "dequant"]
    assert not result.failed
    for row in result.rows:
        assert {k: len(v) for k, v in row.samples.items()} == {
            "ttft_s": 3, "prompt_tps": 3, "gen_tps": 3, "peak_memory_gb": 3}
        assert row.cold_start_s > 0 and row.check_relative_error <= 0.1
        for ttft, tps in zip(row.samples["ttft_s"], row.samples["prompt_tps"], strict=True):
            assert tps == pytest.approx(64 / ttft, rel=1e-12)
    table = format_table(result).splitlines()
    first, second = result.rows
    row_line = next(line for line in table if line.startswith("dequant"))
    assert format_value("ttft_s", second.median("ttft_s")) in row_line
    assert f"TTFT {change_pct(second.median('ttft_s'), first.median('ttft_s')):+.1f}%" in row_line
    assert result.params["model"] == "tiny" and "variant" not in result.params
    assert result.info["rounds"] == 3 and result.info["hardware_key"]
    assert any("dequant" in m and "round 3" in m for m in lines)


def test_a_failing_variant_is_reported_and_the_rest_measured():
    name = f"nan-{next(_names)}"
    mlx_fn = get_variant("mlx").fn
    register_variant(Variant(name, lambda *a, **k: mlx_fn(*a, **k) * math.nan, "broken"))
    try:
        result = run_sweep("tiny", prompt_tokens=16, gen_tokens=2, variants=[name, "mlx"],
                           rounds=1)
    finally:
        unregister_variant(name)
    broken, ok = result.rows
    assert "not finite" in broken.error and broken.samples == {}
    assert ok.error is None and len(ok.samples["ttft_s"]) == 1
    assert result.failed


def test_cli_writes_table_markdown_and_json(tmp_path, capsys):
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    rc = main(["sweep", *TINY, "--variants", "mlx,dequant", "--markdown", str(md),
               "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Variant" in out and "Change vs first row" in out
    assert any(line.startswith("dequant") and "TTFT " in line for line in out.splitlines())
    doc = json.loads(js.read_text())
    assert [r["variant"] for r in doc["rows"]] == ["mlx", "dequant"]
    for row in doc["rows"]:
        assert row["median"]["ttft_s"] == statistics.median(row["samples"]["ttft_s"])
    assert "| mlx |" in md.read_text() and "| dequant |" in md.read_text()


def test_cli_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "t.png"
    assert main(["sweep", *TINY, "--variants", "mlx", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_without_matplotlib_fails_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc = main(["sweep", *TINY, "--variants", "mlx", "--plot", str(tmp_path / "t.png")])
    err = capsys.readouterr().err
    assert rc == 4
    assert err.strip() == ('qmmperf sweep: --plot needs matplotlib: pip install matplotlib '
                           '(or "pytest-qmmperf[plot]")')


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "llama-9"], "unknown model 'llama-9': not a preset (llama-3.2-1b"),
        (["--variants", "mlx,nope"], "--variants: unknown variant 'nope'"),
        (["--prompt-tokens", "4090", "--gen-tokens", "7"], "exceeds the context of 'tiny'"),
        (["--json", "/nonexistent/dir/t.json"], "--json /nonexistent/dir/t.json: directory"),
    ],
)
def test_cli_bad_input(args, message, capsys):
    base = {"--model": "tiny", "--prompt-tokens": "16", "--gen-tokens": "2", "--variants": "mlx"}
    pairs = dict(base)
    pairs.update(dict(zip(args[::2], args[1::2], strict=True)))
    rc = main(["sweep", *[x for kv in pairs.items() for x in kv], "--quiet"])
    err = capsys.readouterr().err
    assert rc == 4
    assert err.startswith("qmmperf sweep: ") and message in err and err.count("\n") == 1


def test_cli_rejects_non_positive_tokens(capsys):
    with pytest.raises(SystemExit) as info:
        main(["sweep", "--model", "tiny", "--prompt-tokens", "0", "--gen-tokens", "2",
              "--variants", "mlx"])
    assert info.value.code == 2
    assert "--prompt-tokens: '0' is not a positive integer" in capsys.readouterr().err


def test_command_line_in_a_fresh_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_qmmperf.cli", "sweep", *TINY, "--variants", "mlx"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("tiny, 64 prompt + 4 generated tokens")


def test_module_exposes_the_columns_the_table_promises():
    headers = [h for h, _ in sweep.COLUMNS]
    assert headers == ["TTFT (s)", "Prompt tok/s", "Gen tok/s", "Memory (GB)"]
