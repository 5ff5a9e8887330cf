"""Git revisions through GitPython: HEAD, dirty state, ancestors, files in other trees.

No pytest, no MLX.  Every failure is a :class:`RevisionError` whose message
is one line naming the input and what to do.

Decisions worth knowing:

* **Dirty** means a change git would commit: a staged or unstaged change to
  a tracked file, or an untracked file git does not ignore (a new test file
  changes what is measured as surely as an edit does).  Two kinds of
  untracked file are exempt: anything inside the baseline folder (freshly
  recorded baselines waiting to be committed) and Python's bytecode caches
  (``__pycache__``, ``*.pyc``), which the run itself writes.
* **Detached HEAD** (what CI checkouts usually are) is fine: the baseline is
  keyed by the commit, not the branch.  Saving says that HEAD is detached.
* **Shallow clones** are detected so that "no baseline in reach" can say
  that history was cut short and how to fetch it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import git


class RevisionError(RuntimeError):
    """A git problem, described in one actionable line."""


@dataclass(frozen=True)
class Revision:
    """One commit: full ``sha``, ISO-8601 committer ``date``, ``subject`` line.

    ``detached`` and ``branch`` describe HEAD when this revision is HEAD.
    """

    sha: str
    date: str
    subject: str
    detached: bool = False
    branch: str | None = None

    @property
    def short(self) -> str:
        """The first ten hex digits."""
        return self.sha[:10]

    def as_dict(self) -> dict[str, object]:
        """Plain data for a baseline file or report."""
        return {
            "sha": self.sha,
            "date": self.date,
            "subject": self.subject,
            "detached": self.detached,
            "branch": self.branch,
        }


def open_repo(path: str | os.PathLike[str],
              why: str = "baselines are keyed by commit, so run from a git checkout (or "
                         "`git init` and commit first)") -> git.Repo:
    """The git repository containing ``path`` (searching parent folders).

    ``why`` ends the error message: what the caller needed the history for.
    """
    try:
        return git.Repo(path, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise RevisionError(f"{path}: not inside a git repository; {why}") from None


def _revision(commit: git.Commit, *, detached: bool = False, branch: str | None = None) -> Revision:
    return Revision(
        sha=commit.hexsha,
        date=commit.committed_datetime.isoformat(),
        subject=commit.summary if isinstance(commit.summary, str) else commit.summary.decode(),
        detached=detached,
        branch=branch,
    )


def head(repo: git.Repo) -> Revision:
    """HEAD's revision; ``RevisionError`` in a repository without commits."""
    try:
        commit = repo.head.commit
    except ValueError:
        raise RevisionError(
            f"{repo.working_tree_dir}: the repository has no commits yet; commit first, since "
            "baselines are keyed by commit"
        ) from None
    detached = repo.head.is_detached
    branch = None if detached else repo.active_branch.name
    return _revision(commit, detached=detached, branch=branch)


def resolve(repo: git.Repo, rev: str, what: str = "--qmm-baseline-rev") -> Revision:
    """The commit ``rev`` names: a sha (full or short), branch, tag, ``origin/main``, ``HEAD~2``.

    ``what`` names the option ``rev`` came from, for the error message.
    """
    try:
        # rev-parse --verify checks the object exists; repo.commit() takes any 40-digit sha
        # on trust and fails later, far from the option that named it.
        sha = repo.git.rev_parse("--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
        commit = repo.commit(sha.strip())
    except (git.GitCommandError, git.BadName, git.BadObject, ValueError):
        raise RevisionError(
            f"{what} {rev!r}: no such revision in {repo.working_tree_dir}; give a "
            "commit sha, branch, tag or remote branch such as origin/main (fetch it first)"
        ) from None
    return _revision(commit)


def is_shallow(repo: git.Repo) -> bool:
    """Whether this is a shallow clone (history cut off at some depth)."""
    return repo.git.rev_parse("--is-shallow-repository").strip() == "true"


def _exempt(path: str, exclude: Iterable[str]) -> bool:
    parts = PurePosixPath(path).parts
    if "__pycache__" in parts or path.endswith((".pyc", ".pyo")):
        return True
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in exclude)


def dirty_paths(repo: git.Repo, exclude: Iterable[str] = ()) -> list[str]:
    """Paths that make the work tree differ from HEAD (see the module docstring).

    ``exclude`` holds repository-relative folders whose *untracked* files are
    ignored (the baseline folder); a change to a tracked file there still
    counts.  Entries look like ``git status --short``: ``" M src/x.py"``.
    """
    excluded = [str(PurePosixPath(d)) for d in exclude]
    out = repo.git.status("--porcelain=v1", "-z", "--untracked-files=all")
    entries = out.split("\0")
    found: list[str] = []
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        code, path = entry[:2], entry[3:]
        if code[0] in "RC":
            i += 1  # the rename's source path follows as its own entry
        if code == "??" and _exempt(path, excluded):
            continue
        if code == "!!":
            continue
        found.append(f"{code} {path}")
    return found


def repo_relative(repo: git.Repo, path: str | os.PathLike[str]) -> str:
    """``path`` relative to the repository root, in POSIX form; error if outside it."""
    root = Path(str(repo.working_tree_dir)).resolve()
    target = Path(path).resolve()
    try:
        return target.relative_to(root).as_posix()
    except ValueError:
        raise RevisionError(
            f"{path}: outside the git repository at {root}; keep the baseline folder inside it "
            "so baselines are versioned with the code"
        ) from None


def ancestors(repo: git.Repo, sha: str) -> Iterator[str]:
    """``sha`` and its ancestors, nearest first, streamed from one ``git rev-list``."""
    for commit in repo.iter_commits(sha):
        yield commit.hexsha


def nearest(repo: git.Repo, start: str, candidates: set[str]) -> tuple[str, int] | None:
    """The first of ``start``'s ancestors (itself included) in ``candidates``.

    Returns ``(sha, distance)``, distance being how many commits were passed
    on the way (0: ``start`` itself), or ``None``.  Stops reading history at
    the first hit, so a long history costs nothing when a baseline is near.
    """
    if not candidates:
        return None
    for distance, sha in enumerate(ancestors(repo, start)):
        if sha in candidates:
            return sha, distance
    return None


def _tree_item(repo: git.Repo, rev: str, relpath: str) -> git.objects.base.Object | None:
    commit = repo.commit(rev)
    try:
        return commit.tree / relpath if relpath not in ("", ".") else commit.tree
    except KeyError:
        return None


def list_tree(repo: git.Repo, rev: str, reldir: str) -> list[str]:
    """Names of the files directly inside ``reldir`` in ``rev``'s tree (empty if absent)."""
    item = _tree_item(repo, rev, reldir)
    if not isinstance(item, git.Tree):
        return []
    return [blob.name for blob in item.blobs]


def list_tree_dirs(repo: git.Repo, rev: str, reldir: str) -> list[str]:
    """Names of the folders directly inside ``reldir`` in ``rev``'s tree (empty if absent)."""
    item = _tree_item(repo, rev, reldir)
    if not isinstance(item, git.Tree):
        return []
    return [tree.name for tree in item.trees]


def read_blob(repo: git.Repo, rev: str, relpath: str) -> bytes | None:
    """Contents of ``relpath`` in ``rev``'s tree (not the work tree), or ``None`` if absent."""
    item = _tree_item(repo, rev, relpath)
    if not isinstance(item, git.Blob):
        return None
    return item.data_stream.read()
