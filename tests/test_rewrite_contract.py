"""The explainer graph's contract (docs/maths.md, 'The explainer graph contract'), target
handling, and bad input.

Contract: inputs are the data input (same name and dtype, symbolic batch) and ``target``
(int64 ``[N]``); outputs are ``logits`` (float ``[N, C]``, before any Softmax) and
``attribution`` (the input's shape); only ``ai.onnx`` operators; ``check_model(full_check=True)``
passes; IR version <= 10 so onnxruntime loads it. Bad input is a clear ``RectonnxError``; an op
without a backward rule on the path to the logits names every such op and node at once.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from helpers import (Reference, assert_close, distinct_values, explain, export, fd_gradient,
                     make_model, parse, run_explainer, session, torch_gradient)

import rectonnx
from rectonnx import InvalidModelError, UnsupportedModelError

METHODS = ["saliency", "grad_input", "deconvnet", "guided_backprop", "rectgrad"]


class SmallCNN(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(5 * 3 * 3, classes)

    def forward(self, x):
        x = self.pool(self.relu(self.bn(self.conv(x))))
        return self.fc(x.view(x.size(0), -1))  # Shape/Gather/Concat/Reshape in the export


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    net = SmallCNN().eval()
    x = distinct_values((3, 3, 6, 6), np.random.default_rng(0), -2.0, 2.0)
    return net, x, export(net, torch.from_numpy(x), input_name="image")


# -- the contract -------------------------------------------------------------------------------
def dims(info):
    return [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("method", METHODS)
def test_graph_contract(cnn, method):
    _, x, model = cnn
    explainer = rectonnx.rewrite(model, method)
    onnx.checker.check_model(explainer, full_check=True)
    assert explainer.ir_version <= 10
    assert [(o.domain, o.version) for o in explainer.opset_import] == [("", 17)]
    assert {n.domain for n in explainer.graph.node} <= {""}
    assert not any(n.op_type in {"Gradient", "Dropout"} for n in explainer.graph.node)

    data, target = explainer.graph.input
    assert (data.name, target.name) == ("image", "target")
    assert data.type.tensor_type.elem_type == TensorProto.FLOAT
    assert target.type.tensor_type.elem_type == TensorProto.INT64
    batch = dims(data)[0]
    assert isinstance(batch, str) and batch  # symbolic
    assert dims(data) == [batch, 3, 6, 6]
    assert dims(target) == [batch]

    logits, attribution = explainer.graph.output
    assert (logits.name, attribution.name) == ("logits", "attribution")
    assert logits.type.tensor_type.elem_type == TensorProto.FLOAT
    assert attribution.type.tensor_type.elem_type == TensorProto.FLOAT
    assert dims(logits) == [batch, 4]
    assert dims(attribution) == dims(data)

    sess = session(explainer)  # onnxruntime loads it
    for n in (1, 3):
        out_logits, out_attribution = sess.run(None, {"image": x[:n],
                                                      "target": np.full(n, -1, np.int64)})
        assert out_logits.shape == (n, 4) and out_logits.dtype == np.float32
        assert out_attribution.shape == x[:n].shape and out_attribution.dtype == np.float32


def test_the_explainer_survives_a_file_round_trip(cnn, tmp_path):
    _, x, model = cnn
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    explainer = rectonnx.rewrite(str(path), "rectgrad", q=90.0)
    onnx.save(explainer, str(tmp_path / "explainer.onnx"))
    reloaded = onnx.load(str(tmp_path / "explainer.onnx"))
    a = run_explainer(explainer, x, [0, 1, 2])
    b = run_explainer(reloaded, x, [0, 1, 2])
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_the_input_model_is_not_modified(cnn):
    _, _, model = cnn
    before = model.SerializeToString()
    rectonnx.rewrite(model, "rectgrad", padding_trick=True, prr=True)
    assert model.SerializeToString() == before


def test_logits_are_the_model_scores(cnn):
    net, x, model = cnn
    logits, _ = explain(model, x, [0, 1, 2])
    expected, _ = torch_gradient(net, x, [0, 1, 2])
    assert_close(logits, expected, "forward logits vs torch", where="contract")


# -- targets ------------------------------------------------------------------------------------
def test_targets_explicit_negative_and_per_sample(cnn):
    net, x, model = cnn
    explainer = rectonnx.rewrite(model, "saliency")
    logits, _ = run_explainer(explainer, x, [0, 0, 0])
    predicted = logits.argmax(axis=1)
    cases = {
        "explicit, one class": [1, 1, 1],
        "explicit, per sample": [3, 0, 2],
        "negative = predicted": [-1, -1, -1],
        "mixed, any negative": [2, -7, -1],
    }
    for name, target in cases.items():
        _, attribution = run_explainer(explainer, x, target)
        resolved = [t if t >= 0 else int(p) for t, p in zip(target, predicted)]
        _, expected = torch_gradient(net, x, resolved)
        assert_close(attribution, expected, "gradient vs torch autograd", where=name)
    # the predicted class is the explained one: same map as asking for it explicitly
    np.testing.assert_array_equal(run_explainer(explainer, x, [-1, -1, -1])[1],
                                  run_explainer(explainer, x, predicted)[1])
    # different targets really give different maps
    a = run_explainer(explainer, x, [0, 0, 0])[1]
    b = run_explainer(explainer, x, [1, 1, 1])[1]
    assert not np.allclose(a, b)


# -- what the normaliser accepts ---------------------------------------------------------------
def test_trailing_softmax_is_stripped():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    text = ('<ir_version: 8, opset_import: ["" : 17]>\n'
            "soft (float[N,6] x) => (float[N,3] probabilities) {\n"
            "  h = MatMul(x, w)\n  r = Relu(h)\n  probabilities = Softmax <axis = 1> (r)\n}")
    x = distinct_values((2, 6), rng)
    logits, attribution = explain(parse(text, {"w": w}), x, [0, 2])
    h = x.astype(np.float64) @ w
    np.testing.assert_allclose(logits, np.maximum(h, 0), rtol=1e-5, atol=1e-6)
    expected = np.stack([w[:, t] * (h[i, t] > 0) for i, t in enumerate([0, 2])])
    assert_close(attribution, expected, "gradient vs literal numpy", where="softmax stripped")


def test_score_map_n_c_1_1_is_flattened():
    """A fully convolutional classifier: [N, C, 1, 1] scores become [N, C] logits."""
    rng = np.random.default_rng(0)
    text = ('<ir_version: 8, opset_import: ["" : 17]>\n'
            "fcn (float[N,2,4,4] x) => (float[N,3,1,1] scores) {\n"
            "  h = Conv (x, w)\n  r = Relu(h)\n  scores = GlobalAveragePool(r)\n}")
    w = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    model = parse(text, {"w": w})
    explainer = rectonnx.rewrite(model, "saliency")
    assert len(explainer.graph.output[0].type.tensor_type.shape.dim) == 2
    x = distinct_values((2, 2, 4, 4), rng)
    logits, attribution = run_explainer(explainer, x, [1, 2])
    h = np.einsum("nchw,kchw->nk", x.astype(np.float64), w)
    np.testing.assert_allclose(logits, np.maximum(h, 0), rtol=1e-5, atol=1e-6)
    expected = np.stack([w[t] * (h[i, t] > 0) for i, t in enumerate([1, 2])])
    assert_close(attribution, expected, "gradient vs literal numpy", where="score map")


@pytest.mark.parametrize("method", ["saliency", "rectgrad"])
def test_symbolic_number_of_classes(method):
    """Logits [N, K] with K symbolic: the one-hot seed is built from the runtime class count."""
    text = ('<ir_version: 8, opset_import: ["" : 17]>\n'
            "dyn (float[N,K] x) => (float[N,K] scores) {\n"
            "  r = Relu(x)\n  scores = Mul(r, two)\n}")
    model = parse(text, {"two": np.float32(2.0)})
    explainer = rectonnx.rewrite(model, method, **({"q": 0.0} if method == "rectgrad" else {}))
    rng = np.random.default_rng(0)
    for classes in (5, 7):
        x = distinct_values((2, classes), rng)
        target = [1, -1]
        logits, attribution = run_explainer(explainer, x, target)
        np.testing.assert_allclose(logits, 2 * np.maximum(x, 0), rtol=1e-6)
        resolved = [1, int(np.argmax(x[1]))]
        expected = np.zeros_like(x)
        for i, t in enumerate(resolved):
            expected[i, t] = 2.0 * (x[i, t] > 0)
        if method == "rectgrad":  # scores y R: only the target unit can be above the minimum
            expected = np.maximum(expected * x, 0)
        np.testing.assert_allclose(attribution, expected, rtol=1e-6)


def test_ir3_opset9_model_with_weights_as_inputs():
    """IR 3 listed every weight as a graph input too; those are weights, not data inputs."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    head = rng.standard_normal((3 * 2 * 2, 2)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], pads=[0, 0, 0, 0]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "head"], ["scores"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6]),
              helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2, 3, 3]),
              helper.make_tensor_value_info("head", TensorProto.FLOAT, [12, 2])]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("scores", TensorProto.FLOAT,
                                                                     ["N", 2])],
                       [numpy_helper.from_array(w, "w"), numpy_helper.from_array(head, "head")],
                       opset=9, ir_version=3)
    explainer = rectonnx.rewrite(model, "saliency")
    assert [i.name for i in explainer.graph.input] == ["x", "target"]
    x = distinct_values((2, 2, 6, 6), rng)
    module = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                           nn.Flatten(), nn.Linear(12, 2, bias=False))
    module[0].weight.data = torch.from_numpy(w)
    module[4].weight.data = torch.from_numpy(head.T.copy())
    logits, attribution = run_explainer(explainer, x, [0, 1])
    expected_logits, expected = torch_gradient(module, x, [0, 1])
    assert_close(logits, expected_logits, "forward logits vs torch", where="ir3")
    assert_close(attribution, expected, "gradient vs torch autograd", where="ir3")


