"""Same-machine A/B: ``qmmperf compare --base REV [PYTEST ARGS]``.

The base revision is checked out into a temporary, detached ``git worktree``;
the same pytest arguments then run in both trees on this machine, in
interleaved pytest processes (base, head, head, base, base, head, ...), so
that drift of the machine (thermal state, other load) hits both sides alike.
Each run writes ``--qmm-json``; each side's raw samples are merged per
benchmark and head is judged against base with the gate's own statistics
(:mod:`pytest_qmmperf.gate`), as if base's merged samples were a baseline.

What runs on each side
    The *instrument* is fixed: by default both sides import this installed
    ``pytest_qmmperf`` (timing, statistics, reports), so a change to the
    measuring code cannot pass for a change in speed.  What is measured comes
    from each side's tree: the test files, ``conftest.py`` and the project's
    own packages (the tree's root and its ``src/`` go first on ``sys.path``,
    ahead of an editable install that points at the head tree).  For a
    repository whose kernels live inside ``pytest_qmmperf`` itself,
    ``--plugin-from each`` lets each side import its own tree's copy.

Nothing is left behind: the worktree and its temporary directory are removed
in a ``finally`` that SIGINT, SIGTERM and SIGHUP reach too, ``git worktree
prune`` drops the bookkeeping, and worktrees of an earlier compare that was
killed outright (SIGKILL) are reaped at the next start.  No branch is made.

Exit status, as the pytest gate: 0 no regression, 1 a regression (or a head
benchmark failed), 2 interrupted, 4 bad input or a base that cannot run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_qmmperf.metrics import BenchResult

EXIT_OK = 0
EXIT_REGRESSION = 1
EXIT_INTERRUPTED = 2
EXIT_ERROR = 4

#: Name prefix of the temporary directory that holds one compare's worktree;
#: the pid after it lets a later compare reap what a killed one left.
TEMP_PREFIX = "qmmperf-compare-"

#: pytest options that compare sets itself, or that make no sense in A/B.
_RESERVED = {
    "--qmm-json": "compare writes its own report: use qmmperf compare --json PATH",
    "--qmm-markdown": "compare writes its own report: use qmmperf compare --markdown PATH",
    "--qmm-save-baseline": "A/B records no baseline: use qmmperf baseline update",
    "--qmm-baseline-rev": "A/B compares with --base, not with a committed baseline",
    "--qmm-baseline-dir": "A/B compares with --base, not with a committed baseline",
}

# Runs one side's pytest.  argv: tree root, plugin source ("head" or "each"),
# a path for the run's settings, then pytest's arguments.  With "head" the
# installed plugin package is imported before the tree is put on sys.path:
# later imports of its submodules follow the package's own __path__, so the
# instrument stays HEAD's even when the tree holds another copy of it.  The
# small plugin records what the verdict needs from the tree's configuration
# (the qmm_thresholds ini value and each test's qmm_threshold marker), which
# a run without a baseline has no reason to put in its report.
_LAUNCHER = """\
import json, os, sys
tree, plugin_from, settings_path = sys.argv[1:4]
del sys.argv[1:4]
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]
if plugin_from == "head":
    import pytest_qmmperf
for entry in (os.path.join(tree, "src"), tree):
    if os.path.isdir(entry):
        sys.path.insert(0, entry)
import pytest


class CompareSettings:
    def pytest_collection_modifyitems(self, config, items):
        markers = {}
        for item in items:
            mark = item.get_closest_marker("qmm_threshold")
            if mark is not None:
                markers[item.nodeid] = [list(mark.args), dict(mark.kwargs)]
        try:
            ini = [str(x) for x in config.getini("qmm_thresholds")]
        except ValueError:
            ini = []
        with open(settings_path, "w") as f:
            json.dump({"ini_thresholds": ini, "markers": markers}, f, default=str)


