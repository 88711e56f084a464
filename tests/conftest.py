"""Shared pytest set-up: one torch thread, deterministic seeds, and a summary of the largest error
each oracle saw (printed at the end of the run, so the numbers in reports come from the tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import ERRORS

torch.set_num_threads(1)


@pytest.fixture
def rng():
    """One seeded generator per test (the default seed; extra seeds live under ``slow``)."""
    return np.random.default_rng(0)


def pytest_terminal_summary(terminalreporter):
    if not ERRORS:
        return
    terminalreporter.section("largest relative error per oracle")
    for oracle, (error, where) in sorted(ERRORS.items()):
        terminalreporter.write_line(f"{oracle:<40s} {error:.3e}  ({where})")