@pytest.mark.parametrize("opset", [9, 11, 13])
def test_older_torch_exports(opset):
    torch.manual_seed(0)
    net = SmallCNN().eval()
    x = distinct_values((2, 3, 6, 6), np.random.default_rng(0), -2.0, 2.0)
    model = export(net, torch.from_numpy(x), opset=opset)
    _, attribution = explain(model, x, [1, -1])
    _, expected = torch_gradient(net, x, [1, -1])
    assert_close(attribution, expected, "gradient vs torch autograd", where=f"opset{opset}")


def test_contract_names_already_used_inside_the_model():
    """Tensors called target/attribution/logits inside the model do not clash with the
    contract's names."""
    rng = np.random.default_rng(0)
    text = ('<ir_version: 8, opset_import: ["" : 17]>\n'
            "clash (float[N,4] x) => (float[N,3] out) {\n"
            "  target = MatMul(x, w)\n  attribution = Relu(target)\n"
            "  logits = Mul(attribution, two)\n  out = MatMul(logits, v)\n}")
    w = rng.standard_normal((4, 5)).astype(np.float32)
    v = rng.standard_normal((5, 3)).astype(np.float32)
    model = parse(text, {"w": w, "v": v, "two": np.float32(2.0)})
    x = distinct_values((2, 4), rng)
    logits, attribution = explain(model, x, [0, 2])
    h = x.astype(np.float64) @ w
    np.testing.assert_allclose(logits, 2 * np.maximum(h, 0) @ v, rtol=1e-5, atol=1e-6)
    expected = np.stack([w @ (2 * (h[i] > 0) * v[:, t]) for i, t in enumerate([0, 2])])
    assert_close(attribution, expected, "gradient vs literal numpy", where="name clash")


