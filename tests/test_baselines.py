"""The baseline store: format, size, atomic and locked writes, lookup, prune."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import git
import numpy as np
import pytest

from pytest_qmmperf import baselines
from pytest_qmmperf.baselines import BaselineError
from pytest_qmmperf.metrics import BenchResult

KEY = "intel-xeon-processor-2c-8gb-cpu"
OTHER = "apple-m3-max-40c-64gb-metal"


def fingerprint(key: str = KEY, mlx: str = "0.32.4") -> dict[str, object]:
    return {"key": key, "backend": "cpu", "cpu_name": "Intel Xeon", "mlx_version": mlx}


def result(name: str, median: float = 1e-3, n: int = 200, seed: int = 0, **params: object
           ) -> BenchResult:
    rng = np.random.default_rng(seed)
    t = list(rng.lognormal(math.log(median), 0.03, n))
    flops, nbytes = 2 * 512 * 8192 * 3072, 30e6
    return BenchResult(
        name=name,
        kind="qmm",
        params={"M": 512, "N": 8192, "K": 3072, "bits": 4, "group_size": 64, "mode": "affine",
                "transpose": True, "dtype": "float16", "variant": "mlx", **params},
        samples={
            "time_s": t,
            "tflops": [flops / x / 1e12 for x in t],
            "gbps": [nbytes / x / 1e9 for x in t],
            "roofline_pct": [37.0 * 1e-3 / x for x in t],
            "peak_memory_gb": [0.1234567] * n,
            "cold_start_s": [0.5],
        },
        info={"launches": 32},
    )


def revision_of(sha: str, date: str = "2025-01-02T03:04:05+00:00") -> dict[str, object]:
    return {"sha": sha, "date": date, "subject": "tune QMM", "detached": False, "dirty": False}


SHA = "1" * 40


def make(results: list[BenchResult], sha: str = SHA, key: str = KEY, mlx: str = "0.32.4",
         date: str = "2025-01-02T03:04:05+00:00") -> baselines.Baseline:
    return baselines.new_baseline(results, hardware=fingerprint(key, mlx),
                                  revision=revision_of(sha, date),
                                  reference=list(np.linspace(6e-3, 7e-3, 50)),
                                  reference_workload="matmul 256x256 float32", tool="test")


# --- format -------------------------------------------------------------------


def test_round_trip_keeps_params_compacted_samples_and_summaries(tmp_path: Path) -> None:
    b = make([result("tests/test_a.py::test_up", seed=1, shape=(1, 2))])
    saved = baselines.save(tmp_path, b)
    assert saved.path == tmp_path / KEY / f"{SHA}.json"
    back = baselines.load(saved.path)
    e = back.entries["tests/test_a.py::test_up"]
    assert e.params["shape"] == [1, 2]  # as JSON reads it back, so params compare equal
    assert set(e.samples) == {"time_s", "peak_memory_gb"}  # gated metrics keep samples
    assert set(e.summary) == {"time_s", "tflops", "gbps", "roofline_pct", "peak_memory_gb",
                              "cold_start_s"}
    assert len(e.samples["time_s"]) == baselines.MAX_SAMPLES
    assert e.samples["time_s"] == sorted(e.samples["time_s"])
    assert e.summary["time_s"]["n"] == 200
    assert e.median("time_s") == pytest.approx(1e-3, rel=0.01)
    assert e.median("tflops") == pytest.approx(2 * 512 * 8192 * 3072 / 1e-3 / 1e12, rel=0.01)
    assert back.revision["sha"] == SHA and back.mlx_version == "0.32.4"
    assert back.reference == pytest.approx(b.reference) and len(back.reference) == 32
    assert back.reference_workload == "matmul 256x256 float32"
    text = saved.path.read_text()
    assert text.count("\n") >= 3 and json.loads(text)["schema_version"] == 1


def test_hundred_benchmark_file_stays_under_100_kb(tmp_path: Path) -> None:
    results = [result(f"benchmarks/test_suite.py::test_qmm[M{m}-{shape}-{variant}]",
                      median=1e-4 * (1 + i), n=400, seed=i)
               for i, (m, shape, variant) in enumerate(
                   (m, s, v) for m in (1, 16, 128, 512, 2048) for s in range(10)
                   for v in ("mlx", "dequant"))]
    assert len(results) == 100
    saved = baselines.save(tmp_path, make(results))
    size = saved.path.stat().st_size
    assert size < 100_000, size
    assert len(baselines.load(saved.path).entries) == 100


# --- loud failures ------------------------------------------------------------


def saved_file(tmp_path: Path) -> Path:
    return baselines.save(tmp_path, make([result("t")])).path


def test_truncated_file_fails_loudly_with_path_and_fix(tmp_path: Path) -> None:
    path = saved_file(tmp_path)
    path.write_text(path.read_text()[:200])
    with pytest.raises(BaselineError) as info:
        baselines.load(path)
    msg = str(info.value)
    assert str(path) in msg and "truncated or corrupt" in msg
    assert "git checkout --" in msg and "qmmperf baseline update" in msg
    assert "\n" not in msg


def test_future_schema_asks_for_an_upgrade(tmp_path: Path) -> None:
    path = saved_file(tmp_path)
    data = json.loads(path.read_text())
    data["schema_version"] = 7
    path.write_text(json.dumps(data))
    with pytest.raises(BaselineError, match=r"schema version 7 is newer .*pip install -U"):
        baselines.load(path)


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda d: d.pop("benchmarks"), "missing field 'benchmarks'"),
        (lambda d: d["benchmarks"][0]["samples"].update(time_s=["x"]), "list of finite numbers"),
        (lambda d: d["revision"].update(sha="abc"), "full 40-digit"),
        (lambda d: d.update(schema_version="1"), "unknown schema version '1'"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path: Path, edit, says: str) -> None:
    path = saved_file(tmp_path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(BaselineError, match=says):
        baselines.load(path)


def test_misplaced_file_is_refused(tmp_path: Path) -> None:
    path = saved_file(tmp_path)
    moved = tmp_path / OTHER / path.name
    moved.parent.mkdir()
    path.rename(moved)
    with pytest.raises(BaselineError, match="but its path says"):
        baselines.load(moved)


@pytest.mark.parametrize("key", ["Apple M3", "../etc", ""])
def test_bad_keys_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(BaselineError, match="hardware key"):
        baselines.path_for(tmp_path, key, SHA)


# --- writing ------------------------------------------------------------------


def test_save_never_touches_another_keys_files(tmp_path: Path) -> None:
    other = baselines.save(tmp_path, make([result("t")], key=OTHER)).path
    before = (other.read_bytes(), other.stat().st_mtime_ns)
    baselines.save(tmp_path, make([result("t", seed=5)]))
    assert (other.read_bytes(), other.stat().st_mtime_ns) == before
    assert sorted(p.name for p in (tmp_path / OTHER).iterdir()) == [other.name]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = saved_file(tmp_path)
    before = path.read_bytes()

    def disk_full(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(BaselineError, match="cannot write .*nothing was changed"):
        baselines.save(tmp_path, make([result("u")]))
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == [path.name]


def test_saving_twice_at_one_commit_merges(tmp_path: Path) -> None:
    baselines.save(tmp_path, make([result("a", seed=1), result("b", seed=2)]))
    saved = baselines.save(tmp_path, make([result("b", median=2e-3, seed=3), result("c")]))
    assert saved.kept == 1 and not saved.replaced
    entries = baselines.load(saved.path).entries
    assert sorted(entries) == ["a", "b", "c"]
    assert entries["b"].median("time_s") == pytest.approx(2e-3, rel=0.02)  # newest wins


def test_saving_with_another_mlx_version_replaces(tmp_path: Path) -> None:
    baselines.save(tmp_path, make([result("a")], mlx="0.31.0"))
    saved = baselines.save(tmp_path, make([result("b")]))
    assert saved.replaced
    assert sorted(baselines.load(saved.path).entries) == ["b"]


def test_unreadable_existing_file_stops_the_save(tmp_path: Path) -> None:
    path = saved_file(tmp_path)
    path.write_text("{")
    with pytest.raises(BaselineError, match="truncated or corrupt"):
        baselines.save(tmp_path, make([result("x")]))
    assert path.read_text() == "{"


def test_concurrent_saves_all_land_in_one_valid_file(tmp_path: Path) -> None:
    # Six processes save different benchmarks at the same commit at the same moment.
    script = textwrap.dedent(f"""
        import math, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_baselines import make, result
        from pytest_qmmperf import baselines
        go = float(sys.argv[2])
        while time.time() < go:
            pass
        results = [result(f"p{{sys.argv[1]}}-{{i}}", seed=i) for i in range(30)]
        baselines.save(Path({str(tmp_path)!r}), make(results))
    """)
    import time

    go = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i), str(go)])
             for i in range(6)]
    assert [p.wait(timeout=60) for p in procs] == [0] * 6
    entries = baselines.load(tmp_path / KEY / f"{SHA}.json").entries
    assert len(entries) == 180
    assert sorted(os.listdir(tmp_path / KEY)) == [f"{SHA}.json"]  # no temporaries left


# --- lookup and prune in real repositories ------------------------------------


def git_commit(repo: git.Repo, msg: str, when: int, files: dict[str, str] | None = None) -> str:
    root = Path(repo.working_tree_dir)
    for name, text in (files or {"src.py": msg}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
        repo.index.add([name])
    date = f"{when} +0000"
    return repo.index.commit(msg, author_date=date, commit_date=date).hexsha


@pytest.fixture
def repo(tmp_path: Path) -> git.Repo:
    r = git.Repo.init(tmp_path / "repo", initial_branch="main")
    with r.config_writer() as cw:
        cw.set_value("user", "name", "Test")
        cw.set_value("user", "email", "test@example.com")
    return r


def record(repo: git.Repo, sha: str, median: float = 1e-3, key: str = KEY,
           date: str | None = None) -> Path:
    root = Path(repo.working_tree_dir) / "baselines"
    when = date or repo.commit(sha).committed_datetime.isoformat()
    return baselines.save(root, make([result("t", median=median)], sha=sha, key=key,
                                     date=when)).path


def test_find_nearest_ancestor_in_the_work_tree(repo: git.Repo) -> None:
    a = git_commit(repo, "a", 1700000000)
    record(repo, a)
    git_commit(repo, "b", 1700000100)
    c = git_commit(repo, "c", 1700000200)
    root = Path(repo.working_tree_dir) / "baselines"
    look = baselines.find(repo, root, KEY)
    assert look.found is not None
    assert (look.found.sha, look.found.distance, look.start.sha) == (a, 2, c)
    assert look.found.source.endswith(f"{KEY}/{a}.json")


def test_find_with_rev_reads_the_revs_tree_not_the_work_tree(repo: git.Repo) -> None:
    a = git_commit(repo, "a", 1700000000)
    path = record(repo, a, median=1e-3)
    rel = path.relative_to(repo.working_tree_dir).as_posix()
    b = git_commit(repo, "record baseline", 1700000100, {rel: path.read_text()})
    # A change edits the baseline in its work tree to hide a slowdown.
    record(repo, a, median=5e-3)
    root = Path(repo.working_tree_dir) / "baselines"
    work = baselines.find(repo, root, KEY).found
    assert work is not None and work.baseline.entries["t"].median("time_s") == pytest.approx(
        5e-3, rel=0.02)
    main = baselines.find(repo, root, KEY, "main").found
    assert main is not None and main.sha == a and "at main" in main.source
    assert main.baseline.entries["t"].median("time_s") == pytest.approx(1e-3, rel=0.02)
    assert baselines.find(repo, root, KEY, b[:7]).found is not None


def test_find_says_how_to_record_when_only_other_hardware_has_one(repo: git.Repo) -> None:
    a = git_commit(repo, "a", 1700000000)
    record(repo, a, key=OTHER)
    look = baselines.find(repo, Path(repo.working_tree_dir) / "baselines", KEY)
    assert look.found is None
    assert f"no baseline for this hardware ({KEY})" in look.message
    assert OTHER in look.message and "qmmperf baseline update" in look.message


def test_find_on_another_branch_only(repo: git.Repo) -> None:
    a = git_commit(repo, "a", 1700000000)
    repo.create_head("side", a).checkout()
    s = git_commit(repo, "s", 1700000100)
    record(repo, s)
    repo.heads.main.checkout()
    git_commit(repo, "m", 1700000200)
    look = baselines.find(repo, Path(repo.working_tree_dir) / "baselines", KEY)
    assert look.found is None and "recorded on other branches" in look.message


def test_find_in_a_shallow_clone_says_fetch_depth_0(repo: git.Repo, tmp_path: Path) -> None:
    a = git_commit(repo, "a", 1700000000)
    path = record(repo, a)
    rel = path.relative_to(repo.working_tree_dir).as_posix()
    git_commit(repo, "record", 1700000100, {rel: path.read_text()})
    git_commit(repo, "later", 1700000200)
    clone = git.Repo.clone_from(f"file://{repo.working_tree_dir}", tmp_path / "ci", depth=1)
    look = baselines.find(clone, Path(clone.working_tree_dir) / "baselines", KEY)
    assert look.found is None
    assert "shallow" in look.message and "fetch-depth: 0" in look.message


def test_find_fails_loudly_on_a_corrupt_nearest_file(repo: git.Repo) -> None:
    a = git_commit(repo, "a", 1700000000)
    record(repo, a).write_text('{"schema_version": 1, "hardw')
    with pytest.raises(BaselineError, match="truncated or corrupt"):
        baselines.find(repo, Path(repo.working_tree_dir) / "baselines", KEY)


def test_prune_keeps_newest_and_never_what_head_or_rev_resolve_to(repo: git.Repo) -> None:
    shas = [git_commit(repo, f"c{i}", 1700000000 + 100 * i) for i in range(5)]
    for sha in shas:
        record(repo, sha)
    record(repo, shas[0], key=OTHER)
    root = Path(repo.working_tree_dir) / "baselines"
    repo.create_tag("release", ref=shas[0])
    repo.git.checkout(shas[2])  # HEAD (detached) resolves to c2's baseline
    dry = baselines.prune(repo, root, 1, protect_revs=["HEAD", "release"], key=KEY,
                          dry_run=True)
    assert sorted(p.stem for p in dry.removed) == sorted([shas[1], shas[3]])
    assert len(baselines.shas(root, KEY)) == 5  # dry run deletes nothing
    done = baselines.prune(repo, root, 1, protect_revs=["HEAD", "release"])
    assert baselines.shas(root, KEY) == {shas[4], shas[2], shas[0]}
    assert sorted(p.stem for p in done.protected) == sorted([shas[0], shas[2]])
    assert baselines.shas(root, OTHER) == {shas[0]}  # keeps its newest (and only) one
    nothing_left = baselines.prune(repo, root, 0, protect_revs=["HEAD"], key=KEY)
    assert baselines.shas(root, KEY) == {shas[2]}
    assert len(nothing_left.removed) == 2


def test_prune_rejects_bad_input(repo: git.Repo) -> None:
    git_commit(repo, "a", 1700000000)
    root = Path(repo.working_tree_dir) / "baselines"
    with pytest.raises(BaselineError, match="--keep -1"):
        baselines.prune(repo, root, -1)
    from pytest_qmmperf.revision import RevisionError

    with pytest.raises(RevisionError, match="--rev 'nope'"):
        baselines.prune(repo, root, 1, protect_revs=["nope"])


# --- the qmmperf baseline commands --------------------------------------------


def test_cli_show_lists_baselines_and_marks_heads(repo: git.Repo, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_qmmperf import cli

    a = git_commit(repo, "first", 1700000000)
    record(repo, a)
    b = git_commit(repo, "second", 1700000100)
    record(repo, b)
    record(repo, a, key=OTHER)
    git_commit(repo, "third", 1700000200)
    monkeypatch.chdir(repo.working_tree_dir)
    assert cli.main(["baseline", "show", "--hardware", KEY]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{KEY}: 2 baselines in ")
    assert out[1].startswith(f"  {b[:10]}  2023-11-14T22:15    1 benchmarks  MLX 0.32.4  tune QMM")
    assert out[1].endswith("<- HEAD compares with this (1 commits back)")
    assert out[2].startswith(f"  {a[:10]}") and "<-" not in out[2]
    assert out[3] == f"other hardware: {OTHER}"
    assert cli.main(["baseline", "show", "--hardware", KEY, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["head_baseline"] == b and [x["sha"] for x in data["baselines"]] == [b, a]


def test_cli_show_reads_the_folder_from_pyproject(repo: git.Repo, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_qmmperf import cli

    root = Path(repo.working_tree_dir)
    (root / "pyproject.toml").write_text('[tool.pytest.ini_options]\nqmm_baseline_dir = "perf"\n')
    a = git_commit(repo, "first", 1700000000)
    baselines.save(root / "perf", make([result("t")], sha=a))
    monkeypatch.chdir(root)
    assert cli.main(["baseline", "show", "--hardware", KEY]) == 0
    assert f"1 baseline in {root / 'perf' / KEY}" in capsys.readouterr().out


def test_cli_prune(repo: git.Repo, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_qmmperf import cli

    shas = [git_commit(repo, f"c{i}", 1700000000 + 100 * i) for i in range(4)]
    for sha in shas:
        record(repo, sha)
    root = Path(repo.working_tree_dir) / "baselines"
    monkeypatch.chdir(repo.working_tree_dir)
    assert cli.main(["baseline", "prune", "--keep", "1", "--rev", shas[1], "--dry-run"]) == 0
    assert "would remove 2, kept 2" in capsys.readouterr().out
    assert len(baselines.shas(root, KEY)) == 4
    assert cli.main(["baseline", "prune", "--keep", "1", "--rev", shas[1]]) == 0
    assert "removed 2, kept 2; commit the deletions" in capsys.readouterr().out
    assert baselines.shas(root, KEY) == {shas[3], shas[1]}
    assert cli.main(["baseline", "prune", "--keep", "1", "--rev", "nope"]) == 2
    assert "--rev 'nope': no such revision" in capsys.readouterr().err
