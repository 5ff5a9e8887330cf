"""``qmmperf compare``: same-machine A/B in real git repositories with real MLX work.

Each test builds a small repository (GitPython, in tmp_path) holding a tiny
benchmark suite whose amount of MLX work is a constant of the project's own
package (``src/abwork.py``, src layout); commits change that constant, so the
head really does more (or the same) work than the base.  Runs are the real
``qmmperf compare`` command in a subprocess, with few rounds and tiny shapes.  After every run the
repository must hold no worktree, the temp folder no compare directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import git
import pytest

from pytest_qmmperf import compare as cmp
from pytest_qmmperf.metrics import BenchResult

BENCH = '''\
import mlx.core as mx

import abwork


def test_matmul(qmm_bench):
    mx.random.seed(0)
    x = mx.random.normal((abwork.N, abwork.N))
    ws = [mx.random.normal((abwork.N, abwork.N)) for _ in range(abwork.REPEAT)]
    qmm_bench(lambda: [x @ w for w in ws])
'''

#: Fast timing for tests: short budget, enough rounds for the rank test.
FAST = ("--qmm-time-budget", "0.25", "--qmm-min-rounds", "7", "-q")


def commit(repo: git.Repo, files: dict[str, str], message: str) -> str:
    root = Path(repo.working_tree_dir)
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    repo.index.add(list(files))
    actor = git.Actor("qmmperf tests", "tests@example.com")
    return repo.index.commit(message, author=actor, committer=actor).hexsha


def work(repeat: int, n: int = 96) -> str:
    return f"N = {n}\nREPEAT = {repeat}\n"


@pytest.fixture
def repo(tmp_path: Path) -> git.Repo:
    """A repository whose first commit has the suite doing one matmul per launch."""
    r = git.Repo.init(tmp_path / "proj", initial_branch="main")
    commit(r, {"pytest.ini": "[pytest]\n", "src/abwork.py": work(1),
               "benchmarks/test_ab.py": BENCH, ".gitignore": "__pycache__/\n"}, "suite")
    return r


@pytest.fixture
def tmpdir_env(tmp_path: Path) -> dict[str, str]:
    """Environment whose temp folder is private to the test, to see what is left there."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return {**os.environ, "TMPDIR": str(tmp)}


def qmmperf(repo: git.Repo, env: dict[str, str], *args: str,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_qmmperf.cli", "compare", *args],
        cwd=repo.working_tree_dir, env=env, capture_output=True, text=True, timeout=timeout,
    )


def assert_clean(repo: git.Repo, env: dict[str, str]) -> None:
    """No worktree registered, no compare folder in the temp dir, no branch added."""
    listing = repo.git.worktree("list", "--porcelain")
    assert listing.count("worktree ") == 1, listing
    leftovers = [p.name for p in Path(env["TMPDIR"]).iterdir()
                 if p.name.startswith(cmp.TEMP_PREFIX)]
    assert leftovers == []
    assert [h.name for h in repo.heads] == ["main"]
    assert not (Path(repo.git_dir) / "worktrees").exists() or \
        not any((Path(repo.git_dir) / "worktrees").iterdir())


# --- pure parts ----------------------------------------------------------------------


def test_schedule_alternates_which_side_opens_each_pair() -> None:
    assert cmp.schedule(1) == ["base", "head"]
    assert cmp.schedule(3) == ["base", "head", "head", "base", "base", "head"]
    with pytest.raises(cmp.CompareError, match="--rounds-per-side 0: expected 1 or more"):
        cmp.schedule(0)


def test_map_args_moves_absolute_paths_into_the_base_tree(tmp_path: Path) -> None:
    head, base = tmp_path / "head", tmp_path / "wt" / "base"
    args = [f"{head}/benchmarks/test_a.py::test_x", "benchmarks", f"--rootdir={head}", "-k",
            "x", "/elsewhere/file.py", f"--junitxml={tmp_path}/out.xml"]
    assert cmp.map_args(args, head, base) == [
        f"{base}/benchmarks/test_a.py::test_x", "benchmarks", f"--rootdir={base}", "-k", "x",
        "/elsewhere/file.py", f"--junitxml={tmp_path}/out.xml",
    ]


def test_reserved_pytest_arguments_are_refused() -> None:
    with pytest.raises(cmp.CompareError, match="use qmmperf compare --json PATH"):
        cmp.check_pytest_args(["benchmarks", "--qmm-json=x.json"])
    with pytest.raises(cmp.CompareError, match="A/B records no baseline"):
        cmp.check_pytest_args(["--qmm-save-baseline"])
    cmp.check_pytest_args(["benchmarks", "--qmm-threshold", "3%"])
    assert cmp.thresholds_from_args(["--qmm-threshold", "3%", "-k", "a",
                                     "--qmm-threshold=ttft_s=2%"]) == ["3%", "ttft_s=2%"]