def test_several_outputs_need_output_name():
    rng = np.random.default_rng(0)
    text = ('<ir_version: 8, opset_import: ["" : 17]>\n'
            "two (float[N,4] x) => (float[N,3] scores, float[N,4] features) {\n"
            "  features = Sigmoid(x)\n  scores = MatMul(x, w)\n}")
    model = parse(text, {"w": rng.standard_normal((4, 3)).astype(np.float32)})
    with pytest.raises(InvalidModelError, match="output_name"):
        rectonnx.rewrite(model, "saliency")
    # the Sigmoid (no rule) is not on the path to the chosen scores: no error
    explainer = rectonnx.rewrite(model, "saliency", output_name="scores")
    assert [o.name for o in explainer.graph.output] == ["logits", "attribution"]
    with pytest.raises(InvalidModelError, match="no output"):
        rectonnx.rewrite(model, "saliency", output_name="nope")


# -- bad input ----------------------------------------------------------------------------------
def test_a_file_that_is_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is a text file, not a protobuf\n" * 20)
    with pytest.raises(InvalidModelError, match="notes.onnx"):
        rectonnx.rewrite(str(path), "saliency")
    png = tmp_path / "picture.onnx"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(InvalidModelError):
        rectonnx.rewrite(png, "saliency")


def test_a_missing_file_and_wrong_types(tmp_path):
    with pytest.raises(InvalidModelError, match="no such model file"):
        rectonnx.rewrite(str(tmp_path / "missing.onnx"), "saliency")
    with pytest.raises(InvalidModelError):
        rectonnx.rewrite(12345, "saliency")
    with pytest.raises(InvalidModelError):
        rectonnx.rewrite(b"\x00\x01garbage", "saliency")


