"""The baseline store: ``<baseline dir>/<hardware key>/<full commit sha>.json``.

No pytest, no MLX.  One file per hardware key per recorded commit, committed
to git next to the code it measured.

File format (``schema_version`` 1), one benchmark per line so that ``git
show`` stays readable::

    {"schema_version": 1,
     "tool": "pytest-qmmperf 0.1.0",
     "hardware_key": "apple-m3-max-40c-64gb-metal",
     "hardware": {...fingerprint...},
     "revision": {"sha": ..., "date": ..., "subject": ..., "detached": ..., "dirty": ...},
     "mlx_version": "0.32.4",
     "recorded_at": "2025-01-01T00:00:00+00:00",
     "reference": {"workload": ..., "samples": [...]},
     "benchmarks": [
      {"name": ..., "kind": ..., "params": {...}, "samples": {metric: [...]},
       "summary": {metric: {...}}, "reference_s": ...},
      ...
     ]}

Gated metrics keep their samples (compacted by :func:`stats.compact` to at
most 32 quantiles at 4 significant digits); derived metrics keep only n and
median.  A QMM benchmark takes about 0.9 KB, so a 100-benchmark suite's file
stays under 100 KB.

Writes are atomic (a temporary file in the same folder, fsync, ``os.replace``)
and serialised by an exclusive ``flock`` on the key's folder, so two
processes saving at once leave one valid file holding both their results.
Only the key's own folder is touched.  Unreadable files fail loudly with the
path and what to do: silently skipping one would let regressions through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pytest_qmmperf import revision as rev
from pytest_qmmperf import stats
from pytest_qmmperf.metrics import METRICS, BenchResult

SCHEMA_VERSION = 1
_SHA = re.compile(r"[0-9a-f]{40}")
_KEY = re.compile(r"[a-z0-9][a-z0-9._-]*")
#: Samples kept per gated metric, and their significant digits.
MAX_SAMPLES = 32
DIGITS = 4

RECORD_HINT = (
    "record one with `qmmperf baseline update` (or `pytest --qmm-bench --qmm-save-baseline`)"
)


class BaselineError(RuntimeError):
    """An unreadable, misplaced or unwritable baseline, described in one actionable line."""


# --- data ---------------------------------------------------------------------


def normalize(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparing params."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


@dataclass(frozen=True)
class Entry:
    """One benchmark of a baseline.

    ``samples`` hold the compacted samples of gated metrics, ``summary`` a
    few :class:`stats.Summary` fields of every metric; ``reference_s`` the
    median of the reference workload timed around this benchmark when it
    was recorded.
    """

    name: str
    kind: str
    params: dict[str, Any]
    samples: dict[str, list[float]]
    summary: dict[str, dict[str, float]]
    reference_s: float | None = None

    def median(self, metric: str) -> float | None:
        """The metric's median at recording (``None`` if it was not measured)."""
        s = self.summary.get(metric)
        return None if s is None else s.get("median")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the file."""
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "params": self.params,
            "samples": self.samples,
            "summary": self.summary,
        }
        if self.reference_s is not None:
            out["reference_s"] = self.reference_s
        return out


def _summary_dict(values: Sequence[float], full: bool) -> dict[str, float]:
    s = stats.summarize(values)
    out: dict[str, float] = {"n": s.n, "median": stats.round_sig(s.median, 5)}
    if full:
        out.update(iqr=stats.round_sig(s.iqr, 3), min=stats.round_sig(s.min, 4),
                   max=stats.round_sig(s.max, 4))
    return out


def compact_samples(values: Sequence[float]) -> list[float]:
    """Samples as stored: :func:`stats.compact`, and a set without spread cut to 8 copies.

    Constant sets (peak memory) are compared exactly whatever their size, and
    8 copies still let a rank interval form against a current set that does
    vary.  Quantiles stand in for the raw samples as if they were ``MAX_SAMPLES``
    independent ones: a slightly wider interval than the raw set would give,
    never a narrower one.
    """
    kept = stats.compact(values, MAX_SAMPLES, DIGITS)
    return kept[:8] if kept[0] == kept[-1] else kept


def entry_from_result(result: BenchResult, reference_s: float | None = None) -> Entry:
    """The stored form of one measured benchmark.

    Gated metrics keep compacted samples and a summary (n, median, IQR, min,
    max); other metrics, which restate a gated one (``tflops`` is
    ``flops / time_s``) or are informational, keep n and median.
    """
    samples: dict[str, list[float]] = {}
    summary: dict[str, dict[str, float]] = {}
    for name, values in result.samples.items():
        if not values:
            continue
        meta = METRICS.get(name)
        gated = meta is not None and meta.gated
        summary[name] = _summary_dict(values, full=gated)
        if gated:
            samples[name] = compact_samples(values)
    ref = stats.round_sig(reference_s, 5) if reference_s is not None else None
    return Entry(result.name, result.kind, normalize(result.params), samples, summary, ref)


@dataclass(frozen=True)
class Baseline:
    """A whole baseline file."""

    hardware_key: str
    hardware: dict[str, Any]
    revision: dict[str, Any]
    mlx_version: str
    entries: dict[str, Entry]
    reference: list[float] = field(default_factory=list)
    reference_workload: str = ""
    recorded_at: str = ""
    tool: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def sha(self) -> str:
        """The recorded commit."""
        return str(self.revision["sha"])

    def to_json(self) -> str:
        """The file's text: header fields, then one benchmark per line."""
        header = {
            "schema_version": self.schema_version,
            "tool": self.tool,
            "hardware_key": self.hardware_key,
            "hardware": self.hardware,
            "revision": self.revision,
            "mlx_version": self.mlx_version,
            "recorded_at": self.recorded_at,
            "reference": {"workload": self.reference_workload, "samples": self.reference},
        }
        lines = [json.dumps(header, sort_keys=False)[:-1] + ',\n "benchmarks": [']
        items = [json.dumps(e.to_dict(), separators=(",", ":")) for e in
                 sorted(self.entries.values(), key=lambda e: e.name)]
        lines.append(",\n".join("  " + item for item in items))
        lines.append(" ]}\n")
        return "\n".join(lines)