def test_merge_concatenates_samples_and_refuses_changed_params(repo: git.Repo) -> None:
    side = cmp.SideResults(cmp.Side("base", "a" * 40, Path("."), Path(".")))
    side.add([BenchResult("t::a", "callable", {"fn": "f"}, {"time_s": [1.0, 2.0]},
                          {"rounds": 2})])
    side.add([BenchResult("t::a", "callable", {"fn": "f"}, {"time_s": [3.0]}, {"rounds": 1})])
    merged = side.results["t::a"]
    assert merged.samples == {"time_s": [1.0, 2.0, 3.0]}
    assert merged.info["runs"] == 2 and merged.info["rounds"] == 3
    with pytest.raises(cmp.CompareError, match="different parameters in two runs"):
        side.add([BenchResult("t::a", "callable", {"fn": "g"}, {"time_s": [1.0]})])


# --- bad input: clear one line, nothing left behind -----------------------------------


def test_unknown_revision(repo: git.Repo, tmpdir_env: dict[str, str]) -> None:
    proc = qmmperf(repo, tmpdir_env, "--base", "no-such-branch", "benchmarks")
    assert proc.returncode == cmp.EXIT_ERROR
    assert proc.stderr.strip().splitlines() == [
        "qmmperf compare: error: --base 'no-such-branch': unknown revision (a sha, branch, tag "
        "or remote branch such as origin/main; fetch it first (git fetch origin main))"
    ]
    assert_clean(repo, tmpdir_env)


def test_base_not_an_ancestor(repo: git.Repo, tmpdir_env: dict[str, str]) -> None:
    root = repo.head.commit
    repo.git.checkout("-q", "-b", "side")
    side_sha = commit(repo, {"src/abwork.py": work(2)}, "side change")
    repo.git.checkout("-q", "main")
    commit(repo, {"src/abwork.py": work(3)}, "main change")
    proc = qmmperf(repo, tmpdir_env, "--base", "side", "benchmarks")
    assert proc.returncode == cmp.EXIT_ERROR
    assert f"--base 'side' ({side_sha[:10]}) is not an ancestor of HEAD" in proc.stderr
    assert "--base $(git merge-base HEAD side)" in proc.stderr
    assert repo.is_ancestor(root, repo.head.commit)
    repo.git.branch("-D", "side")
    assert_clean(repo, tmpdir_env)


def test_dirty_tree_is_refused_unless_allowed(repo: git.Repo,
                                               tmpdir_env: dict[str, str]) -> None:
    commit(repo, {"README": "x\n"}, "second")
    (Path(repo.working_tree_dir) / "src" / "abwork.py").write_text(work(2))
    (Path(repo.working_tree_dir) / "notes.txt").write_text("scratch")
    proc = qmmperf(repo, tmpdir_env, "--base", "HEAD~1", "benchmarks")
    assert proc.returncode == cmp.EXIT_ERROR
    assert ("the work tree has uncommitted changes (src/abwork.py, notes.txt): commit "
            "or stash them, or pass --allow-dirty") in proc.stderr
    assert_clean(repo, tmpdir_env)


def test_base_without_the_benchmarks(repo: git.Repo, tmpdir_env: dict[str, str]) -> None:
    commit(repo, {"perf/test_ab.py": BENCH}, "new suite folder")
    proc = qmmperf(repo, tmpdir_env, "--base", "HEAD~1", "--rounds-per-side", "1", "perf", *FAST)
    assert proc.returncode == cmp.EXIT_ERROR, proc.stderr
    base = repo.commit("HEAD~1").hexsha[:10]
    assert (f"qmmperf compare: error: base {base}: the benchmarks do not exist there "
            "(ERROR: file or directory not found: perf)") in proc.stderr
    assert_clean(repo, tmpdir_env)