raise SystemExit(pytest.main(sys.argv[1:], plugins=[CompareSettings()]))
"""


class CompareError(Exception):
    """A compare that cannot run or finish; the message is one line for the user."""

    exit_code = EXIT_ERROR


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so that cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --- revisions and the work tree ------------------------------------------------


def open_repo(path: str | os.PathLike[str] = ".") -> Any:
    """The git repository containing ``path`` (GitPython ``Repo``)."""
    from pytest_qmmperf import revision

    try:
        return revision.open_repo(
            os.path.abspath(path),
            why="compare checks the base revision out of the repository's history")
    except revision.RevisionError as exc:
        raise CompareError(str(exc)) from None


def resolve_base(repo: Any, rev: str) -> Any:
    """The commit ``rev`` names; it must be HEAD or an ancestor of HEAD.

    Raises :class:`CompareError` naming ``rev`` when it is unknown (with a hint
    for shallow clones) or not an ancestor of HEAD.
    """
    import git

    from pytest_qmmperf import revision

    try:
        head = repo.head.commit
    except ValueError:
        raise CompareError(f"{repo.working_tree_dir} has no commits yet: nothing to compare") \
            from None
    try:
        base = repo.commit(rev)
    except (git.BadName, git.BadObject, ValueError):
        hint = ("a sha, branch, tag or remote branch such as origin/main; fetch it first "
                "(git fetch origin main)")
        if revision.is_shallow(repo):
            hint += "; this clone is shallow: check out with fetch-depth: 0"
        raise CompareError(f"--base {rev!r}: unknown revision ({hint})") from None
    if base.hexsha != head.hexsha and not repo.is_ancestor(base.hexsha, head.hexsha):
        raise CompareError(
            f"--base {rev!r} ({base.hexsha[:10]}) is not an ancestor of HEAD "
            f"({head.hexsha[:10]}): compare against the merge base, e.g. "
            f"--base $(git merge-base HEAD {rev})"
        )
    return base


def dirty_paths(repo: Any, ignore: Sequence[Path] = ()) -> list[str]:
    """What makes the work tree differ from HEAD (as :func:`revision.dirty_paths` says).

    ``ignore`` holds files this compare writes itself (its reports) that may
    be untracked inside the tree.
    """
    from pytest_qmmperf import revision

    root = Path(repo.working_tree_dir).resolve()
    exclude = []
    for p in ignore:
        with contextlib.suppress(ValueError):
            exclude.append(Path(p).resolve().relative_to(root).as_posix())
    return [entry[3:] for entry in revision.dirty_paths(repo, exclude)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worktree_paths(repo: Any) -> list[Path]:
    """Every linked worktree of ``repo`` (not the main one)."""
    out = repo.git.worktree("list", "--porcelain")
    paths = [Path(line[len("worktree "):]) for line in out.splitlines()
             if line.startswith("worktree ")]
    return paths[1:]


def reap_stale_worktrees(repo: Any) -> list[Path]:
    """Remove worktrees left by a compare whose process no longer exists.

    Only directories named ``qmmperf-compare-<pid>-*`` whose pid is dead are
    touched; returns what was removed.
    """
    removed = []
    for path in worktree_paths(repo):
        match = re.match(re.escape(TEMP_PREFIX) + r"(\d+)-", path.parent.name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        with contextlib.suppress(Exception):
            repo.git.worktree("remove", "--force", str(path))
        shutil.rmtree(path.parent, ignore_errors=True)
        removed.append(path)
    repo.git.worktree("prune")
    return removed


@contextlib.contextmanager
def base_worktree(repo: Any, sha: str) -> Iterator[Path]:
    """Check ``sha`` out, detached, into a temporary worktree; remove it on exit.

    Removal runs however the block ends (error, KeyboardInterrupt,
    :class:`Interrupted`), and ``git worktree prune`` clears git's records.
    """
    temp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-"))
    tree = temp / "base"
    try:
        repo.git.worktree("add", "--detach", "--quiet", str(tree), sha)
        yield tree
    finally:
        # Each step on its own: a failed one must not keep the others from running.
        with contextlib.suppress(Exception):
            if tree.exists():
                repo.git.worktree("remove", "--force", str(tree))
        shutil.rmtree(temp, ignore_errors=True)
        with contextlib.suppress(Exception):
            repo.git.worktree("prune")


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`Interrupted` for the block's duration.

    SIGINT already raises KeyboardInterrupt.  Only possible in the main
    thread; elsewhere the block runs unchanged.
    """
    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    names = ("SIGTERM", "SIGHUP")
    previous: dict[int, Any] = {}
    try:
        for name in names:
            signum = getattr(signal, name, None)
            if signum is not None:
                previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


