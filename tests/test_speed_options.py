"""The speed work keeps the graph exact: each faster form against the form it replaced.

* Conv backward: for stride 1 the explainer emits ``Conv(dY, flipped W)`` (ConvTranspose when
  X has fewer than ``FEW_CHANNELS`` channels); it must equal the ConvTranspose graph (same rule
  with the flipped form switched off) on every geometry the rule accepts, and ``flipped_kernel`` must equal torch's conv_transpose. Strided convolutions
  keep ConvTranspose, with the backward weight in its own initializer.
* The Explainer: one run, IO-bound chunks and memory-budget chunking change no number; the
  activation estimate scales with the image; ``from_graph`` runs a saved explainer graph.
* The benchmark's eager PyTorch RectGrad (benchmarks/eager.py) computes what rectonnx does.
* The prepared GPU check (benchmarks/gpu.py) runs end to end on the CPU provider and tells
  shape arithmetic from compute among the nodes a provider leaves to the CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

import rectonnx
import rectonnx.rules.linear as linear
from helpers import PROVIDERS, assert_close, distinct_values, parse, run_explainer
from rectonnx.geometry import flipped_kernel, flipped_kernel_pads
from rectonnx.runtime import Explainer, activation_bytes_per_sample, chunk_size_for_budget

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


# -- Conv backward as a Conv with the flipped kernel ---------------------------------------------
STRIDE1_CONVS = {
    # attrs, x shape (without N), W shape
    "3x3_same": ("pads = [1, 1, 1, 1]", (4, 7, 6), (5, 4, 3, 3)),
    "1x1": ("", (8, 5, 5), (6, 8, 1, 1)),
    "5x5_asymmetric": ("pads = [2, 0, 1, 2]", (3, 9, 8), (4, 3, 5, 5)),
    "dilated": ("pads = [2, 1, 2, 1], dilations = [2, 1]", (3, 9, 9), (4, 3, 3, 3)),
    "rectangular_valid": ("", (3, 8, 9), (2, 3, 2, 4)),
    "group2": ("group = 2, pads = [1, 1, 1, 1]", (4, 6, 6), (6, 2, 3, 3)),
    "depthwise_multiplier2": ("group = 3, pads = [1, 1, 1, 1]", (3, 6, 6), (6, 1, 3, 3)),
    "same_lower_even": ('auto_pad = "SAME_LOWER"', (2, 6, 7), (3, 2, 2, 2)),
    "conv1d": ("pads = [2, 1]", (3, 11), (4, 3, 4)),
    "conv3d": ("pads = [1, 0, 1, 1, 0, 1]", (2, 4, 5, 6), (3, 2, 3, 2, 3)),
}


def conv_model(attrs: str, x_shape, w_shape, rng, stride_attrs: str = ""):
    weight = rng.standard_normal(w_shape).astype(np.float32)
    dims = ",".join(str(d) for d in x_shape)
    listed = ", ".join(a for a in (attrs, stride_attrs) if a)
    attributes = f"<{listed}>" if listed else ""
    text = ('<ir_version: 8, opset_import: ["" : 17]>\n'
            f"conv (float[N,{dims}] x) => (float[N,3] logits) {{\n"
            f"  y = Conv {attributes} (x, W)\n"
            "  f = Flatten(y)\n  logits = MatMul(f, head)\n}")
    # the head's width, from shape inference
    model = parse(text, {"W": weight, "head": np.zeros((1, 3), np.float32)})
    model.graph.output[0].type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(model)
    y = next(v for v in inferred.graph.value_info if v.name == "y")
    width = int(np.prod([d.dim_value for d in y.type.tensor_type.shape.dim[1:]]))
    return parse(text, {"W": weight, "head": rng.standard_normal((width, 3)).astype(np.float32)})


def backward_ops(graph: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in graph.graph.node if n.name.startswith("grad/")]


@pytest.mark.parametrize("name", sorted(STRIDE1_CONVS))
def test_flipped_kernel_conv_equals_conv_transpose(name, rng, monkeypatch):
    attrs, x_shape, w_shape = STRIDE1_CONVS[name]
    model = conv_model(attrs, x_shape, w_shape, rng)
    x = distinct_values((2, *x_shape), rng)
    monkeypatch.setattr(linear, "FEW_CHANNELS", 0)  # these small test inputs have few channels
    flipped = rectonnx.rewrite(model, "saliency")
    assert "Conv" in backward_ops(flipped) and "ConvTranspose" not in backward_ops(flipped)
    with monkeypatch.context() as patch:
        patch.setattr(linear, "flipped_kernel_plan", lambda *args: None)
        transposed = rectonnx.rewrite(model, "saliency")
    assert "ConvTranspose" in backward_ops(transposed)
    _, a = run_explainer(flipped, x, [0, 2])
    _, b = run_explainer(transposed, x, [0, 2])
    assert_close(a, b, "flipped-kernel Conv vs ConvTranspose", tol=1e-6, where=name)


@pytest.mark.parametrize("channels,expected", [(3, "ConvTranspose"), (8, "Conv")])
def test_few_input_channels_keep_conv_transpose(channels, expected, rng, monkeypatch):
    """An RGB first layer (fewer than FEW_CHANNELS input channels) keeps the ConvTranspose,
    which onnxruntime runs faster there; it equals the flipped-kernel Conv."""
    model = conv_model("pads = [1, 1, 1, 1]", (channels, 6, 6), (16, channels, 3, 3), rng)
    x = distinct_values((2, channels, 6, 6), rng)
    chosen = rectonnx.rewrite(model, "saliency")
    assert backward_ops(chosen).count(expected) == 1
    monkeypatch.setattr(linear, "FEW_CHANNELS", 0 if channels < 8 else 64)
    other = rectonnx.rewrite(model, "saliency")
    assert expected not in backward_ops(other)
    _, a = run_explainer(chosen, x, [0, 2])
    _, b = run_explainer(other, x, [0, 2])
    assert_close(a, b, "few-channel ConvTranspose vs flipped Conv", tol=1e-6, where=expected)


@pytest.mark.parametrize("group,shape", [(1, (6, 4, 3, 3)), (2, (6, 2, 3, 5)),
                                         (4, (8, 1, 3, 3)), (1, (5, 3, 1, 1)),
                                         (1, (4, 3, 4)), (2, (4, 1, 3, 2, 3))])
def test_flipped_kernel_equals_torch_conv_transpose(group, shape, rng):
    """conv(dY, flipped_kernel(W), pads (k-1)d-b) == conv_transpose(dY, W) (stride 1)."""
    weight = rng.standard_normal(shape)
    rank = len(shape) - 2
    conv, conv_t = {1: (F.conv1d, F.conv_transpose1d), 2: (F.conv2d, F.conv_transpose2d),
                    3: (F.conv3d, F.conv_transpose3d)}[rank]
    for dilation, pad in [(1, 0), (1, 1), (2, 1)]:
        dy = torch.from_numpy(rng.standard_normal((2, shape[0]) + (7,) * rank))
        expected = conv_t(dy, torch.from_numpy(weight), padding=pad, dilation=dilation,
                          groups=group)
        pads = [flipped_kernel_pads(n, 7, k, dilation, pad)
                for n, k in zip(expected.shape[2:], shape[2:])]
        if None in pads:  # pads wider than the kernel: the rule uses ConvTranspose
            assert any((k - 1) * dilation < pad for k in shape[2:])
            continue
        assert all(begin == end for begin, end in pads)  # symmetric here, as torch pads
        got = conv(dy, torch.from_numpy(flipped_kernel(weight, group)),
                   padding=tuple(begin for begin, _ in pads), dilation=dilation, groups=group)
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-10, atol=1e-10)


def test_flipped_kernel_pads_refuses_pads_wider_than_the_kernel(rng, monkeypatch):
    assert flipped_kernel_pads(n=4, m=8, k=3, d=1, b=3) is None
    model = conv_model("pads = [3, 3, 3, 3]", (2, 4, 4), (3, 2, 3, 3), rng)
    graph = rectonnx.rewrite(model, "saliency")
    assert "ConvTranspose" in backward_ops(graph)  # falls back, still exact (test_rules)


def test_strided_conv_keeps_conv_transpose_with_its_own_weight(rng):
    model = conv_model("pads = [1, 1, 1, 1]", (3, 8, 8), (4, 3, 3, 3), rng,
                       stride_attrs="strides = [2, 2]")
    graph = rectonnx.rewrite(model, "saliency")
    transpose = next(n for n in graph.graph.node if n.op_type == "ConvTranspose")
    forward = next(n for n in graph.graph.node if n.op_type == "Conv")
    assert transpose.input[1] != forward.input[1]  # OpenVINO: no initializer shared by both
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    np.testing.assert_array_equal(weights[transpose.input[1]], weights[forward.input[1]])


# -- the Explainer ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def net_and_model():
    from rectonnx.converters.pytorch import export

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 5)).eval()
    return net, export(net, torch.randn(1, 3, 16, 16))


def test_one_run_and_chunks_bound_or_not_change_nothing(net_and_model, rng):
    """A batch in one run returns onnxruntime's arrays; chunks are written into the result
    through IO binding (or copied, io_binding=False); the numbers are the same."""
    _, model = net_and_model
    x = rng.standard_normal((7, 3, 16, 16)).astype(np.float32)
    one_run = Explainer(model, "rectgrad", q=90, providers=PROVIDERS)
    bound = Explainer(model, "rectgrad", q=90, providers=PROVIDERS, batch_size=3)
    plain = Explainer(model, "rectgrad", q=90, io_binding=False, providers=PROVIDERS,
                      batch_size=3)
    reference = one_run.explain(x, [0, 1, 2, 3, 4, -1, -1])
    for explainer in (bound, plain, Explainer(model, "rectgrad", q=90, providers=PROVIDERS,
                                              memory_budget_mb=1e-6)):
        result = explainer.explain(x, [0, 1, 2, 3, 4, -1, -1])
        np.testing.assert_array_equal(result.attribution, reference.attribution)
        np.testing.assert_array_equal(result.logits, reference.logits)
        np.testing.assert_array_equal(result.target, reference.target)
    tiny = Explainer(model, "saliency", memory_budget_mb=1e-6, providers=PROVIDERS)
    assert tiny.batch_size == 1 and tiny.bytes_per_sample > 0
    empty = bound.explain(np.zeros((0, 3, 16, 16), np.float32))
    assert empty.attribution.shape == (0, 3, 16, 16) and empty.logits.shape == (0, 5)


def test_memory_budget_sets_the_chunk(net_and_model):
    _, model = net_and_model
    per_sample = Explainer(model, "rectgrad", memory_budget_mb=1e6).bytes_per_sample
    explainer = Explainer(model, "rectgrad", batch_size=1000,
                          memory_budget_mb=10.5 * per_sample / 2 ** 20)
    assert explainer.batch_size == 10
    assert chunk_size_for_budget(per_sample, 1e-9) == 1
    assert Explainer(model, "rectgrad", batch_size=4, memory_budget_mb=1e6).batch_size == 4
    with pytest.raises(ValueError, match="memory_budget_mb must be finite and > 0"):
        Explainer(model, "rectgrad", memory_budget_mb=0)


def test_activation_estimate_scales_with_the_image():
    """The same net on 4x the pixels needs about 4x the activation memory per sample; the
    estimate counts at least the input, the attribution and one activation."""
    def graph(size):
        return rectonnx.rewrite(parse(
            '<ir_version: 8, opset_import: ["" : 17]>\n'
            f"m (float[N,3,{size},{size}] x) => (float[N,4] logits) {{\n"
            "  h = Conv <pads = [1, 1, 1, 1]> (x, W)\n  r = Relu(h)\n"
            "  g = GlobalAveragePool(r)\n  f = Flatten(g)\n  logits = MatMul(f, head)\n}",
            {"W": np.ones((16, 3, 3, 3), np.float32), "head": np.ones((16, 4), np.float32)}),
            "rectgrad")
    small, large = (activation_bytes_per_sample(graph(s)) for s in (16, 32))
    assert 3.5 < large / small < 4.5
    assert small >= 4 * (2 * 3 * 16 * 16 + 16 * 16 * 16)


def test_from_graph_runs_a_saved_explainer_graph(net_and_model, tmp_path, rng):
    _, model = net_and_model
    x = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    graph = rectonnx.rewrite(model, "guided_backprop")
    onnx.save(graph, tmp_path / "g.onnx")
    loaded = Explainer.from_graph(tmp_path / "g.onnx", batch_size=2, providers=PROVIDERS)
    assert loaded.method == "guided_backprop"
    direct = Explainer(model, "guided_backprop", providers=PROVIDERS).explain(x, 1)
    np.testing.assert_array_equal(loaded.explain(x, 1).attribution, direct.attribution)
    with pytest.raises(rectonnx.InputError, match="not an explainer graph"):
        Explainer.from_graph(model)


def test_fixed_batch_model_with_io_binding_pads_the_last_chunk(rng):
    w = rng.standard_normal((4, 3)).astype(np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])],
        "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [onnx.numpy_helper.from_array(w, "w")]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    result = Explainer(model, "saliency", providers=PROVIDERS).explain(x, [0, 1, 2])
    expected = (x > 0) * w[:, [0, 1, 2]].T
    np.testing.assert_allclose(result.attribution, expected, rtol=1e-6)


# -- the benchmark's eager baseline -------------------------------------------------------------
def test_eager_torch_rectgrad_matches_rectonnx(net_and_model):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from eager import TorchRectGrad
    finally:
        sys.path.remove(str(BENCHMARKS))
    net, model = net_and_model
    x = distinct_values((4, 3, 16, 16), np.random.default_rng(3))
    for q in (50.0, 90.0, 98.0):
        logits, attribution = TorchRectGrad(net, q)(torch.from_numpy(x),
                                                    torch.tensor([0, 1, 4, 2]))
        _, expected = run_explainer(rectonnx.rewrite(model, "rectgrad", q=q,
                                                     padding_trick=False), x, [0, 1, 4, 2])
        assert (expected > 0).any()
        assert_close(attribution.numpy(), expected, "eager torch RectGrad vs rectonnx",
                     tol=1e-4, where=f"q{q}")


@pytest.fixture
def benchmarks_path():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield
    finally:
        while str(BENCHMARKS) in sys.path:
            sys.path.remove(str(BENCHMARKS))


def test_eager_torch_rectgrad_gates_relu6_as_rectonnx_gates_clip(benchmarks_path):
    """EfficientNet-Lite0's ReLU6: the eager gate keeps ReLU6's own derivative mask."""
    from eager import TorchRectGrad
    from nets import export

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU6(),
                              torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU6(),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 12 * 12, 5)).eval()
    with torch.no_grad():  # large enough that some units saturate at 6
        net[0].weight.mul_(8.0)
    model = export(net, (3, 12, 12))
    assert "Clip" in {n.op_type for n in model.graph.node}
    x = distinct_values((3, 3, 12, 12), np.random.default_rng(5))
    with torch.no_grad():
        assert (net[1](net[0](torch.from_numpy(x))) == 6).any()
    for q in (50.0, 90.0):
        _, attribution = TorchRectGrad(net, q)(torch.from_numpy(x), torch.tensor([0, 3, 1]))
        _, expected = run_explainer(rectonnx.rewrite(model, "rectgrad", q=q,
                                                     padding_trick=False), x, [0, 3, 1])
        assert (expected > 0).any()
        assert_close(attribution.numpy(), expected, "eager torch RectGrad (ReLU6) vs rectonnx",
                     tol=1e-4, where=f"q{q}")


def test_bench_efficientnet_twin_is_the_shipped_model(benchmarks_path):
    """bench.py's torch EfficientNet-Lite0 reads its weights from the shipped ONNX file."""
    import onnxruntime as ort

    import nets

    net, model, shape = nets.build("efficientnet_lite0")
    x = nets.random_batch(shape, 1)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {model.graph.input[0].name: x})[0]
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_bench_summary_and_goals_from_speed_rows(benchmarks_path):
    """The done-condition's table and the goals paragraph, from made-up speed rows."""
    import bench

    def row(model, batch, contender, ms):
        return dict(model=model, batch=batch, contender=contender, ms=ms, cpu_ms=ms,
                    x_inference=ms / 10.0)

    speed = []
    for model, batch, exact, approx in (("resnet50", 1, 29.0, 25.0),
                                        ("efficientnet_lite0", 8, 50.0, 39.0)):
        speed += [row(model, batch, bench.INFERENCE[0], 10.0),
                  row(model, batch, bench.INFERENCE[1], 11.0),
                  row(model, batch, "rectonnx saliency", 20.0),
                  row(model, batch, "rectonnx rectgrad", exact),
                  row(model, batch, "rectonnx rectgrad (approx)", approx),
                  row(model, batch, "torch RectGrad (eager)", 60.0),
                  row(model, batch, "Captum GuidedBackprop", 40.0),
                  row(model, batch, "Captum Saliency", 30.0)]
    speed.append(row("resnet50", 1, bench.COMPILED, 55.0))
    found = bench.goals(speed)
    held = {(g["model"], g["variant"], g["kind"]): g["holds"] for g in found
            if g["unit"] == "wall"}
    assert held[("resnet50", "exact", "inference")]  # 2.9 <= 3
    assert not held[("efficientnet_lite0", "exact", "inference")]  # 5.0 > 4
    assert held[("efficientnet_lite0", "approx", "inference")]  # 3.9 <= 4
    assert held[("resnet50", "exact", "torch RectGrad (eager)")]  # 60 / 29 >= 1.5
    assert not held[("resnet50", "exact", "Captum GuidedBackprop")]  # 40 / 29 < 1.5
    report = dict(speed=speed, quick=False, compile_backends=["inductor"], agreement=[
        dict(model="resnet50", samples=4, cosine_median=0.99, cosine_min=0.97,
             top5_overlap_median=0.9, top5_overlap_min=0.8, recovered_median=0.85,
             recovered_worst=0.7)],
        compile=[dict(model="resnet50", batch=1, compiled=True,
                      tries=[dict(backend="inductor", compile_s=40.0)]),
                 dict(model="efficientnet_lite0", batch=8, compiled=False,
                      tries=[dict(backend="inductor", compile_s=1.0, error="no compiler")])],
        goals_text=bench.goals_paragraph(found, "today"))
    lines = bench.summary(report)
    header = next(line for line in lines if line.startswith("| model |"))
    for column in ("batch", "ORT inference", "saliency ms", "RectGrad exact ms",
                   "RectGrad approx ms", "exact x inf", "approx x inf", "eager torch",
                   "torch.compile", "Captum GuidedBackprop", "Captum Saliency", "agreement"):
        assert column in header, column
    body = [line for line in lines if line.startswith("| ResNet") or line.startswith("| Eff")]
    assert len(body) == 2
    assert "55.0 (inductor, 40 s)" in body[0] and "cos 0.990 (0.970)" in body[0]
    assert "did not compile: inductor: no compiler" in body[1]
    assert "holds in 1 of 2 cases" in report["goals_text"]
    assert report["goals_text"] in lines


