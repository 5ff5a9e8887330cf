"""Git revision handling, on real repositories made in tmp_path with GitPython."""

from __future__ import annotations

import subprocess
from pathlib import Path

import git
import pytest

from pytest_qmmperf import revision
from pytest_qmmperf.revision import RevisionError


def commit(repo: git.Repo, name: str, text: str, when: int) -> str:
    """Write ``name``, stage it and commit with a fixed date ``when`` (Unix seconds)."""
    path = Path(repo.working_tree_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    repo.index.add([name])
    date = f"{when} +0000"
    return repo.index.commit(f"change {name}: {text[:20]}", author_date=date,
                             commit_date=date).hexsha


@pytest.fixture
def repo(tmp_path: Path) -> git.Repo:
    r = git.Repo.init(tmp_path / "repo", initial_branch="main")
    with r.config_writer() as cw:
        cw.set_value("user", "name", "Test")
        cw.set_value("user", "email", "test@example.com")
    (tmp_path / "repo" / ".gitignore").write_text("*.log\n")
    r.index.add([".gitignore"])
    r.index.commit("ignore logs", author_date="1700000000 +0000", commit_date="1700000000 +0000")
    return r


def test_open_repo_outside_git_says_so(tmp_path: Path) -> None:
    with pytest.raises(RevisionError, match="not inside a git repository") as info:
        revision.open_repo(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_open_repo_from_a_subfolder(repo: git.Repo) -> None:
    sub = Path(repo.working_tree_dir) / "a" / "b"
    sub.mkdir(parents=True)
    assert revision.open_repo(sub).working_tree_dir == repo.working_tree_dir


def test_head_without_commits(tmp_path: Path) -> None:
    empty = git.Repo.init(tmp_path / "empty")
    with pytest.raises(RevisionError, match="no commits yet"):
        revision.head(empty)


def test_head_branch_and_detached(repo: git.Repo) -> None:
    first = repo.head.commit.hexsha
    second = commit(repo, "a.py", "x = 1\n", 1700000100)
    h = revision.head(repo)
    assert (h.sha, h.subject, h.branch, h.detached) == (second, "change a.py: x = 1", "main",
                                                        False)
    assert h.date == "2023-11-14T22:15:00+00:00"
    assert h.short == second[:10]
    repo.git.checkout(first)
    d = revision.head(repo)
    assert d.sha == first and d.detached and d.branch is None


def test_resolve_names(repo: git.Repo, tmp_path: Path) -> None:
    first = repo.head.commit.hexsha
    second = commit(repo, "a.py", "1", 1700000100)
    repo.create_tag("v1", ref=first)
    repo.create_head("feature", first)
    assert revision.resolve(repo, "v1").sha == first
    assert revision.resolve(repo, "feature").sha == first
    assert revision.resolve(repo, second[:8]).sha == second
    assert revision.resolve(repo, "HEAD~1").sha == first
    clone = git.Repo.clone_from(repo.working_tree_dir, tmp_path / "clone")
    assert revision.resolve(clone, "origin/main").sha == second


@pytest.mark.parametrize("bad", ["nope", "origin/main", "0" * 40, "HEAD~5"])
def test_resolve_unknown_is_one_clear_line(repo: git.Repo, bad: str) -> None:
    with pytest.raises(RevisionError) as info:
        revision.resolve(repo, bad)
    msg = str(info.value)
    assert msg.startswith(f"--qmm-baseline-rev {bad!r}: no such revision")
    assert "origin/main" in msg and "\n" not in msg


def test_dirty_paths(repo: git.Repo) -> None:
    root = Path(repo.working_tree_dir)
    commit(repo, "src/k.py", "a = 1\n", 1700000100)
    commit(repo, "baselines/key/x.json", "{}", 1700000200)
    assert revision.dirty_paths(repo, ["baselines"]) == []
    (root / "build.log").write_text("ignored by .gitignore")
    (root / "baselines" / "key" / "new.json").write_text("{}")  # a fresh, uncommitted baseline
    (root / "src" / "__pycache__").mkdir()
    (root / "src" / "__pycache__" / "k.cpython-311.pyc").write_bytes(b"\0")
    assert revision.dirty_paths(repo, ["baselines"]) == []
    (root / "tests_new.py").write_text("def test(): pass\n")
    assert revision.dirty_paths(repo, ["baselines"]) == ["?? tests_new.py"]
    (root / "src" / "k.py").write_text("a = 2\n")
    assert " M src/k.py" in revision.dirty_paths(repo, ["baselines"])
    repo.index.add(["src/k.py"])
    assert "M  src/k.py" in revision.dirty_paths(repo, ["baselines"])
    # A tracked baseline edited in place is a change like any other.
    (root / "baselines" / "key" / "x.json").write_text('{"edited": 1}')
    assert " M baselines/key/x.json" in revision.dirty_paths(repo, ["baselines"])


def test_dirty_paths_rename_counts_once(repo: git.Repo) -> None:
    commit(repo, "old.py", "x\n", 1700000100)
    repo.git.mv("old.py", "new.py")
    assert revision.dirty_paths(repo) == ["R  new.py"]


def test_nearest_ancestor(repo: git.Repo) -> None:
    a = commit(repo, "f", "a", 1700000100)
    b = commit(repo, "f", "b", 1700000200)
    c = commit(repo, "f", "c", 1700000300)
    d = commit(repo, "f", "d", 1700000400)
    assert revision.nearest(repo, d, {b, a}) == (b, 2)
    assert revision.nearest(repo, d, {d}) == (d, 0)
    assert revision.nearest(repo, a, {c}) is None
    assert revision.nearest(repo, d, set()) is None
    side = repo.create_head("side", b)
    side.checkout()
    e = commit(repo, "g", "e", 1700000500)
    assert revision.nearest(repo, e, {c, a}) == (a, 2)  # c is on main only


def test_nearest_over_thousands_of_commits(tmp_path: Path) -> None:
    # 3000 commits via fast-import; the only baseline sits at the root commit.
    root = tmp_path / "long"
    r = git.Repo.init(root, initial_branch="main")
    lines = []
    for i in range(3000):
        msg = f"c{i}".encode()
        lines.append(b"commit refs/heads/main\n")
        lines.append(f"committer T <t@e> {1700000000 + i} +0000\n".encode())
        lines.append(b"data %d\n%s\n" % (len(msg), msg))
        lines.append(b"M 644 inline f\ndata %d\n%d\n" % (len(str(i)) , i))
    subprocess.run(["git", "fast-import", "--quiet"], cwd=root, input=b"".join(lines),
                   check=True)
    r.git.checkout("main")
    first = r.git.rev_list("--max-parents=0", "HEAD").strip()
    head = r.head.commit.hexsha
    assert revision.nearest(r, head, {first}) == (first, 2999)
    assert revision.nearest(r, head, {"f" * 40}) is None


def test_shallow_clone_is_detected(repo: git.Repo, tmp_path: Path) -> None:
    commit(repo, "f", "a", 1700000100)
    commit(repo, "f", "b", 1700000200)
    assert not revision.is_shallow(repo)
    shallow = git.Repo.clone_from(f"file://{repo.working_tree_dir}", tmp_path / "shallow",
                                  depth=1)
    assert revision.is_shallow(shallow)


def test_read_blob_and_list_tree_come_from_the_revision_not_the_work_tree(
    repo: git.Repo,
) -> None:
    root = Path(repo.working_tree_dir)
    a = commit(repo, "baselines/k1/one.json", "committed", 1700000100)
    (root / "baselines" / "k1" / "one.json").write_text("edited in the work tree")
    (root / "baselines" / "k1" / "two.json").write_text("untracked")
    (root / "baselines" / "k2").mkdir()
    assert revision.read_blob(repo, a, "baselines/k1/one.json") == b"committed"
    assert revision.read_blob(repo, a, "baselines/k1/two.json") is None
    assert revision.read_blob(repo, a, "baselines/k1") is None  # a folder, not a file
    assert revision.list_tree(repo, a, "baselines/k1") == ["one.json"]
    assert revision.list_tree(repo, a, "nowhere") == []
    assert revision.list_tree_dirs(repo, a, "baselines") == ["k1"]


def test_repo_relative(repo: git.Repo, tmp_path: Path) -> None:
    root = Path(repo.working_tree_dir)
    assert revision.repo_relative(repo, root / "baselines") == "baselines"
    assert revision.repo_relative(repo, root) == "."
    with pytest.raises(RevisionError, match="outside the git repository"):
        revision.repo_relative(repo, tmp_path / "elsewhere")