def test_a_truncated_onnx_file(cnn, tmp_path):
    _, _, model = cnn
    data = model.SerializeToString()
    path = tmp_path / "truncated.onnx"
    for cut in (1, len(data) // 10, len(data) // 2, len(data) - 100, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(InvalidModelError, match="truncated.onnx"):
            rectonnx.rewrite(str(path), "saliency")


def test_every_prefix_of_a_model_is_rejected_cleanly(cnn):
    """No prefix of a serialized model yields a graph or a raw protobuf/onnx exception."""
    _, _, model = cnn
    data = model.SerializeToString()
    for cut in range(0, len(data), 7):
        with pytest.raises(InvalidModelError):
            rectonnx.rewrite(data[:cut], "saliency")


def unsupported_model():
    rng = np.random.default_rng(0)
    text = ('<ir_version: 8, opset_import: ["" : 17]>\n'
            "bad (float[N,2,4,4] x) => (float[N,3] scores) {\n"
            "  h = Conv <pads = [1, 1, 1, 1]> (x, w)\n"
            "  s = Sin(h)\n  t = Cos(s)\n  u = Sin(t)\n"
            "  e = Exp(c)\n  v = Mul(u, e)\n"  # Exp of a constant: folded, needs no rule
            "  f = Flatten(v)\n  scores = MatMul(f, head)\n}")
    return parse(text, {"w": rng.standard_normal((2, 2, 3, 3)).astype(np.float32),
                        "c": np.float32(0.5),
                        "head": rng.standard_normal((32, 3)).astype(np.float32)})


def test_unsupported_ops_are_all_named_at_once():
    with pytest.raises(UnsupportedModelError) as info:
        rectonnx.rewrite(unsupported_model(), "rectgrad")
    error = info.value
    ops = sorted(op for op, _ in error.unsupported)
    assert ops == ["Cos", "Sin", "Sin"]
    names = [name for _, name in error.unsupported]
    assert len(set(names)) == 3
    message = str(error)
    for op, name in error.unsupported:
        assert op in message and name in message
    assert "Exp" not in message
    assert isinstance(error, rectonnx.RectonnxError)


def test_unsupported_op_names_given_in_the_model_are_reported():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Sin", ["x"], ["a"], name="smooth_one"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Atan", ["b"], ["c"], name="atan_layer"),
             helper.make_node("MatMul", ["c", "w"], ["scores"], name="head")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                       [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 2])],
                       [numpy_helper.from_array(rng.standard_normal((4, 2)).astype(np.float32),
                                                "w")])
    with pytest.raises(UnsupportedModelError) as info:
        rectonnx.rewrite(model, "saliency")
    assert sorted(info.value.unsupported) == [("Atan", "atan_layer"), ("Sin", "smooth_one")]
    assert "smooth_one" in str(info.value) and "atan_layer" in str(info.value)


