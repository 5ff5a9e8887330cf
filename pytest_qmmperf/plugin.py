"""pytest hooks of pytest-qmmperf: options, markers, session state, summary.

Hooks stay thin: state lives in a :class:`~pytest_qmmperf.session.QmmSession`
under one stash key, created in ``pytest_configure`` and removed in
``pytest_unconfigure`` (so in-process ``pytester`` runs stay isolated).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from pytest_qmmperf import options as _options
from pytest_qmmperf.fixture import QmmBench
from pytest_qmmperf.session import QmmSession

session_key = pytest.StashKey[QmmSession]()


def pytest_addoption(parser: pytest.Parser) -> None:
    _options.add_options(parser)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_qmmperf import hooks

    pluginmanager.add_hookspecs(hooks)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "qmm_threshold(**metrics): per-test regression tolerances, e.g. "
        "@pytest.mark.qmm_threshold(ttft_s='3%')",
    )
    options = _options.resolve(config)
    if options.enabled:
        # Timing needs MLX: say which extra to install before anything runs.
        from pytest_qmmperf.hardware import BackendError, backend_name, import_mlx
        from pytest_qmmperf.timing import prefer_stream_order

        try:
            mx = import_mlx()
        except BackendError as exc:
            raise pytest.UsageError(f"--qmm-bench: {exc}") from None
        # Launches must run one after another; see pytest_qmmperf.timing.
        prefer_stream_order(backend_name(mx))
    state = QmmSession(config, options)
    config.stash[session_key] = state
    from pytest_qmmperf import variants

    def register(*args: Any, **kwargs: Any) -> variants.Variant:
        registered = variants.register_variant(*args, **kwargs)
        state.hook_variants.append(registered.name)
        return registered

    config.hook.pytest_qmmperf_register_variants.call_historic(kwargs={"register": register})


def pytest_unconfigure(config: pytest.Config) -> None:
    if session_key in config.stash:
        from pytest_qmmperf import variants

        for name in config.stash[session_key].hook_variants:
            variants.unregister_variant(name)
        del config.stash[session_key]


def get_session(config: pytest.Config) -> QmmSession:
    """The plugin's state for this pytest session."""
    return config.stash[session_key]


@pytest.fixture
def qmm_bench(request: pytest.FixtureRequest) -> Generator[QmmBench, None, None]:
    """Benchmark one QMM, model prefill or MLX callable (times it with --qmm-bench)."""
    state = get_session(request.config)
    state.before_benchmark()  # reference workload burst, for machine drift
    yield QmmBench(request, state)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Bad qmm_threshold markers fail before any benchmark runs.
    if session_key in config.stash:
        get_session(config).check_markers(items)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]
                                         ) -> None:
    if session_key not in config.stash:
        return
    from pytest_qmmperf.hardware import BackendError

    try:
        fp = get_session(config).fingerprint()
    except BackendError:  # reported by the tests themselves; machine info stays as it is
        return
    machine_info["qmmperf_hardware_key"] = fp.get("key")
    machine_info["qmmperf_fingerprint"] = fp


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config
                            ) -> None:
    if session_key in config.stash:
        get_session(config).terminal_summary(terminalreporter)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session_key in session.config.stash:
        get_session(session.config).finish(session)
