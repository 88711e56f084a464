"""Half-precision models (normalize.upcast_half_precision): a ``.half()`` PyTorch model exported
to ONNX is explained in float32 with its float16 weights upcast, so the explainer equals torch
autograd of the same net in float32 with those weights; its map stays close to the map of the
float32 model it was made from (the weights' rounding is the only difference)."""

from __future__ import annotations

import io

import numpy as np
import onnx
import torch
from click.testing import CliRunner
from torch import nn

from helpers import assert_close, run_explainer, torch_gradient
from rectonnx.artifact import read_stamp
from rectonnx.cli import main

import rectonnx


def half_model(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    x = torch.randn(3, 3, 8, 8)
    full = io.BytesIO()
    torch.onnx.export(net, (x,), full, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}})
    half = io.BytesIO()
    torch.onnx.export(net.half(), (x.half(),), half, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}})
    assert onnx.load_from_string(half.getvalue()).graph.input[0].type.tensor_type.elem_type == \
        onnx.TensorProto.FLOAT16
    return net.float(), x.numpy(), full.getvalue(), half.getvalue()


def test_a_float16_model_is_explained_in_float32_with_its_weights():
    upcast_net, x, _, half = half_model()
    graph = rectonnx.rewrite(half, "saliency")
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert read_stamp(graph).upcast_from == "float16"
    x16 = x.astype(np.float16).astype(np.float32)  # the values an fp16 caller can send
    logits, attribution = run_explainer(graph, x16, [0, 1, -1])
    expected_logits, expected = torch_gradient(upcast_net, x16, [0, 1, -1])
    assert_close(logits, expected_logits, "float16 model: logits vs upcast torch")
    assert_close(attribution, expected, "float16 model: saliency vs upcast torch")
    result = rectonnx.Explainer(half, "rectgrad").explain(x.astype(np.float16))
    assert result.attribution.dtype == np.float32 and (result.attribution >= 0).all()
    assert result.attribution.any()


def test_the_float16_map_stays_close_to_the_float32_models():
    _, x, full, half = half_model(1)
    for method in ("saliency", "rectgrad"):
        maps = [run_explainer(rectonnx.rewrite(model, method, q=90.0) if method == "rectgrad"
                              else rectonnx.rewrite(model, method), x, [0, 1, 2])[1]
                for model in (full, half)]
        cosine = float(maps[0].ravel() @ maps[1].ravel() /
                       (np.linalg.norm(maps[0]) * np.linalg.norm(maps[1])))
        assert cosine > 0.99, (method, cosine)


def test_info_says_an_explainer_computes_in_float32(tmp_path):
    _, _, _, half = half_model()
    path = tmp_path / "explainer.onnx"
    onnx.save(rectonnx.rewrite(half, "saliency"), str(path))
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0 and "the source model is float16" in result.output