def test_ops_of_other_domains_are_reported():
    """A com.microsoft op on the path is named like any op without a rule (never emitted)."""
    nodes = [helper.make_node("Gelu", ["x"], ["a"], domain="com.microsoft", name="ms_gelu"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("MatMul", ["b", "w"], ["scores"], name="head")]
    graph = helper.make_graph(
        nodes, "ms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(np.ones((4, 2), np.float32), "w")])
    model = helper.make_model(graph, ir_version=8, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(UnsupportedModelError) as info:
        rectonnx.rewrite(model, "saliency")
    assert info.value.unsupported == [("Gelu", "ms_gelu")]


def test_convolutions_with_symbolic_image_sizes():
    """A Conv with symbolic H and W rewrites (its backward fits ConvTranspose to Shape(X));
    a ConvTranspose with auto_pad still needs static sizes and says so, naming the node."""
    text = ('<ir_version: 8, opset_import: ["" : 17]>\n'
            "fcn (float[N,2,H,W] x) => (float[N,3] scores) {\n"
            "  h = Conv <pads = [1, 1, 1, 1]> (x, w)\n  r = Relu(h)\n"
            "  p = GlobalAveragePool(r)\n  f = Flatten(p)\n  scores = MatMul(f, head)\n}")
    rng = np.random.default_rng(0)
    model = parse(text, {"w": rng.standard_normal((3, 2, 3, 3)).astype(np.float32),
                         "head": rng.standard_normal((3, 3)).astype(np.float32)})
    explainer = rectonnx.rewrite(model, "saliency")
    for size in [(5, 7), (9, 4)]:
        x = rng.standard_normal((2, 2, *size)).astype(np.float32)
        fixed = parse(text.replace("H,W", f"{size[0]},{size[1]}"),
                      {t.name: numpy_helper.to_array(t) for t in model.graph.initializer})
        _, got = run_explainer(explainer, x, [0, -1])
        assert_close(got, fd_gradient(Reference(fixed), x, [0, -1]),
                     "gradient vs central differences", where=f"symbolic conv {size}")
    same = text.replace("h = Conv <pads = [1, 1, 1, 1]> (x, w)",
                        'h = ConvTranspose <auto_pad = "SAME_UPPER", strides = [2, 2]> (x, wt)')
    model = parse(same, {"wt": np.ones((2, 3, 3, 3), np.float32),
                         "head": np.ones((3, 3), np.float32)})
    with pytest.raises(UnsupportedModelError, match="static sizes") as info:
        rectonnx.rewrite(model, "saliency")
    assert [op for op, _ in info.value.unsupported] == ["ConvTranspose"]


def test_non_float_input_is_rejected():
    text = ('<ir_version: 8, opset_import: ["" : 17]>\n'
            "u8 (uint8[N,4] x) => (float[N,2] scores) {\n"
            "  d = Mul(x, x)\n  f = Cast <to = 1> (d)\n  scores = MatMul(f, w)\n}")
    model = parse(text, {"w": np.ones((4, 2), np.float32)})
    with pytest.raises(InvalidModelError, match="float32"):
        rectonnx.rewrite(model, "saliency")


def test_scores_that_do_not_depend_on_the_input_are_rejected():
    text = ('<ir_version: 8, opset_import: ["" : 17]>\n'
            "const (float[N,4] x) => (float[1,2] scores) {\n  scores = Relu(w)\n}")
    with pytest.raises(InvalidModelError):
        rectonnx.rewrite(parse(text, {"w": np.ones((1, 2), np.float32)}), "saliency")


def test_unknown_method_is_rejected(cnn):
    _, _, model = cnn
    with pytest.raises(ValueError, match="unknown method"):
        rectonnx.rewrite(model, "lrp")
