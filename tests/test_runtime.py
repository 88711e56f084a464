"""The Explainer: agrees with torch autograd, chunks batches, resolves and checks targets, and
refuses bad batches with clear errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

import rectonnx
from rectonnx.converters.pytorch import export


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(6 * 4 * 4, 4)).double().eval()
    proto = export(net.float(), torch.randn(1, 3, 8, 8))
    return net.double(), proto


def torch_gradient(net, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    xx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    scores = net(xx)
    (grad,) = torch.autograd.grad(scores.gather(1, torch.tensor(target)[:, None]).sum(), xx)
    return grad.numpy()


def test_saliency_matches_autograd_and_chunking_changes_nothing(small_net):
    net, proto = small_net
    x = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    whole = rectonnx.Explainer(proto, "saliency", batch_size=32).explain(x, [0, 1, 2, 3, -1])
    chunked = rectonnx.Explainer(proto, "saliency", batch_size=2).explain(x, [0, 1, 2, 3, -1])
    expected = torch_gradient(net, x, whole.target)
    assert np.abs(whole.attribution - expected).max() <= 1e-4 * np.abs(expected).max()
    np.testing.assert_allclose(chunked.attribution, whole.attribution, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(chunked.target, whole.target)


def test_targets_int_list_and_negative(small_net):
    _, proto = small_net
    explainer = rectonnx.Explainer(proto, "grad_input")
    x = np.random.default_rng(2).standard_normal((3, 3, 8, 8)).astype(np.float32)
    predicted = explainer.explain(x).target
    np.testing.assert_array_equal(predicted, explainer.explain(x).logits.argmax(1))
    np.testing.assert_array_equal(explainer.explain(x, 2).target, [2, 2, 2])
    mixed = explainer.explain(x, [1, -1, 3])
    np.testing.assert_array_equal(mixed.target, [1, predicted[1], 3])
    # each sample's map depends only on its own target
    alone = explainer.explain(x[1:2], [3]).attribution
    np.testing.assert_allclose(explainer.explain(x, [0, 3, 0]).attribution[1:2], alone,
                               atol=1e-6)


@pytest.mark.parametrize("batch, message", [
    (np.zeros((2, 3, 8, 9), np.float32), "expects [N, 3, 8, 8]"),
    (np.zeros((3, 8, 8), np.float32), "pass a batch"),
    (np.zeros((2, 3, 8, 8), np.uint8), "integer dtype"),
    (np.array([["a"]]), "dtype"),
])
def test_bad_batches_are_refused(small_net, batch, message):
    explainer = rectonnx.Explainer(small_net[1], "saliency")
    with pytest.raises(rectonnx.InputError, match=message.replace("[", r"\[")):
        explainer.explain(batch)


def test_bad_values_and_targets_are_refused(small_net):
    explainer = rectonnx.Explainer(small_net[1], "saliency")
    x = np.zeros((2, 3, 8, 8), np.float32)
    with pytest.raises(rectonnx.InputError, match="out of range"):
        explainer.explain(x, [0, 4])
    with pytest.raises(rectonnx.InputError, match=r"expected \[2\]"):
        explainer.explain(x, [0, 1, 2])
    with pytest.raises(rectonnx.InputError, match="integer class"):
        explainer.explain(x, [0.5, 1])
    x[1, 0, 0, 0] = np.inf
    with pytest.raises(rectonnx.InputError, match=r"samples \[1\]"):
        explainer.explain(x)


def test_empty_batch_and_float64_input(small_net):
    explainer = rectonnx.Explainer(small_net[1], "saliency")
    empty = explainer.explain(np.zeros((0, 3, 8, 8), np.float32))
    assert empty.attribution.shape == (0, 3, 8, 8) and empty.logits.shape == (0, 4)
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8))
    np.testing.assert_allclose(explainer.explain(x).attribution,
                               explainer.explain(x.astype(np.float32)).attribution)


def test_fixed_batch_model_runs_any_batch_by_padding_chunks():
    weight = np.random.default_rng(4).standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "fixed",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
        [onnx.numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    explainer = rectonnx.Explainer(model, "saliency")
    result = explainer.explain(np.ones((3, 4), np.float32), [0, 1, 2])
    np.testing.assert_allclose(result.attribution, weight.T, rtol=1e-6)


# -- finding CUDA ---------------------------------------------------------------------------------
@pytest.fixture
def fake_cuda_build(monkeypatch, tmp_path):
    """onnxruntime that lists the CUDA provider and whose provider library exists on disk."""
    import onnxruntime as ort

    import rectonnx.runtime as runtime

    capi = tmp_path / "onnxruntime" / "capi"
    capi.mkdir(parents=True)
    (capi / "libonnxruntime_providers_cuda.so").write_bytes(b"")
    monkeypatch.setattr(ort, "__file__", str(tmp_path / "onnxruntime" / "__init__.py"))
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    runtime.cuda_usable.cache_clear()
    yield ort, runtime
    runtime.cuda_usable.cache_clear()


@pytest.mark.parametrize("preload_finds_cuda", [True, False])
def test_cuda_from_python_packages_is_found_by_preloading_quietly(fake_cuda_build, monkeypatch,
                                                                   capsys, preload_finds_cuda):
    """CUDA libraries from pip packages load only after onnxruntime's preload_dlls; its
    messages about each library it misses are not shown."""
    ort, runtime = fake_cuda_build
    state = {"preloaded": False}

    def preload():
        print("Failed to load libcublasLt.so.13")  # what onnxruntime prints for each miss
        state["preloaded"] = preload_finds_cuda

    monkeypatch.setattr(ort, "preload_dlls", preload, raising=False)
    monkeypatch.setattr(runtime, "_loads", lambda library: state["preloaded"])
    assert runtime.cuda_usable() is preload_finds_cuda
    assert runtime.default_providers()[0] == ("CUDAExecutionProvider" if preload_finds_cuda
                                              else "CPUExecutionProvider")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_cuda_check_survives_a_failing_or_missing_preload(fake_cuda_build, monkeypatch):
    ort, runtime = fake_cuda_build
    monkeypatch.setattr(runtime, "_loads", lambda library: False)

    def broken():
        raise RuntimeError("Invalid parameter of directory")

    monkeypatch.setattr(ort, "preload_dlls", broken, raising=False)
    assert runtime.cuda_usable() is False
    runtime.cuda_usable.cache_clear()
    monkeypatch.delattr(ort, "preload_dlls", raising=False)  # onnxruntime < 1.21
    assert runtime.cuda_usable() is False


def test_cuda_check_is_false_and_silent_on_this_machine_without_a_gpu(capsys):
    """Where no CUDA driver is present (CI), the check says so without printing anything."""
    import rectonnx.runtime as runtime

    runtime.cuda_usable.cache_clear()
    try:
        import ctypes
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("a CUDA driver is present here")
    except OSError:
        pass
    assert runtime.cuda_usable() is False
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
