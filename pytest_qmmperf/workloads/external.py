"""Other engines' results: read a result file, or run a command that writes one.

A team whose engine is not MLX gates its own numbers through
``qmm_bench.external(...)``: this module turns the engine's output into the
plugin's metrics (``ttft_s``, ``prompt_tps``, ``gen_tps``, ``peak_memory_gb``,
or any other metric of :data:`pytest_qmmperf.metrics.METRICS`).  Each result
record of the file is one round: one sample per metric.

Formats
-------

``uzu``
    The JSON written by uzu's ``cli bench``: a list of results, each with
    ``time_to_first_token`` (s) -> ``ttft_s``, ``prompt_tokens_per_second``
    -> ``prompt_tps``, ``generate_tokens_per_second`` (optional; 0 or null
    means not measured) -> ``gen_tps``, ``memory_used`` (optional; bytes,
    uzu's device allocator peak) -> ``peak_memory_gb`` (divided by 1e9, the
    unit MLX-side figures use), ``tokens_count_input`` / ``tokens_count_output``,
    ``task`` (``identifier``, ``repo_id``, ``tokens_limit``), ``device``
    (``os_name``, ``cpu_name``, ``memory_total`` in bytes), ``engine_version``,
    ``data_type``.  Every result must share input token count, model and
    engine version: one file is one benchmark.

``json``
    Any JSON, mapped by ``mapping`` (documented in :func:`load_external`).
    Without a mapping the document is either a list of records whose keys are
    metric names, or ``{"records": [...], "params": {...}, "info": {...}}``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_qmmperf.metrics import METRICS

FORMATS = ("uzu", "json")


class ExternalError(ValueError):
    """A result file or command that cannot be read as results; the message names it."""


@dataclass(frozen=True)
class ExternalResults:
    """Per-metric samples (one per result record), the workload's params, and context."""

    samples: dict[str, list[float]]
    params: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


# --- entry point -------------------------------------------------------------


def load_external(
    source: str | os.PathLike[str] | None = None,
    *,
    command: list[str] | str | None = None,
    format: str = "uzu",  # noqa: A002 - the file format's name, as users call it
    mapping: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
) -> ExternalResults:
    """Read an engine's results from ``source``, or from what ``command`` produces.

    * ``source`` only: read that file.
    * ``command`` and ``source``: run the command, which must (re)write
      ``source``; a file it left untouched is refused rather than gated stale.
    * ``command`` only: the command's standard output is the JSON document
      (the whole output, or failing that its last non-empty line).

    A command given as a list runs without a shell; a string runs through the
    shell (so redirections work).  ``cwd`` is where the command runs and what a
    relative ``source`` is relative to.  A command that cannot start, exits
    non-zero or outlives ``timeout`` seconds raises :class:`ExternalError`.

    ``mapping`` (``format="json"``) maps targets to expressions::

        {"records": "runs",                 # where the records are (default: the document
                                            #   if it is a list, else its "records")
         "ttft_s": "timings.ttft_ms / 1000", # a metric: dotted path in each record,
         "prompt_tps": "prefill_tps",        #   optionally "* k" or "/ k"
         "params.model": "model",           # a parameter: from each record (must agree)
         "info.version": "$.engine.version"} # "$." reads from the document's root

    Paths are dotted keys; integers index lists (``"runs.0.ttft"``).
    """
    if format not in FORMATS:
        raise ExternalError(f"format={format!r}: accepted formats are {', '.join(FORMATS)}")
    if mapping is not None and format != "json":
        raise ExternalError(f"mapping is for format='json', not format={format!r}")
    if source is None and command is None:
        raise ExternalError("give a result file (source), a command, or both")
    base = Path(cwd) if cwd is not None else Path.cwd()
    path = None
    if source is not None:
        path = Path(source).expanduser()
        if not path.is_absolute():
            path = base / path

    if command is not None:
        before = _stamp(path) if path is not None else None
        stdout = _run(command, base, timeout)
        if path is not None:
            after = _stamp(path)
            if after is None:
                raise ExternalError(f"command {_show(command)} did not write {source}")
            if after == before:
                raise ExternalError(
                    f"command {_show(command)} left {source} unchanged: refusing stale results"
                )
            where, document = str(source), _read_json(path, str(source))
        else:
            where, document = f"output of {_show(command)}", _parse_stdout(stdout, command)
    else:
        assert path is not None
        if not path.is_file():
            raise ExternalError(f"result file {source} does not exist")
        where, document = str(source), _read_json(path, str(source))

    if format == "uzu":
        results = parse_uzu(document, where)
    else:
        results = parse_json(document, mapping, where)
    info = dict(results.info)
    info["source"] = where
    info["format"] = format
    return ExternalResults(results.samples, results.params, info)


# --- running and reading ------------------------------------------------------


def _show(command: list[str] | str) -> str:
    text = command if isinstance(command, str) else shlex.join(command)
    return f"`{text if len(text) <= 120 else text[:117] + '...'}`"


def _stamp(path: Path | None) -> tuple[int, int] | None:
    if path is None or not path.exists():
        return None
    st = path.stat()
    return (st.st_mtime_ns, st.st_size)