def test_base_whose_benchmarks_fail_to_import(repo: git.Repo,
                                              tmpdir_env: dict[str, str]) -> None:
    repo_root = Path(repo.working_tree_dir)
    commit(repo, {"benchmarks/test_ab.py": "import no_such_module_abc\n" + BENCH}, "broken")
    commit(repo, {"benchmarks/test_ab.py": BENCH}, "fixed")
    proc = qmmperf(repo, tmpdir_env, "--base", "HEAD~1", "--rounds-per-side", "1",
                   "benchmarks", *FAST)
    assert proc.returncode == cmp.EXIT_ERROR, proc.stderr
    base = repo.commit("HEAD~1").hexsha[:10]
    assert (f"qmmperf compare: error: base {base}: the benchmarks failed to import or collect "
            "(ModuleNotFoundError: No module named 'no_such_module_abc')") in proc.stderr
    # The base ran first and stopped the comparison: head never ran.
    assert "[2/2]" not in proc.stderr
    assert not (repo_root / ".pytest_cache").exists()
    assert_clean(repo, tmpdir_env)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_interrupted_compare_leaves_nothing(repo: git.Repo, tmpdir_env: dict[str, str],
                                            signum: int) -> None:
    """A signal while base's pytest runs: the child stops, the worktree goes, status 2."""
    commit(repo, {"benchmarks/conftest.py": "import time\ntime.sleep(60)\n"}, "slow base")
    commit(repo, {"benchmarks/conftest.py": ""}, "fast head")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_qmmperf.cli", "compare", "--base", "HEAD~1",
         "--rounds-per-side", "1", "benchmarks", *FAST],
        cwd=repo.working_tree_dir, env=tmpdir_env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        # A job started in the background of a non-interactive shell inherits
        # SIGINT ignored, and Python then installs no KeyboardInterrupt handler;
        # give the command the disposition an interactive user's has.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    tmp = Path(tmpdir_env["TMPDIR"])
    deadline = time.monotonic() + 60
    # Wait until the base worktree exists and its pytest has started.
    while time.monotonic() < deadline:
        if any(tmp.glob(f"{cmp.TEMP_PREFIX}*/runs/*.log")):
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("the base run never started")
    assert repo.git.worktree("list").count("\n") == 1  # main + the base worktree
    time.sleep(0.5)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == cmp.EXIT_INTERRUPTED, err
    said = " (SIGTERM)" if signum == signal.SIGTERM else ""
    assert f"qmmperf compare: interrupted{said}; worktree removed" in err
    assert_clean(repo, tmpdir_env)