# --- running one side -------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    """One side of the comparison: its label, commit and where its pytest runs."""

    label: str
    sha: str
    tree: Path
    cwd: Path
    dirty: bool = False

    @property
    def revision(self) -> str:
        return self.sha[:10] + ("+dirty" if self.dirty else "")


@dataclass
class SideResults:
    """Every run of one side: merged samples per benchmark, and what each run took."""

    side: Side
    results: dict[str, BenchResult] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    run_seconds: list[float] = field(default_factory=list)
    #: The first run's whole ``--qmm-json`` document, with the tree's threshold
    #: settings under ``compare_settings``.
    document: dict[str, Any] = field(default_factory=dict)

    def add(self, results: Sequence[BenchResult]) -> None:
        """Merge one run's results: samples of the same benchmark are concatenated."""
        for r in results:
            have = self.results.get(r.name)
            if have is None:
                self.results[r.name] = BenchResult(
                    r.name, r.kind, dict(r.params),
                    {m: list(v) for m, v in r.samples.items()}, dict(r.info, runs=1),
                )
                continue
            if have.params != r.params:
                raise CompareError(
                    f"{self.side.label}: {r.name} ran with different parameters in two runs "
                    f"({have.params} vs {r.params}): a benchmark must be deterministic"
                )
            for m, values in r.samples.items():
                have.samples.setdefault(m, []).extend(values)
            have.info["runs"] = have.info.get("runs", 1) + 1
            if "rounds" in r.info and isinstance(have.info.get("rounds"), int):
                have.info["rounds"] += r.info["rounds"]


def schedule(rounds_per_side: int) -> list[str]:
    """The order of runs: pairs in alternating order, ``base head head base ...``.

    Interleaving spreads drift over both sides; alternating which side opens
    a pair keeps either from always running first (warm caches, a cooler chip).
    """
    if rounds_per_side < 1:
        raise CompareError(f"--rounds-per-side {rounds_per_side}: expected 1 or more")
    order: list[str] = []
    for i in range(rounds_per_side):
        order.extend(("base", "head") if i % 2 == 0 else ("head", "base"))
    return order


def check_pytest_args(args: Sequence[str]) -> None:
    """Reject pytest options that compare sets itself (one-line :class:`CompareError`)."""
    for arg in args:
        name = arg.split("=", 1)[0]
        if name in _RESERVED:
            raise CompareError(f"pytest argument {name}: {_RESERVED[name]}")


def pytest_command(side: Side, pytest_args: Sequence[str], json_path: Path,
                   no_baselines: Path, plugin_from: str, settings_path: Path) -> list[str]:
    """The command line of one run of ``side``."""
    cmd = [sys.executable, "-c", _LAUNCHER, str(side.tree), plugin_from, str(settings_path)]
    cmd += [str(a) for a in pytest_args]
    cmd += [
        "--qmm-bench",
        "--qmm-json", str(json_path),
        # No committed baseline takes part: every run only measures, and the
        # verdict is head's samples against base's.
        "--qmm-baseline-dir", str(no_baselines),
        # Keep .pytest_cache out of both trees (a new untracked file would make
        # the head tree dirty for the next compare).
        "-p", "no:cacheprovider",
    ]
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        cmd += ["-p", "qmmperf"]
    return cmd