def _run(command: list[str] | str, cwd: Path, timeout: float | None) -> str:
    if isinstance(command, str):
        if not command.strip():
            raise ExternalError("command is empty")
        args: list[str] | str = command
        shell = True
    else:
        if not command or not all(isinstance(a, (str, os.PathLike)) for a in command):
            raise ExternalError(f"command={command!r}: give a non-empty list of strings")
        args = [os.fspath(a) for a in command]
        shell = False
    try:
        proc = subprocess.run(
            args, cwd=cwd, shell=shell, capture_output=True, text=True, timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise ExternalError(f"command {_show(command)} could not start: {exc.strerror}") from None
    except subprocess.TimeoutExpired:
        raise ExternalError(f"command {_show(command)} ran past its {timeout} s timeout") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        last = f": {tail[-1][:200]}" if tail else ""
        raise ExternalError(
            f"command {_show(command)} failed with exit status {proc.returncode}{last}"
        )
    return proc.stdout


def _read_json(path: Path, where: str) -> Any:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ExternalError(f"result file {where} cannot be read: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExternalError(f"result file {where} is not valid JSON: {exc}") from None


def _parse_stdout(stdout: str, command: list[str] | str) -> Any:
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        pass
    lines = [line for line in stdout.splitlines() if line.strip()]
    if lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    shown = stdout.strip()[:80] or "nothing"
    raise ExternalError(f"command {_show(command)} printed no JSON results (got {shown!r})")


# --- uzu ----------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def parse_uzu(document: Any, where: str = "uzu results") -> ExternalResults:
    """Map uzu ``cli bench`` JSON (a list of results, or one result) to metrics."""
    records = [document] if isinstance(document, dict) else document
    if not isinstance(records, list) or not records:
        raise ExternalError(f"{where}: expected a non-empty JSON list of uzu bench results")
    samples: dict[str, list[float]] = {}
    first: dict[str, Any] | None = None
    outputs: list[int] = []
    for i, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise ExternalError(f"{where}: result {i} is {type(rec).__name__}, not an object")

        def need(key: str, rec: dict[str, Any] = rec, i: int = i) -> float:
            if key not in rec:
                raise ExternalError(f"{where}: result {i} has no {key}")
            value = _number(rec[key])
            if value is None or value <= 0:
                raise ExternalError(
                    f"{where}: result {i}: {key}={rec[key]!r} is not a positive number"
                )
            return value

        ttft = need("time_to_first_token")
        prompt_tps = need("prompt_tokens_per_second")
        tokens_in = need("tokens_count_input")
        if "tokens_count_output" not in rec or _number(rec["tokens_count_output"]) is None:
            raise ExternalError(f"{where}: result {i} has no numeric tokens_count_output")
        outputs.append(int(rec["tokens_count_output"]))
        samples.setdefault("ttft_s", []).append(ttft)
        samples.setdefault("prompt_tps", []).append(prompt_tps)
        gen = rec.get("generate_tokens_per_second")
        if gen is not None:
            value = _number(gen)
            if value is None or value < 0:
                raise ExternalError(
                    f"{where}: result {i}: generate_tokens_per_second={gen!r} is not a number"
                )
            if value > 0:  # uzu writes 0.0 when it measured no generation
                samples.setdefault("gen_tps", []).append(value)
        mem = rec.get("memory_used")
        if mem is not None:
            value = _number(mem)
            if value is None or value <= 0:
                raise ExternalError(f"{where}: result {i}: memory_used={mem!r} is not a byte count")
            samples.setdefault("peak_memory_gb", []).append(value / 1e9)

        ident = _uzu_identity(rec, tokens_in)
        if first is None:
            first = ident
        else:
            for key, value in ident.items():
                if first.get(key) != value:
                    raise ExternalError(
                        f"{where}: results 1 and {i} differ in {key} ({first.get(key)!r} vs "
                        f"{value!r}); one file must hold one benchmark"
                    )
    assert first is not None
    rec0 = records[0]
    task = rec0.get("task") if isinstance(rec0.get("task"), dict) else {}
    params: dict[str, Any] = {
        "engine": "uzu",
        "model": first["model"],
        "tokens_in": first["tokens_in"],
        "tokens_out": task.get("tokens_limit") or max(outputs),
        "data_type": first["data_type"],
    }
    device = rec0.get("device") if isinstance(rec0.get("device"), dict) else {}
    info: dict[str, Any] = {
        "engine_version": first["engine_version"],
        "device": {
            "os_name": device.get("os_name"),
            "cpu_name": device.get("cpu_name"),
            "memory_total_gb": (
                round(device["memory_total"] / 1e9, 3)
                if _number(device.get("memory_total")) else None
            ),
        },
        "results": len(records),
        "tokens_out_observed": sorted(set(outputs)),
        "units": "time_to_first_token s; memory_used bytes -> peak_memory_gb = bytes/1e9",
    }
    if task.get("identifier"):
        info["task"] = task["identifier"]
    return ExternalResults(samples, params, info)


def _uzu_identity(rec: dict[str, Any], tokens_in: float) -> dict[str, Any]:
    task = rec.get("task")
    if not isinstance(task, dict):
        task = {}
    return {
        "model": task.get("repo_id") or task.get("identifier"),
        "tokens_in": int(tokens_in),
        "engine_version": rec.get("engine_version"),
        "data_type": rec.get("data_type"),
    }


# --- generic JSON ----------------------------------------------------------------

_EXPR = re.compile(r"^\s*(\$\.)?([^\s*/]+)\s*(?:([*/])\s*([0-9.eE+-]+))?\s*$")


@dataclass(frozen=True)
class _Expr:
    root: bool
    path: tuple[str, ...]
    op: str | None
    factor: float

    @classmethod
    def parse(cls, target: str, text: Any) -> _Expr:
        m = _EXPR.match(text) if isinstance(text, str) else None
        factor = 1.0
        if m and m.group(3):
            try:
                factor = float(m.group(4))
            except ValueError:
                m = None
        if m is None or (m.group(3) == "/" and factor == 0):
            raise ExternalError(
                f"mapping[{target!r}]={text!r}: expected a dotted path, optionally '* k' or "
                "'/ k' (e.g. 'timings.ttft_ms / 1000'); '$.' reads from the document root"
            )
        return cls(bool(m.group(1)), tuple(m.group(2).split(".")), m.group(3), factor)

    def lookup(self, doc: Any, rec: Any) -> Any:
        node = doc if self.root else rec
        for key in self.path:
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.lstrip("-").isdigit() and -len(node) <= int(
                key
            ) < len(node):
                node = node[int(key)]
            else:
                raise KeyError(".".join(self.path))
        return node

    def number(self, value: Any) -> float | None:
        x = _number(value)
        if x is None:
            return None
        if self.op == "*":
            return x * self.factor
        if self.op == "/":
            return x / self.factor
        return x


def parse_json(
    document: Any, mapping: Mapping[str, str] | None = None, where: str = "results"
) -> ExternalResults:
    """Map a generic JSON document to metrics (see :func:`load_external` for ``mapping``)."""
    mapping = dict(mapping or {})
    for target in mapping:
        kind, dot, name = target.partition(".")
        named = kind in ("params", "info") and dot and name
        if target != "records" and target not in METRICS and not named:
            raise ExternalError(
                f"mapping key {target!r}: expected 'records', a metric "
                f"({', '.join(METRICS)}), 'params.NAME' or 'info.NAME'"
            )

    params: dict[str, Any] = {}
    info: dict[str, Any] = {}
    if "records" in mapping:
        expr = _Expr.parse("records", mapping["records"])
        try:
            records = expr.lookup(document, document)
        except KeyError:
            raise ExternalError(f"{where}: no {mapping['records']!r} in the document") from None
    elif isinstance(document, list):
        records = document
    elif isinstance(document, dict) and "records" in document:
        records = document["records"]
        params.update(_plain(document.get("params"), f"{where}: params"))
        info.update(_plain(document.get("info"), f"{where}: info"))
    else:
        raise ExternalError(
            f"{where}: expected a list of records or an object with 'records' "
            "(or say where they are with mapping['records'])"
        )
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list) or not records:
        raise ExternalError(f"{where}: the records are not a non-empty list")

    metric_exprs = {
        t: _Expr.parse(t, e) for t, e in mapping.items() if t in METRICS
    } or {name: _Expr(False, (name,), None, 1.0) for name in METRICS}
    explicit = any(t in METRICS for t in mapping)
    samples: dict[str, list[float]] = {}
    for i, rec in enumerate(records, 1):
        for name, expr in metric_exprs.items():
            try:
                raw = expr.lookup(document, rec)
            except KeyError:
                if explicit:
                    raise ExternalError(
                        f"{where}: record {i} has no {'.'.join(expr.path)} (for {name})"
                    ) from None
                continue
            value = expr.number(raw)
            if value is None or value < 0:
                raise ExternalError(
                    f"{where}: record {i}: {name} = {raw!r} is not a non-negative number"
                )
            samples.setdefault(name, []).append(value)
    if not samples:
        raise ExternalError(
            f"{where}: no metric found in the records; name them as metrics "
            f"({', '.join(METRICS)}) or map them with mapping={{'ttft_s': 'path', ...}}"
        )

    for target, text in mapping.items():
        kind, _, name = target.partition(".")
        if kind not in ("params", "info"):
            continue
        expr = _Expr.parse(target, text)
        values = []
        for i, rec in enumerate(records[:1] if expr.root else records, 1):
            try:
                values.append(expr.lookup(document, rec))
            except KeyError:
                raise ExternalError(f"{where}: record {i} has no {text!r} (for {target})") from None
        if kind == "params" and any(v != values[0] for v in values):
            raise ExternalError(
                f"{where}: records disagree on {target} ({values[0]!r} vs "
                f"{next(v for v in values if v != values[0])!r}); one file must hold one benchmark"
            )
        (params if kind == "params" else info)[name] = values[0]
    info["results"] = len(records)
    return ExternalResults(samples, params, info)


def _plain(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ExternalError(f"{where} must be an object")
    return dict(value)
