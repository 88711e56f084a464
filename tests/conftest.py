"""Shared pytest set-up: one torch thread, deterministic seeds, a summary of the largest error
each oracle saw (printed at the end of the run, so the numbers in reports come from the tests),
the ``--converters`` option: tests marked ``converters`` need the heavy optional frameworks
(TensorFlow, JAX) and are deselected without it (CI installs them and passes it); and the
``--deployment`` option: the Triton, Ray and OpenVINO tests, which skip when their package is
missing, must run (a missing or broken package fails the run at once)."""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest
import torch

from helpers import ERRORS

torch.set_num_threads(1)

CONVERTER_FRAMEWORKS = ["tensorflow", "keras", "tf2onnx", "jax", "flax", "jax2onnx"]
CONVERTERS_INSTALL = "pip install -e '.[converters]' && pip install --no-deps jax2onnx==0.17.1"
DEPLOYMENT_PACKAGES = ["tritonclient", "ray.data", "openvino"]
DEPLOYMENT_INSTALL = "pip install -e '.[serve,ray,openvino]'"


def pytest_addoption(parser):
    parser.addoption("--converters", action="store_true",
                     help=f"also run the Keras and JAX converter tests ({CONVERTERS_INSTALL})")
    parser.addoption("--deployment", action="store_true",
                     help=f"the Triton, Ray and OpenVINO tests must run ({DEPLOYMENT_INSTALL})")


def pytest_configure(config):
    """With ``--converters``/``--deployment``, a missing package fails the run at once (never a
    skip)."""
    if config.getoption("--deployment"):
        for name in DEPLOYMENT_PACKAGES:
            try:
                importlib.import_module(name)
            except Exception as exc:  # an ImportError, or a package that breaks on import
                raise pytest.UsageError(f"--deployment needs {name} ({exc}): "
                                        f"{DEPLOYMENT_INSTALL}") from exc
        from rectonnx.serve import model_config_schema
        if model_config_schema() is None:
            raise pytest.UsageError("--deployment: tritonclient ships no model_config_pb2")
    if not config.getoption("--converters"):
        return
    missing = [name for name in CONVERTER_FRAMEWORKS if importlib.util.find_spec(name) is None]
    if missing:
        raise pytest.UsageError(f"--converters needs {', '.join(missing)}: {CONVERTERS_INSTALL}")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--converters"):
        return
    heavy = [item for item in items if item.get_closest_marker("converters")]
    if heavy:
        items[:] = [item for item in items if not item.get_closest_marker("converters")]
        config.hook.pytest_deselected(items=heavy)


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