def test_worktree_of_a_killed_compare_is_reaped(repo: git.Repo, tmp_path: Path) -> None:
    """SIGKILL cannot be caught: the next compare removes what the dead one left."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{cmp.TEMP_PREFIX}{dead.pid}-x" / "base"
    repo.git.worktree("add", "--detach", str(stale), "HEAD")
    mine = tmp_path / f"{cmp.TEMP_PREFIX}{os.getpid()}-y" / "base"
    repo.git.worktree("add", "--detach", str(mine), "HEAD")
    removed = cmp.reap_stale_worktrees(repo)
    assert removed == [stale]
    assert not stale.parent.exists()
    assert cmp.worktree_paths(repo) == [mine]  # a live process's worktree is left alone
    repo.git.worktree("remove", "--force", str(mine))


def test_worktree_context_removes_on_error(repo: git.Repo, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        with cmp.base_worktree(repo, repo.head.commit.hexsha) as tree:
            seen.append(tree)
            assert (tree / "benchmarks" / "test_ab.py").read_text() == BENCH
            assert cmp.worktree_paths(repo) == [tree]
            raise RuntimeError("boom")
    assert not seen[0].parent.exists()
    assert cmp.worktree_paths(repo) == []
    assert not any(p.name.startswith(cmp.TEMP_PREFIX) for p in tmp_path.iterdir())


def test_signals_become_interrupts_and_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(cmp.Interrupted) as info:
        with cmp.signals_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert info.value.signum == signal.SIGTERM
    assert isinstance(info.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before


def test_json_report_is_written_atomically(tmp_path: Path) -> None:
    target = tmp_path / "out" / "r.json"
    cmp._write_atomic(target, json.dumps({"a": 1}))
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]


# --- the comparison itself ------------------------------------------------------------


def test_slower_head_fails(repo: git.Repo, tmpdir_env: dict[str, str], tmp_path: Path) -> None:
    """Head does 3x the MLX work of base: time and memory regress, exit 1, reports written."""
    commit(repo, {"src/abwork.py": work(3)}, "three times the work")
    summary = tmp_path / "summary.md"
    env = {**tmpdir_env, "GITHUB_STEP_SUMMARY": str(summary)}
    report, md = tmp_path / "out" / "ab.json", tmp_path / "out" / "ab.md"
    proc = qmmperf(repo, env, "--base", "HEAD~1", "--rounds-per-side", "2", "--json",
                   str(report), "--markdown", str(md), "--", "benchmarks", *FAST)
    assert proc.returncode == cmp.EXIT_REGRESSION, proc.stdout + proc.stderr
    base, head = repo.commit("HEAD~1").hexsha, repo.head.commit.hexsha
    # Interleaved: base, head, head, base.
    order = [line.split()[1] for line in proc.stderr.splitlines() if line.endswith("running")]
    assert order == ["base", "head", "head", "base"]
    assert f"qmmperf compare: head {head[:10]} against base {base[:10]} (HEAD~1)" in proc.stdout
    assert "time_s regression" in proc.stdout and "gate: 1 failing" in proc.stdout

    doc = json.loads(report.read_text())
    assert doc["mode"] == "ab" and doc["passed"] is False and doc["exit_status"] == 1
    assert doc["baseline"]["sha"] == base and doc["ab"]["head"]["sha"] == head
    assert doc["ab"]["order"] == ["base", "head", "head", "base"]
    time_v = next(v for v in doc["verdicts"] if v["metric"] == "time_s")
    assert time_v["status"] == "regression" and time_v["failed"]
    assert 1.5 < time_v["change"] < 3.5  # three matmuls instead of one
    # Samples of both runs of each side are merged.
    (head_result,) = doc["results"]
    (base_result,) = doc["ab"]["base_results"]
    assert head_result["info"]["runs"] == base_result["info"]["runs"] == 2
    assert len(head_result["samples"]["peak_memory_gb"]) == 2
    assert len(head_result["samples"]["time_s"]) >= 14  # --qmm-min-rounds 7, twice
    assert md.read_text() in summary.read_text()
    assert "**regression**" in md.read_text()
    assert_clean(repo, tmpdir_env)


def test_unchanged_head_passes(repo: git.Repo, tmpdir_env: dict[str, str],
                               tmp_path: Path) -> None:
    """The same work under a new commit: nothing regresses, exit 0."""
    commit(repo, {"README": "docs only\n"}, "docs")
    report = tmp_path / "ab.json"
    proc = qmmperf(repo, tmpdir_env, "--base", "main~1", "--rounds-per-side", "2", "--json",
                   str(report), "benchmarks", *FAST, "--qmm-threshold", "25%")
    assert proc.returncode == cmp.EXIT_OK, proc.stdout + proc.stderr
    doc = json.loads(report.read_text())
    assert doc["passed"] is True
    statuses = {v["metric"]: v for v in doc["verdicts"]}
    assert statuses["time_s"]["status"] in ("unchanged", "improvement")
    assert statuses["time_s"]["threshold"] == 0.25
    assert statuses["time_s"]["threshold_source"] == "cli"
    assert statuses["peak_memory_gb"]["status"] == "unchanged"
    assert abs(statuses["time_s"]["change"]) < 0.25
    assert "gate: pass" in proc.stdout
    assert_clean(repo, tmpdir_env)


def test_head_markers_and_ini_set_the_thresholds(repo: git.Repo,
                                                 tmpdir_env: dict[str, str]) -> None:
    """3x the work, but head's marker allows 500% on time: only memory (ini 150%) is judged."""
    marked = BENCH.replace("def test_matmul", '@pytest.mark.qmm_threshold(time_s="500%")\n'
                           "def test_matmul")
    marked = marked.replace("import abwork", "import abwork\nimport pytest")
    commit(repo, {"src/abwork.py": work(3), "benchmarks/test_ab.py": marked,
                  "pytest.ini": "[pytest]\nqmm_thresholds = 150%\n"}, "loosened")
    proc = qmmperf(repo, tmpdir_env, "--base", "HEAD~1", "--rounds-per-side", "1",
                   "benchmarks", *FAST)
    assert proc.returncode == cmp.EXIT_REGRESSION, proc.stdout + proc.stderr
    assert "peak_memory_gb regression" in proc.stdout and "threshold 150% (ini)" in proc.stdout
    assert "time_s regression" not in proc.stdout
    assert_clean(repo, tmpdir_env)


def test_instrument_is_heads_plugin_unless_asked(repo: git.Repo,
                                                 tmpdir_env: dict[str, str]) -> None:
    """A base tree with its own (broken) pytest_qmmperf: head's plugin measures both sides."""
    commit(repo, {"pytest_qmmperf/__init__.py": "raise ImportError('base copy of the plugin')\n"},
           "a copy of the plugin in the tree")
    commit(repo, {"README": "x\n"}, "head")
    repo.git.rm("-q", "pytest_qmmperf/__init__.py")
    repo.index.commit("drop the copy", author=git.Actor("t", "t@example.com"),
                      committer=git.Actor("t", "t@example.com"))
    proc = qmmperf(repo, tmpdir_env, "--base", "HEAD~1", "--rounds-per-side", "1",
                   "benchmarks", *FAST, "--qmm-threshold", "50%")
    assert proc.returncode == cmp.EXIT_OK, proc.stdout + proc.stderr
    assert "measured by this installed pytest_qmmperf on both sides" in proc.stdout
    proc = qmmperf(repo, tmpdir_env, "--base", "HEAD~1", "--rounds-per-side", "1",
                   "--plugin-from", "each", "benchmarks", *FAST)
    assert proc.returncode == cmp.EXIT_ERROR
    assert "ImportError: base copy of the plugin" in proc.stderr
    assert_clean(repo, tmpdir_env)
