"""Hook specifications that pytest-qmmperf adds to pytest."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.hookspec(historic=True)
def pytest_qmmperf_register_variants(register: Any) -> None:
    """Register QMM variants: call ``register(name, fn, description=...)`` or
    ``register(Variant(...))`` (see :func:`pytest_qmmperf.variants.register_variant`).

    Historic: called once per session for every plugin and conftest.py, including
    those loaded after configure.  Variants registered here are removed at the
    end of the session, so each session registers its own.
    """