def test_session_options_helpers(benchmarks_path):
    """benchmarks/session_options.py: the node census, the fixed batch, each option's effect."""
    import session_options as so

    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) {
            s = Shape(x)
            i = Identity(x)
            c = Cast<to = 10>(i)
            d = Cast<to = 1>(c)
            r = Reshape(d, s)
            y = Relu(r)
        }""")
    found = so.removable(model)
    assert (found["nodes"], found["shape"], found["identity"], found["cast_pairs"]) == (6, 1, 1, 1)
    fixed = so.fixed_batch(model)
    assert fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 0  # a copy
    assert so.removable(so.optimised(fixed, "BASIC"))["shape"] == 0  # the Shape chain folded
    grid = so.settings(quick=True)
    assert len(grid) == 2 * 2 * 2 * 2 * 2 and len({so.key(s) for s in grid}) == len(grid)
    rows = [dict(setting=s, ms=2.0 if s["threads"] == 2 else 1.0) for s in grid]
    effect = {(e["option"], e["value"]): e for e in so.effects(rows, "ms")}
    assert effect[("threads", 2)]["median_ratio"] == 2.0 and effect[("threads", 2)]["pairs"] == 16
    assert effect[("spinning", True)]["median_ratio"] == 1.0
    assert effect[("mode", "parallel")]["against"] == "sequential"


# -- the GPU check (benchmarks/gpu.py), run here on the CPU provider ------------------------------
@pytest.fixture
def gpu_check():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu
        yield gpu
    finally:
        while str(BENCHMARKS) in sys.path:
            sys.path.remove(str(BENCHMARKS))


def test_gpu_check_runs_on_the_cpu_provider(gpu_check, tmp_path):
    """The prepared device check end to end: every node on the asked provider, the same
    attribution as the CPU provider, and a speed row per contender."""
    import json

    assert gpu_check.main(["--provider", "cpu", "--quick", "--models", "paper_cnn", "--no-torch",
                           "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    (placed,) = report["placement"]
    assert placed["by_provider"] == {"CPUExecutionProvider": placed["nodes"]} and \
        placed["nodes"] > 20
    assert placed["compute_nodes_elsewhere"] == [] and placed["copies"] == 0
    (agreed,) = report["agreement"]
    assert agreed["attribution_max_rel"] == 0.0 and agreed["logits_max_rel"] == 0.0
    assert {r["contender"] for r in report["speed"]} == {
        "onnxruntime inference", "rectonnx rectgrad",
        "rectonnx rectgrad (Explainer, host arrays)"}
    assert all(r["ms"] > 0 for r in report["speed"])
    assert "### Placement" in (tmp_path / "gpu.md").read_text()


def test_gpu_check_has_a_float16_model(gpu_check):
    """``shipped_fp16``: EfficientNet-Lite0 in float16, whose explainer computes in float16."""
    import numpy as np

    from rectonnx.artifact import read_stamp

    ((label, _, model, shape, batches),) = gpu_check.load_models(["shipped_fp16"], quick=True)
    assert "float16" in label and gpu_check.input_dtype(model) == np.float16
    assert shape == (3, 224, 224) and batches == [1]
    graph = gpu_check.rewrite(model, "saliency")
    assert read_stamp(graph).computes_in == "float16"


def _event(name, op, provider, *tensors):
    """An onnxruntime profile event of node ``name``; tensors as (dtype, shape), first = output."""
    types = [{dtype: list(shape)} for dtype, shape in tensors]
    return {"cat": "Node", "name": f"{name}_kernel_time",
            "args": {"op_name": op, "provider": provider, "output_type_shape": types[:1],
                     "input_type_shape": types[1:]}}


def test_gpu_check_tells_shape_arithmetic_from_compute_fallbacks(gpu_check):
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    events = [
        _event("conv", "Conv", cuda, ("float", [1, 8, 4, 4]), ("float", [1, 3, 4, 4])),
        _event("shape_sum", "Add", cpu, ("int64", [4]), ("int64", [4]), ("int64", [1])),
        _event("rank", "Shape", cpu, ("int64", [4]), ("float", [1, 8, 4, 4])),
        _event("topk", "TopK", cpu, ("float", [1, 5]), ("float", [1, 128]), ("int64", [1])),
        _event("copy", "MemcpyToHost", cuda, ("float", [1, 128]), ("float", [1, 128])),
        {"cat": "Session", "name": "model_run", "args": {}},
    ]
    summary = gpu_check.summarise_placement(events, cuda)
    assert summary["nodes"] == 5 and summary["by_provider"] == {cuda: 2, cpu: 3}
    assert summary["shape_nodes_elsewhere"] == 1  # the int64 Add; Shape reads a float tensor
    assert summary["compute_nodes_elsewhere"] == ["Shape rank", "TopK topk"]
    assert summary["copies"] == 1


def test_gpu_check_without_cuda_is_one_clear_error(gpu_check, tmp_path, capsys):
    from rectonnx.runtime import cuda_usable

    if cuda_usable():
        pytest.skip("CUDA is usable here")
    assert gpu_check.main(["--provider", "cuda", "--quick", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "CUDA" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "gpu.json").exists()


def test_every_bench_ablation_still_builds_a_graph():
    """bench.py's ablations swap in rectonnx's older functions; when a signature moves on (e.g.
    the approximate threshold's ``recall``) the full bench must not break (CI runs only
    ``--quick``, which skips the ablations)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench
    finally:
        sys.path.remove(str(BENCHMARKS))
    model = Path(__file__).resolve().parent.parent / "models" / "paper_cnn_digits.onnx"
    for name, features in bench.ABLATIONS:
        with bench.switched_off(*features):
            graph = rectonnx.rewrite(model, "rectgrad", padding_trick=False)
        assert graph.graph.node, name
