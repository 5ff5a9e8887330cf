"""Other engines' results: uzu bench files, generic JSON through a mapping, commands."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from pytest_qmmperf.workloads.external import (
    ExternalError,
    load_external,
    parse_json,
    parse_uzu,
)

DATA = Path(__file__).parent / "data"
PY = sys.executable


def _py(code: str) -> list[str]:
    return [PY, "-c", code]


# --- uzu -----------------------------------------------------------------------------


def test_uzu_bench_file_maps_to_metrics():
    res = load_external(DATA / "uzu_bench.json")
    assert res.samples == {
        "ttft_s": [38.99, 39.21, 38.87],
        "prompt_tps": [257.7, 256.3, 258.5],
        "gen_tps": [24.1, 23.8, 24.3],
        # memory_used is bytes; GB are 1e9 bytes, as on the MLX side.
        "peak_memory_gb": [2.48, 2.481, 2.4795],
    }
    assert res.params == {
        "engine": "uzu",
        "model": "meta-llama/Llama-3.2-3B-Instruct",
        "tokens_in": 10049,
        "tokens_out": 32,
        "data_type": "bf16",
    }
    assert res.info["engine_version"] == "0.1.42"
    assert res.info["device"] == {
        "os_name": "macOS 15.5 Sequoia",
        "cpu_name": "Apple M3 Max",
        "memory_total_gb": 68.719,
    }
    assert res.info["results"] == 3 and res.info["format"] == "uzu"
    assert res.info["task"] == "llama-3.2-3b-instruct-10k"


def test_uzu_without_generation_or_memory():
    res = load_external(DATA / "uzu_bench_prefill_only.json")
    assert set(res.samples) == {"ttft_s", "prompt_tps"}
    assert res.params["tokens_out"] == 1


def test_uzu_zero_generation_rate_means_not_measured():
    rec = json.loads((DATA / "uzu_bench.json").read_text())[0]
    rec["generate_tokens_per_second"] = 0.0
    assert "gen_tps" not in parse_uzu([rec]).samples


def test_uzu_single_object_is_one_result():
    rec = json.loads((DATA / "uzu_bench.json").read_text())[1]
    assert parse_uzu(rec).samples["ttft_s"] == [39.21]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("uzu_bench_mixed_inputs.json", r"results 1 and 2 differ in tokens_in \(10049 vs 4096\)"),
        ("uzu_bench_missing_ttft.json", r"uzu_bench_missing_ttft.json: result 2 has no "
                                        r"time_to_first_token"),
    ],
)
def test_uzu_inconsistent_or_incomplete_files(name, message):
    with pytest.raises(ExternalError, match=message):
        load_external(DATA / name)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "expected a non-empty JSON list"),
        ("text", "expected a non-empty JSON list"),
        ([3], "result 1 is int, not an object"),
    ],
)
def test_uzu_wrong_shapes(document, message):
    with pytest.raises(ExternalError, match=message):
        parse_uzu(document, "f.json")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("time_to_first_token", 0.0, r"time_to_first_token=0.0 is not a positive number"),
        ("prompt_tokens_per_second", "fast", r"prompt_tokens_per_second='fast'"),
        ("memory_used", -5, r"memory_used=-5 is not a byte count"),
        ("generate_tokens_per_second", True, r"generate_tokens_per_second=True"),
    ],
)
def test_uzu_bad_values(field, value, message):
    rec = json.loads((DATA / "uzu_bench.json").read_text())[0]
    rec[field] = value
    with pytest.raises(ExternalError, match=message):
        parse_uzu([rec], "f.json")


# --- generic JSON -----------------------------------------------------------------------


def test_canonical_json_needs_no_mapping():
    res = load_external(DATA / "canonical.json", format="json")
    assert res.samples == {
        "ttft_s": [39.01, 38.95],
        "prompt_tps": [257.6, 258.0],
        "gen_tps": [24.0, 24.2],
        "peak_memory_gb": [2.48, 2.48],
    }
    assert res.params == {"engine": "rustllm", "model": "llama-3.2-3b-q4", "tokens_in": 10049}
    assert res.info["engine_version"] == "2.3.0"


def test_generic_json_through_a_mapping():
    mapping = {
        "records": "runs",
        "ttft_s": "prompt.ms / 1000",
        "prompt_tps": "prompt.tps",
        "gen_tps": "decode.tps",
        "peak_memory_gb": "peak_rss_mib * 0.001048576",  # MiB -> GB
        "params.tokens_in": "prompt.tokens",
        "params.model": "$.model",
        "info.engine_version": "$.engine.version",
    }
    res = load_external(DATA / "generic_engine.json", format="json", mapping=mapping)
    assert res.samples["ttft_s"] == pytest.approx([39.01, 38.95])
    assert res.samples["prompt_tps"] == [257.6, 258.0]
    assert res.samples["gen_tps"] == [24.0, 24.2]
    assert res.samples["peak_memory_gb"] == pytest.approx([2.47988224, 2.481455104])
    assert res.params == {"tokens_in": 10049, "model": "llama-3.2-3b-q4"}
    assert res.info["engine_version"] == "2.3.0"


def test_list_index_in_a_path():
    doc = {"runs": [{"t": [0.5, 0.7]}, {"t": [0.6, 0.8]}]}
    res = parse_json(doc, {"records": "runs", "ttft_s": "t.1"})
    assert res.samples == {"ttft_s": [0.7, 0.8]}


@pytest.mark.parametrize(
    ("document", "mapping", "message"),
    [
        ({"x": 1}, None, "expected a list of records or an object with 'records'"),
        ([{"speed": 3}], None, "no metric found in the records"),
        ([{"ttft_s": "slow"}], None, r"record 1: ttft_s = 'slow' is not a non-negative number"),
        ([{"t": 1}], {"ttft": "t"}, r"mapping key 'ttft': expected 'records', a metric"),
        ([{"t": 1}], {"ttft_s": "t + 1"}, r"mapping\['ttft_s'\]='t \+ 1': expected a dotted path"),
        ([{"t": 1}], {"ttft_s": "t / 0"}, r"mapping\['ttft_s'\]"),
        ([{"t": 1}, {"u": 2}], {"ttft_s": "t"}, r"record 2 has no t \(for ttft_s\)"),
        ({"runs": 3}, {"records": "runs", "ttft_s": "t"}, "records are not a non-empty list"),
        ({"a": []}, {"records": "runs", "ttft_s": "t"}, r"no 'runs' in the document"),
        (
            [{"t": 1, "m": "a"}, {"t": 2, "m": "b"}],
            {"ttft_s": "t", "params.model": "m"},
            r"records disagree on params.model \('a' vs 'b'\)",
        ),
    ],
)
def test_generic_json_errors(document, mapping, message):
    with pytest.raises(ExternalError, match=message):
        parse_json(document, mapping, "r.json")


def test_bad_arguments():
    with pytest.raises(ExternalError, match="format='csv': accepted formats are uzu, json"):
        load_external(DATA / "uzu_bench.json", format="csv")
    with pytest.raises(ExternalError, match="mapping is for format='json'"):
        load_external(DATA / "uzu_bench.json", mapping={"ttft_s": "t"})
    with pytest.raises(ExternalError, match="give a result file"):
        load_external()
    with pytest.raises(ExternalError, match="result file nope.json does not exist"):
        load_external("nope.json", cwd=DATA)
    with pytest.raises(ExternalError, match="is not valid JSON"):
        load_external(Path(__file__))


# --- commands -------------------------------------------------------------------------


def test_command_stdout_is_the_document():
    doc = (DATA / "uzu_bench.json").read_text()
    code = f"import sys; print('warming up', file=sys.stderr); print({doc!r})"
    res = load_external(command=_py(code))
    assert res.samples["ttft_s"] == [38.99, 39.21, 38.87]
    assert res.info["source"].startswith("output of `")


def test_command_json_on_the_last_line_after_progress():
    code = "print('loading model...'); print('[{\"ttft_s\": 0.5, \"prompt_tps\": 20000}]')"
    res = load_external(command=_py(code), format="json")
    assert res.samples == {"ttft_s": [0.5], "prompt_tps": [20000.0]}


def test_shell_command_writes_the_source_file(tmp_path):
    shutil.copy(DATA / "canonical.json", tmp_path / "in.json")
    res = load_external("out.json", command="cat in.json > out.json", format="json",
                        cwd=tmp_path)
    assert res.samples["gen_tps"] == [24.0, 24.2]
    assert res.info["source"] == "out.json"


def test_command_that_leaves_the_file_unchanged_is_refused(tmp_path):
    shutil.copy(DATA / "uzu_bench.json", tmp_path / "old.json")
    with pytest.raises(ExternalError, match="left old.json unchanged: refusing stale results"):
        load_external("old.json", command=_py("pass"), cwd=tmp_path)
    with pytest.raises(ExternalError, match="did not write new.json"):
        load_external("new.json", command=_py("pass"), cwd=tmp_path)


def test_failing_command_is_named_with_its_error():
    code = "import sys; print('model not found: foo', file=sys.stderr); sys.exit(3)"
    with pytest.raises(ExternalError) as info:
        load_external(command=_py(code))
    text = str(info.value)
    assert "failed with exit status 3: model not found: foo" in text
    assert shlex.join(_py(code))[:40] in text


def test_command_that_cannot_start():
    with pytest.raises(ExternalError, match="could not start"):
        load_external(command=["/nonexistent/engine-bench", "--json"])


def test_command_with_malformed_output():
    with pytest.raises(ExternalError, match=r"printed no JSON results \(got 'TTFT: 0.5 s'\)"):
        load_external(command=_py("print('TTFT: 0.5 s')"))
    with pytest.raises(ExternalError, match="output of `.*`: result 1 has no time_to_first_token"):
        load_external(command=_py("print('[{}]')"))


def test_command_timeout():
    with pytest.raises(ExternalError, match="ran past its 0.5 s timeout"):
        load_external(command=_py("import time; time.sleep(5)"), timeout=0.5)