def map_args(args: Sequence[str], head_root: Path, base_root: Path) -> list[str]:
    """Head's pytest arguments for the base tree: absolute paths inside head are moved.

    Relative paths need nothing: each side's pytest runs in the same relative
    directory of its own tree.
    """
    def move(text: str) -> str:
        if not os.path.isabs(text):
            return text
        try:
            rel = Path(os.path.abspath(text)).relative_to(head_root)
        except ValueError:
            return text
        return str(base_root / rel)

    out = []
    for arg in args:
        if arg.startswith("-") and "=" in arg:
            opt, value = arg.split("=", 1)
            out.append(f"{opt}={move(value)}")
        else:
            out.append(move(arg))
    return out


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Inner runs must not append their one-sided reports to the job summary.
    env.pop("GITHUB_STEP_SUMMARY", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _salient(log: str) -> str:
    """The line of a pytest log that best says why it failed."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for pattern in (r"^ERROR: ", r"^E\s+\w*(Error|Exception)\b", r"^E\s+", r"^(FAILED|ERROR) ",
                    r"Error\b"):
        for ln in lines:
            if re.search(pattern, ln):
                return re.sub(r"^E\s+", "", ln)
    return lines[-1] if lines else "no output"


def load_run(path: Path) -> tuple[list[BenchResult], dict[str, Any], dict[str, Any]]:
    """Results, fingerprint and the whole document of one run's ``--qmm-json``."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CompareError(f"{path}: unreadable --qmm-json output ({exc})") from None
    results = []
    for entry in doc.get("results", []):
        results.append(BenchResult(
            name=entry["name"], kind=entry.get("kind", ""), params=entry.get("params", {}),
            samples={m: [float(v) for v in vs] for m, vs in entry.get("samples", {}).items()},
            info=entry.get("info", {}),
        ))
    return results, doc.get("fingerprint") or doc.get("hardware") or {}, doc


def run_once(side: Side, index: int, total: int, pytest_args: Sequence[str], workdir: Path,
             plugin_from: str, out: Any = sys.stderr) -> tuple[list[BenchResult], dict[str, Any],
                                                               dict[str, Any], float]:
    """Run pytest once for ``side``; its results, fingerprint, JSON document and seconds.

    A failing run raises :class:`CompareError` with pytest's most telling
    line; the full log stays on stderr.  The child is stopped if this process
    is interrupted while waiting for it.
    """
    json_path = workdir / f"run-{index:03d}-{side.label}.json"
    log_path = workdir / f"run-{index:03d}-{side.label}.log"
    no_baselines = workdir / "no-baselines"
    no_baselines.mkdir(exist_ok=True)
    settings_path = workdir / f"run-{index:03d}-{side.label}.settings.json"
    cmd = pytest_command(side, pytest_args, json_path, no_baselines, plugin_from,
                         settings_path)
    print(f"[{index}/{total}] {side.label} {side.revision}: running", file=out, flush=True)
    start = time.monotonic()
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(cmd, cwd=side.cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=_child_env())
        try:
            rc = proc.wait()
        except BaseException:
            _stop(proc)
            raise
        log.seek(0)
        text = log.read()
    seconds = time.monotonic() - start
    if rc != 0:
        tail = "\n".join(text.splitlines()[-25:])
        print(f"--- {side.label} {side.revision}: pytest exit status {rc}, last lines:\n{tail}",
              file=out, flush=True)
        raise _run_error(side, rc, text)
    if not json_path.exists():
        raise CompareError(
            f"{side.label} {side.revision}: pytest passed but wrote no --qmm-json report; is the "
            "qmmperf plugin loaded there (pip install pytest-qmmperf, or pytest -p qmmperf)?"
        )
    results, fp, doc = load_run(json_path)
    with contextlib.suppress(OSError, ValueError):
        doc = {**doc, "compare_settings": json.loads(settings_path.read_text())}
    if not results:
        raise CompareError(
            f"{side.label} {side.revision}: no qmm_bench results (did the selected tests "
            "use the qmm_bench fixture?)"
        )
    print(f"[{index}/{total}] {side.label} {side.revision}: {len(results)} benchmarks in "
          f"{seconds:.1f} s", file=out, flush=True)
    return results, fp, doc, seconds


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run_error(side: Side, rc: int, log: str) -> CompareError:
    where = f"{side.label} {side.revision}"
    why = _salient(log)
    if rc == 5:
        err = CompareError(f"{where}: no tests collected with these pytest arguments ({why})")
    elif rc == 4:
        if "not found" in why:
            err = CompareError(f"{where}: the benchmarks do not exist there ({why})")
        else:
            err = CompareError(f"{where}: pytest refused the arguments ({why})")
    elif rc == 2:
        err = CompareError(f"{where}: the benchmarks failed to import or collect ({why})")
    elif rc == 1:
        err = CompareError(f"{where}: benchmarks failed ({why})")
        if side.label == "head":
            err.exit_code = EXIT_REGRESSION
    else:
        err = CompareError(f"{where}: pytest exited with status {rc} ({why})")
    return err


# --- the whole comparison ---------------------------------------------------------


@dataclass(frozen=True)
class CompareConfig:
    """What ``qmmperf compare`` was asked to do."""

    base: str
    pytest_args: tuple[str, ...] = ()
    rounds_per_side: int = 3
    json_path: Path | None = None
    markdown_path: Path | None = None
    allow_dirty: bool = False
    plugin_from: str = "head"
    cwd: Path = field(default_factory=Path.cwd)


def run_sides(config: CompareConfig, out: Any = sys.stderr
              ) -> tuple[SideResults, SideResults]:
    """Check the base out, run both sides interleaved, and return their merged results.

    Everything temporary is gone when this returns or raises.
    """
    if config.plugin_from not in ("head", "each"):
        raise CompareError(f"--plugin-from {config.plugin_from!r}: expected head or each")
    check_pytest_args(config.pytest_args)
    order = schedule(config.rounds_per_side)
    repo = open_repo(config.cwd)
    head_root = Path(repo.working_tree_dir).resolve()
    base_commit = resolve_base(repo, config.base)
    ignore = [p for p in (config.json_path, config.markdown_path) if p is not None]
    dirty = dirty_paths(repo, ignore)
    if dirty and not config.allow_dirty:
        shown = ", ".join(dirty[:5]) + (f" and {len(dirty) - 5} more" if len(dirty) > 5 else "")
        raise CompareError(
            f"the work tree has uncommitted changes ({shown}): commit or stash them, or pass "
            "--allow-dirty to compare the work tree as it is"
        )
    reap_stale_worktrees(repo)
    rel = Path(os.path.abspath(config.cwd)).resolve().relative_to(head_root)
    head = Side("head", repo.head.commit.hexsha, head_root, head_root / rel, bool(dirty))
    with signals_as_interrupt(), base_worktree(repo, base_commit.hexsha) as tree:
        base = Side("base", base_commit.hexsha, tree, tree / rel)
        if not base.cwd.is_dir():
            raise CompareError(f"base {base.revision}: directory {rel} does not exist there")
        sides = {"base": SideResults(base), "head": SideResults(head)}
        args = {"head": list(config.pytest_args),
                "base": map_args(config.pytest_args, head_root, tree)}
        workdir = tree.parent / "runs"
        workdir.mkdir()
        print(f"qmmperf compare: base {config.base} = {base.revision}, head {head.revision}, "
              f"{config.rounds_per_side} runs per side", file=out, flush=True)
        for index, label in enumerate(order, 1):
            side = sides[label]
            results, fp, doc, seconds = run_once(side.side, index, len(order), args[label],
                                                 workdir, config.plugin_from, out)
            side.add(results)
            side.run_seconds.append(seconds)
            side.fingerprint = side.fingerprint or fp
            side.document = side.document or doc
    return sides["base"], sides["head"]


# --- the verdict ------------------------------------------------------------------


def thresholds_from_args(pytest_args: Sequence[str]) -> list[str]:
    """The ``--qmm-threshold`` values among pytest's arguments, in order."""
    out = []
    it = iter(pytest_args)
    for arg in it:
        if arg == "--qmm-threshold":
            value = next(it, None)
            if value is None:
                raise CompareError("pytest argument --qmm-threshold: needs a value such as 5%")
            out.append(value)
        elif arg.startswith("--qmm-threshold="):
            out.append(arg.split("=", 1)[1])
    return out


def tree_settings(side: SideResults) -> tuple[list[str], dict[str, Any]]:
    """The ``qmm_thresholds`` ini items and per-test ``qmm_threshold`` markers of a side."""
    settings = side.document.get("compare_settings") or {}
    return list(settings.get("ini_thresholds") or []), dict(settings.get("markers") or {})


def judge_sides(base: SideResults, head: SideResults, thresholds: Any,
                enforce_timing: bool) -> list[Any]:
    """Gate verdicts of head's merged samples against base's, per benchmark and metric.

    Base plays the baseline's part in :func:`pytest_qmmperf.gate.judge`;
    head's ``qmm_threshold`` markers apply as in a pytest run.  No drift
    correction: both sides ran interleaved on one machine, which is the
    control the correction stands in for.
    """
    from pytest_qmmperf import gate

    _, markers = tree_settings(head)
    verdicts: list[Any] = []
    for name, cur in head.results.items():
        ref = base.results.get(name)
        th = thresholds
        if name in markers:
            args, kwargs = markers[name]
            th = thresholds.with_marker(args, kwargs)
        verdicts += gate.judge(
            name, cur.samples, ref.samples if ref else None,
            current_params=cur.params, baseline_params=ref.params if ref else None,
            thresholds=th, baseline_revision=base.side.sha, enforce_timing=enforce_timing,
        )
    for name, ref in base.results.items():
        if name not in head.results:
            verdicts += gate.missing(name, ref.samples, base.side.sha)
    return verdicts


@dataclass
class Outcome:
    """A finished comparison: both sides, the verdicts and the exit status."""

    config: CompareConfig
    base: SideResults
    head: SideResults
    verdicts: list[Any]
    #: The report in the pytest gate's own form (:class:`pytest_qmmperf.report.Report`),
    #: with base in the baseline's place.
    report: Any

    @property
    def failed(self) -> list[Any]:
        return [v for v in self.verdicts if v.failed]

    @property
    def exit_status(self) -> int:
        return EXIT_REGRESSION if self.failed else EXIT_OK

    def headline(self) -> str:
        b, h = self.base.side, self.head.side
        return (f"qmmperf compare: head {h.revision} against base {b.revision} "
                f"({self.config.base}), {_runs(self.config.rounds_per_side)} per side on this "
                "machine, interleaved")

    def to_dict(self) -> dict[str, Any]:
        """The JSON report: the pytest gate's ``--qmm-json`` layout plus an ``ab`` section."""
        from pytest_qmmperf import report

        def results(side: SideResults) -> list[dict[str, Any]]:
            return [{"name": r.name, "kind": r.kind, "params": r.params, "samples": r.samples,
                     "info": r.info} for r in side.results.values()]

        doc = report.as_json(self.report)
        doc["mode"] = "ab"
        doc["ab"] = {
            "base": {"requested": self.config.base, "sha": self.base.side.sha,
                     "run_seconds": self.base.run_seconds},
            "head": {"sha": self.head.side.sha, "dirty": self.head.side.dirty,
                     "run_seconds": self.head.run_seconds},
            "rounds_per_side": self.config.rounds_per_side,
            "order": schedule(self.config.rounds_per_side),
            "plugin_from": self.config.plugin_from,
            "pytest_args": list(self.config.pytest_args),
            "base_results": results(self.base),
        }
        doc["exit_status"] = self.exit_status
        return report.finite(doc)


def _runs(n: int) -> str:
    return f"{n} pytest run{'s' if n != 1 else ''}"


def build_report(config: CompareConfig, base: SideResults, head: SideResults,
                 verdicts: list[Any], repo: Any) -> Any:
    """The pytest gate's :class:`~pytest_qmmperf.report.Report` for an A/B outcome.

    Base's merged runs take the baseline's place, so the terminal table,
    Markdown and JSON read as they do after a pytest run.
    """
    from pytest_qmmperf import baselines, report, revision

    base_rev = revision.resolve(repo, base.side.sha).as_dict()
    distance = sum(1 for _ in repo.iter_commits(f"{base.side.sha}..{head.side.sha}"))
    runs = config.rounds_per_side
    source = f"A/B: {_runs(runs)} of the base worktree, interleaved with head's"
    found = baselines.Found(
        baselines.new_baseline(base.results.values(), hardware=base.fingerprint,
                               revision=base_rev),
        base.side.sha, distance, source,
    )
    order = " ".join("B" if s == "base" else "H" for s in schedule(runs))
    notes = [
        f"A/B on this machine: base {base.side.revision} ({config.base}) and head "
        f"{head.side.revision}, runs in the order {order} (B base, H head); "
        f"{sum(base.run_seconds):.0f} s base, {sum(head.run_seconds):.0f} s head",
        "measured by " + ("this installed pytest_qmmperf on both sides" if
                          config.plugin_from == "head" else "each tree's own pytest_qmmperf"),
    ]
    return report.Report(results=list(head.results.values()), verdicts=verdicts,
                         fingerprint=head.fingerprint, found=found, notes=notes)


def _write_atomic(path: Path, text: str) -> None:
    from pytest_qmmperf import report

    report.write_text(path, text)


def compare(config: CompareConfig, out: Any = sys.stderr) -> Outcome:
    """Run the whole comparison and write the reports asked for."""
    from pytest_qmmperf import gate, report

    cli_thresholds = thresholds_from_args(config.pytest_args)
    try:
        gate.Thresholds.from_options(cli=cli_thresholds)
    except gate.ThresholdError as exc:
        raise CompareError(str(exc)) from None
    base, head = run_sides(config, out)
    if base.fingerprint.get("key") != head.fingerprint.get("key"):
        raise CompareError(
            f"base ran on {base.fingerprint.get('key')!r} but head on "
            f"{head.fingerprint.get('key')!r}: an A/B comparison needs one machine"
        )
    ini, _ = tree_settings(head)
    try:
        thresholds = gate.Thresholds.from_options(cli=cli_thresholds, ini=ini)
    except gate.ThresholdError as exc:
        raise CompareError(str(exc)) from None
    virtual = bool(head.fingerprint.get("virtual"))
    enforce = not virtual or "--qmm-gate-virtual" in config.pytest_args
    verdicts = judge_sides(base, head, thresholds, enforce)
    repo = open_repo(config.cwd)
    outcome = Outcome(config, base, head, verdicts,
                      build_report(config, base, head, verdicts, repo))
    if config.json_path is not None:
        _write_atomic(config.json_path, json.dumps(outcome.to_dict(), indent=1) + "\n")
    if config.markdown_path is not None or os.environ.get("GITHUB_STEP_SUMMARY"):
        md = f"{outcome.headline()}\n\n" + report.markdown(outcome.report)
        if config.markdown_path is not None:
            _write_atomic(config.markdown_path, md)
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as fh:
                fh.write(md + "\n")
    return outcome


# --- the command line ---------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    """Add ``compare`` to ``qmmperf``'s subcommands."""
    p = subparsers.add_parser(
        "compare", allow_abbrev=False,
        usage="qmmperf compare --base REV [--rounds-per-side N] [--json PATH] "
              "[--markdown PATH] [--allow-dirty] [--plugin-from {head,each}] [--] "
              "[PYTEST ARGS]",
        help="same-machine A/B: run the benchmarks at REV and at HEAD, interleaved, and gate",
        description="Check REV out into a temporary git worktree, run the same benchmarks "
                    "there and in this work tree on this machine in interleaved pytest runs, "
                    "and judge head against base with the gate's statistics. Arguments it does "
                    "not know go to pytest (put them after -- to be safe).",
    )
    p.add_argument("--base", required=True, metavar="REV",
                   help="revision to compare against: a sha, branch, tag or origin/main; must "
                        "be an ancestor of HEAD")
    p.add_argument("--rounds-per-side", type=int, default=3, metavar="N",
                   help="pytest runs per side, interleaved (default 3)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON")
    p.add_argument("--markdown", type=Path, metavar="PATH",
                   help="write the report as Markdown (also appended to $GITHUB_STEP_SUMMARY "
                        "when set)")
    p.add_argument("--allow-dirty", action="store_true",
                   help="run head from a work tree with uncommitted changes")
    p.add_argument("--plugin-from", choices=("head", "each"), default="head",
                   help="which pytest_qmmperf measures: head's installed one on both sides "
                        "(default), or each tree's own (when the kernels compared live in it)")
    p.set_defaults(func=run_cli, passthrough=True)


def run_cli(args: argparse.Namespace) -> int:
    """``qmmperf compare``: returns the exit status."""
    extra = list(getattr(args, "extra", []) or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    config = CompareConfig(
        base=args.base, pytest_args=tuple(extra), rounds_per_side=args.rounds_per_side,
        json_path=args.json.resolve() if args.json else None,
        markdown_path=args.markdown.resolve() if args.markdown else None,
        allow_dirty=args.allow_dirty, plugin_from=args.plugin_from,
    )
    try:
        outcome = compare(config)
    except CompareError as exc:
        print(f"qmmperf compare: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        what = f" ({exc.args[0]})" if exc.args else ""
        print(f"qmmperf compare: interrupted{what}; worktree removed", file=sys.stderr)
        return EXIT_INTERRUPTED
    from pytest_qmmperf import report

    print(outcome.headline())
    for line in report.terminal_lines(outcome.report):
        print(line)
    return outcome.exit_status