def new_baseline(
    results: Iterable[BenchResult],
    *,
    hardware: Mapping[str, Any],
    revision: Mapping[str, Any],
    reference: Sequence[float] = (),
    reference_workload: str = "",
    tool: str = "",
    local_reference: Mapping[str, float] | None = None,
) -> Baseline:
    """A baseline of ``results`` for ``hardware`` (a fingerprint with ``key``) at ``revision``.

    ``reference`` holds the session's reference workload samples;
    ``local_reference`` the reference median measured around each result
    (by name), else the session's median stands in.
    """
    # The median of the faster half, as the gate takes a reference burst's speed.
    ref_median = stats.fast_median(reference) if reference else None
    local = local_reference or {}
    entries = {r.name: entry_from_result(r, local.get(r.name, ref_median)) for r in results}
    return Baseline(
        hardware_key=str(hardware["key"]),
        hardware=normalize(dict(hardware)),
        revision=normalize(dict(revision)),
        mlx_version=str(hardware.get("mlx_version", "unknown")),
        entries=entries,
        reference=compact_samples(reference) if reference else [],
        reference_workload=reference_workload,
        recorded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        tool=tool,
    )


# --- reading ------------------------------------------------------------------


def _fix_hint(source: str) -> str:
    return (f"restore it (`git checkout -- {source}`) or delete it and {RECORD_HINT}")


def _samples(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    ):
        raise ValueError(f"{where}: expected a list of finite numbers")
    return [float(v) for v in value]


