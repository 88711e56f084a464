"""Grad-CAM on the shipped models themselves, against an independent oracle.

The oracle takes the layer's activation ``A`` from onnxruntime (the layer added as an output of
the source model), the gradient of the target score with respect to ``A`` by central
differences in float64 on the model's head (``onnx.utils.Extractor``: the subgraph from the
layer to the scores, run by ``onnx.reference``), then Selvaraju et al.'s formula literally:
``ReLU(sum_c mean_ij(dS/dA_c) A_c)``, upsampled with torch's bilinear ``F.interpolate``
(``align_corners=False``, as Captum's ``LayerAttribution.interpolate``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper

from helpers import Reference, assert_close, fd_gradient, run_explainer, session
from rectonnx.batch import preprocess_for
from rectonnx.images import load_image

import rectonnx

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"paper_cnn_digits": ("digits_*.png", "/9/MaxPool_output_0", 3),
           "efficientnet_lite0": ("chelsea.jpg", "/head/head.2/Clip_output_0", 1)}


def with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy


def head_gradient(model, layer, logits_name, activation, target) -> np.ndarray:
    """dS/dA: central differences on the head subgraph, or, for EfficientNet's head
    (GlobalAveragePool -> Flatten -> Gemm, too many elements for central differences), the
    formula of that linear head: ``W[target, c] / (H W)`` at every position."""
    ops = [n.op_type for n in model.graph.node[-3:]]
    if ops == ["GlobalAveragePool", "Flatten", "Gemm"] and \
            model.graph.node[-3].input[0] == layer:
        gemm = model.graph.node[-1]
        weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        w = weights[gemm.input[1]].astype(np.float64)
        transposed = any(a.name == "transB" and a.i for a in gemm.attribute)
        rows = w[target] if transposed else w[:, target].T  # [N, C]
        spatial = activation.shape[2] * activation.shape[3]
        return np.broadcast_to((rows / spatial)[:, :, None, None], activation.shape)
    head = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model)).extract_model(
        [layer], [logits_name])
    return fd_gradient(Reference(head), activation, target, eps=1e-4)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_gradcam_on_the_shipped_models_equals_the_literal_formula(name):
    pattern, layer, count = SHIPPED[name]
    path = ROOT / "models" / f"{name}.onnx"
    preprocess = preprocess_for(path)
    files = sorted((ROOT / "models" / "images").glob(pattern))[:count]
    x = np.stack([load_image(f, preprocess)[0] for f in files])
    model = onnx.load(str(path))
    logits_name = model.graph.output[0].name
    scores, activation = session(with_output(model, layer)).run(
        [logits_name, layer], {model.graph.input[0].name: x})
    target = scores.argmax(1)
    grads = head_gradient(model, layer, logits_name, activation, target)
    weights = grads.mean(axis=(2, 3), keepdims=True)
    cam = np.maximum((weights * activation).sum(axis=1, keepdims=True), 0)
    expected = F.interpolate(torch.from_numpy(cam), size=x.shape[2:], mode="bilinear",
                             align_corners=False).numpy()
    graph = rectonnx.rewrite(path, "gradcam")
    _, attribution = run_explainer(graph, x, target)
    assert attribution.shape == (len(x), 1, *x.shape[2:]) and expected.any()
    assert_close(attribution, expected, "gradcam on the shipped models vs literal formula",
                 where=name)