def _positive(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{where}: expected a positive number")
    return float(value)


def loads(text: str | bytes, source: str) -> Baseline:
    """Parse a baseline file's text; ``BaselineError`` naming ``source`` if it is unusable."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BaselineError(
            f"{source}: not valid JSON ({exc}): the file is truncated or corrupt; "
            f"{_fix_hint(source)}"
        ) from None
    if not isinstance(data, dict):
        raise BaselineError(f"{source}: not a baseline file (expected a JSON object); "
                            f"{_fix_hint(source)}")
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise BaselineError(
            f"{source}: schema version {version} is newer than this pytest-qmmperf reads "
            f"({SCHEMA_VERSION}); upgrade it (`pip install -U pytest-qmmperf`)"
        )
    if version != SCHEMA_VERSION:
        raise BaselineError(
            f"{source}: unknown schema version {version!r} (this pytest-qmmperf reads "
            f"{SCHEMA_VERSION}); {_fix_hint(source)}"
        )
    try:
        revision = data["revision"]
        if not isinstance(revision, dict) or not _SHA.fullmatch(str(revision.get("sha", ""))):
            raise ValueError("revision.sha: expected a full 40-digit commit sha")
        reference = data.get("reference") or {}
        entries: dict[str, Entry] = {}
        for i, item in enumerate(data["benchmarks"]):
            where = f"benchmarks[{i}]"
            if not isinstance(item.get("name"), str) or not isinstance(item.get("params"), dict):
                raise ValueError(f"{where}: expected a name and params")
            entries[item["name"]] = Entry(
                name=item["name"],
                kind=str(item.get("kind", "")),
                params=item["params"],
                samples={m: _samples(v, f"{where}.samples.{m}")
                         for m, v in dict(item.get("samples", {})).items()},
                summary={m: dict(v) for m, v in dict(item.get("summary", {})).items()},
                reference_s=_positive(item.get("reference_s"), f"{where}.reference_s"),
            )
        return Baseline(
            hardware_key=str(data["hardware_key"]),
            hardware=dict(data.get("hardware", {})),
            revision=revision,
            mlx_version=str(data.get("mlx_version", "unknown")),
            entries=entries,
            reference=_samples(reference.get("samples", []), "reference.samples"),
            reference_workload=str(reference.get("workload", "")),
            recorded_at=str(data.get("recorded_at", "")),
            tool=str(data.get("tool", "")),
            schema_version=version,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise BaselineError(f"{source}: malformed baseline ({what}); {_fix_hint(source)}") from None


def load(path: Path) -> Baseline:
    """Read one baseline file (see :func:`loads`)."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise BaselineError(f"{path}: cannot read ({exc.strerror})") from None
    baseline = loads(text, str(path))
    _check_placement(baseline, path.parent.name, path.stem, str(path))
    return baseline


def _check_placement(baseline: Baseline, key: str, sha: str, source: str) -> None:
    if baseline.hardware_key != key or baseline.sha != sha:
        raise BaselineError(
            f"{source}: holds hardware {baseline.hardware_key!r} at {baseline.sha[:10]}, but its "
            f"path says {key!r} at {sha[:10]}; move it to {key}/{baseline.sha}.json under the "
            "baseline folder or delete it"
        )


# --- the folder ---------------------------------------------------------------


def check_key(key: str) -> str:
    """``key`` if it is a valid hardware key (a slug), else ``BaselineError``."""
    if not _KEY.fullmatch(key):
        raise BaselineError(
            f"hardware key {key!r}: expected a slug of lower-case letters, digits, dots and "
            "dashes (see `qmmperf hardware`)"
        )
    return key


def path_for(root: Path, key: str, sha: str) -> Path:
    """Where the baseline for ``key`` at ``sha`` lives."""
    if not _SHA.fullmatch(sha):
        raise BaselineError(f"revision {sha!r}: expected a full 40-digit commit sha")
    return root / check_key(key) / f"{sha}.json"


def shas(root: Path, key: str) -> set[str]:
    """Commits with a baseline for ``key`` in the folder (one directory listing)."""
    folder = root / key
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return set()
    return {n[:-5] for n in names if n.endswith(".json") and _SHA.fullmatch(n[:-5])}


def keys(root: Path) -> list[str]:
    """Hardware keys with at least one baseline in the folder."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and shas(root, p.name))


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive lock on ``folder`` itself (no lock file is left in the folder).

    ``flock`` on a directory descriptor works on Linux and macOS; elsewhere
    writes are still atomic, only not serialised.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@dataclass(frozen=True)
class Saved:
    """What :func:`save` did: the file, and how many entries came from an earlier save."""

    path: Path
    kept: int
    replaced: bool


def save(root: Path, baseline: Baseline) -> Saved:
    """Write ``baseline`` atomically to its place under ``root``.

    A file already there for the same commit, hardware and MLX version is
    merged: its entries for benchmarks not in ``baseline`` are kept (so ``-k``
    subsets recorded one after another add up, and two processes saving at
    once both land).  A file from another MLX version is replaced.  An
    unreadable existing file stops the save (``BaselineError``) rather than
    being overwritten unseen.
    """
    path = path_for(root, baseline.hardware_key, baseline.sha)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BaselineError(f"{path.parent}: cannot create the baseline folder ({exc.strerror})"
                            ) from None
    with _locked(path.parent):
        kept, replaced = 0, False
        merged = baseline
        if path.exists():
            old = load(path)
            if old.mlx_version == baseline.mlx_version:
                extra = {n: e for n, e in old.entries.items() if n not in baseline.entries}
                kept = len(extra)
                merged = dataclasses.replace(baseline, entries={**extra, **baseline.entries})
            else:
                replaced = True
        try:
            _atomic_write(path, merged.to_json())
        except OSError as exc:
            raise BaselineError(f"{path}: cannot write ({exc.strerror}); nothing was changed"
                                ) from None
    return Saved(path, kept, replaced)


def listing(root: Path, key: str) -> list[Baseline]:
    """Every baseline of ``key`` in the folder, newest recorded commit first.

    An unreadable file raises ``BaselineError`` (see :func:`load`).
    """
    loaded = [load(root / check_key(key) / f"{sha}.json") for sha in shas(root, key)]
    return sorted(loaded, key=lambda b: (_timestamp(b.revision.get("date")), b.sha),
                  reverse=True)


# --- finding the baseline to compare with -------------------------------------


@dataclass(frozen=True)
class Found:
    """The baseline chosen for this session and where it came from."""

    baseline: Baseline
    sha: str
    distance: int
    source: str


@dataclass(frozen=True)
class Lookup:
    """The outcome of :func:`find`: a baseline, or why there is none (``message``)."""

    found: Found | None
    message: str
    start: rev.Revision


def find(repo: Any, root: Path, key: str, rev_name: str | None = None) -> Lookup:
    """The baseline for ``key`` at the nearest ancestor of HEAD (or of ``rev_name``).

    Without ``rev_name`` the folder in the work tree is read.  With it, the
    folder is read from ``rev_name``'s own git tree: a change cannot edit
    the yardstick it is measured with.  Corrupt files raise
    ``BaselineError``; no baseline in reach is not an error, and ``message``
    says why and how to record one.
    """
    check_key(key)
    start = rev.resolve(repo, rev_name) if rev_name else rev.head(repo)
    if rev_name:
        reldir = _join(rev.repo_relative(repo, root), key)
        names = rev.list_tree(repo, start.sha, reldir)
        available = {n[:-5] for n in names if n.endswith(".json") and _SHA.fullmatch(n[:-5])}
        where = f"the tree of {rev_name} ({start.short})"
    else:
        available = shas(root, key)
        where = str(root / key)
    hit = rev.nearest(repo, start.sha, available)
    if hit is not None:
        sha, distance = hit
        if rev_name:
            relpath = f"{reldir}/{sha}.json"
            source = f"{relpath} at {rev_name}"
            data = rev.read_blob(repo, start.sha, relpath)
            assert data is not None  # listed a moment ago in the same immutable tree
            baseline = loads(data, source)
            _check_placement(baseline, key, sha, source)
        else:
            path = root / key / f"{sha}.json"
            source = str(path)
            baseline = load(path)
        return Lookup(Found(baseline, sha, distance, source), "", start)

    label = rev_name or "HEAD"
    if available and rev.is_shallow(repo):
        message = (
            f"no baseline for {key} in reach: this clone is shallow and {label}'s history stops "
            f"before any of the {len(available)} recorded commits; fetch full history "
            "(`git fetch --unshallow`, or `fetch-depth: 0` in actions/checkout)"
        )
    elif available:
        message = (
            f"no baseline for {key} at {label} ({start.short}) or its ancestors "
            f"({len(available)} recorded on other branches); {RECORD_HINT}"
        )
    else:
        if rev_name:
            others = sorted(set(rev.list_tree_dirs(repo, start.sha, rev.repo_relative(repo, root)))
                            - {key})
        else:
            others = [k for k in keys(root) if k != key]
        also = f" (baselines exist for other hardware: {', '.join(others)})" if others else ""
        message = f"no baseline for this hardware ({key}) in {where}{also}; {RECORD_HINT}"
    return Lookup(None, message, start)


# --- pruning ------------------------------------------------------------------


def _join(reldir: str, name: str) -> str:
    return name if reldir in ("", ".") else f"{reldir}/{name}"


def _timestamp(date: Any) -> float:
    try:
        return datetime.fromisoformat(str(date)).timestamp()
    except ValueError:
        return 0.0  # undated files sort oldest


@dataclass(frozen=True)
class Pruned:
    """What :func:`prune` removed (or would remove) and what it kept on purpose."""

    removed: list[Path]
    kept: list[Path]
    protected: list[Path]


def prune(
    repo: Any,
    root: Path,
    keep: int,
    *,
    protect_revs: Sequence[str] = ("HEAD",),
    key: str | None = None,
    dry_run: bool = False,
) -> Pruned:
    """Keep the ``keep`` most recently committed baselines per hardware key; delete the rest.

    Never deletes a baseline that one of ``protect_revs`` resolves to (its
    nearest ancestor with a baseline for that key), so the gate's yardstick
    survives any ``keep``.  Recency is the recorded commit's date from the
    file; an unreadable file stops the prune (``BaselineError``) before
    anything is deleted.
    """
    if keep < 0:
        raise BaselineError(f"--keep {keep}: must be 0 or more")
    targets = [check_key(key)] if key else keys(root)
    resolved = [rev.head(repo).sha if r == "HEAD" else rev.resolve(repo, r, "--rev").sha
                for r in protect_revs]
    plan: list[tuple[Path, bool, bool]] = []  # (path, keep, protected)
    for k in targets:
        available = shas(root, k)
        guarded = {hit[0] for s in resolved if (hit := rev.nearest(repo, s, available))}
        dated = []
        for sha in available:
            path = root / k / f"{sha}.json"
            dated.append((_timestamp(load(path).revision.get("date")), sha, path))
        dated.sort(reverse=True)
        for i, (_, sha, path) in enumerate(dated):
            plan.append((path, i < keep or sha in guarded, sha in guarded and i >= keep))
    removed = [p for p, k, _ in plan if not k]
    if not dry_run:
        for p in removed:
            p.unlink()
    return Pruned(
        removed=removed,
        kept=[p for p, k, g in plan if k and not g],
        protected=[p for p, _, g in plan if g],
    )
