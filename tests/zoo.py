"""The nine model-zoo architectures shipped in the ``onnx`` package, with random weights.

``onnx/backend/test/data/light/*.onnx`` hold the graphs of AlexNet, DenseNet-121, Inception v1
and v2, ResNet-50, ShuffleNet, SqueezeNet, VGG-19 and ZFNet-512 as their converters wrote them
(opset 9, IR 3, a fixed batch of 1, ``Reshape`` constants such as ``[1, 9216]``, weights listed
as graph inputs and made by ``ConstantOfShape`` with one constant value). ``zoo_model`` gives
every weight seeded random values of a sensible scale, so gradients mean something:

* convolution and dense weights: He normal, ``std = sqrt(2 / fan_in)``;
* biases: ``N(0, 0.05)``; BatchNorm/affine scales ``U(0.5, 1)``, shifts and means
  ``N(0, 0.1)``, variances ``U(0.5, 1.5)``.

The weights stay graph inputs with initializers (IR 3), so the normaliser's IR-3 path runs.

``size`` shrinks the input image where the architecture allows it (a dense head after a
flatten, or a global pool): the ``[1, K]`` flatten constant becomes ``[1, K']`` and the first
dense weight ``[out, K']`` for the new ``K'``, nothing else changes. Models that end in a fixed
7x7 average pool (ResNet-50, Inception v1/v2, ShuffleNet) keep 224.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference
from onnx.reference.op_run import OpRun

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


@dataclass(frozen=True)
class ZooEntry:
    name: str
    file: str
    size: int  # the input side used in the tests (224 = the original)


ZOO = {e.name: e for e in [
    ZooEntry("alexnet", "light_bvlc_alexnet.onnx", 99),
    ZooEntry("densenet121", "light_densenet121.onnx", 64),
    ZooEntry("inception_v1", "light_inception_v1.onnx", 224),
    ZooEntry("inception_v2", "light_inception_v2.onnx", 224),
    ZooEntry("resnet50", "light_resnet50.onnx", 224),
    ZooEntry("shufflenet", "light_shufflenet.onnx", 224),
    ZooEntry("squeezenet", "light_squeezenet.onnx", 64),
    ZooEntry("vgg19", "light_vgg19.onnx", 32),
    ZooEntry("zfnet512", "light_zfnet512.onnx", 99),
]}


def load_light(name: str) -> onnx.ModelProto:
    return onnx.load(os.path.join(LIGHT, ZOO[name].file))


def _consumers(graph):
    table = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            table.setdefault(name, []).append((node, i))
    return table


def _role(name, consumers) -> tuple[str, int]:
    """(op type, input index) of the op that finally uses weight ``name`` (through reshapes)."""
    seen = 0
    while seen < 8:
        uses = consumers.get(name, [])
        if not uses:
            return "", 0
        node, index = uses[0]
        if node.op_type in ("Unsqueeze", "Reshape", "Squeeze", "Flatten") and index == 0:
            name = node.output[0]
            seen += 1
            continue
        return node.op_type, index
    return "", 0


def _random_weight(role: tuple[str, int], shape, rng) -> np.ndarray:
    op, index = role
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if op in ("Conv", "Gemm", "MatMul") and index == 1 and len(shape) > 1:
        value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    elif op == "BatchNormalization":
        value = {1: lambda: rng.uniform(0.5, 1.0, shape),
                 2: lambda: rng.normal(0.0, 0.1, shape),
                 3: lambda: rng.normal(0.0, 0.1, shape),
                 4: lambda: rng.uniform(0.5, 1.5, shape)}[index]()
    elif op == "Mul":
        value = rng.uniform(0.5, 1.0, shape)
    elif op in ("Add", "Sum") or index == 2:
        value = rng.normal(0.0, 0.05, shape)
    else:
        value = rng.normal(0.0, 0.1, shape)
    return np.asarray(value, np.float32)


def _infer(model):
    return shape_inference.infer_shapes(model, data_prop=True)


def _shape_of(model, name):
    for info in list(model.graph.value_info) + list(model.graph.output):
        if info.name == name:
            return [d.dim_value if d.HasField("dim_value") else None
                    for d in info.type.tensor_type.shape.dim]
    return None


def _shrink(model: onnx.ModelProto, size: int) -> None:
    """Set the input side to ``size`` and adapt the flatten constant and the first dense weight."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    data = next(i for i in graph.input if i.name not in inits and
                len(i.type.tensor_type.shape.dim) == 4)
    for dim in data.type.tensor_type.shape.dim[2:]:
        dim.dim_value = size
    producers = {o: n for n in graph.node for o in n.output}
    inferred = _infer(model)
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] not in inits:
            continue
        target = numpy_helper.to_array(inits[node.input[1]])
        in_shape = _shape_of(inferred, node.input[0])
        if len(target) == 2 and in_shape and all(in_shape):
            flat = int(np.prod(in_shape[1:]))
            if flat != target[1]:
                inits[node.input[1]].CopyFrom(numpy_helper.from_array(
                    np.asarray([target[0], flat], np.int64), node.input[1]))
    inferred = _infer(model)
    for node in graph.node:
        if node.op_type != "Gemm" or node.input[1] not in producers:
            continue
        maker = producers[node.input[1]]
        if maker.op_type != "ConstantOfShape" or maker.input[0] not in inits:
            continue
        a_shape = _shape_of(inferred, node.input[0])
        shape = numpy_helper.to_array(inits[maker.input[0]]).copy()
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        if a_shape and a_shape[1]:
            shape[1 if trans_b else 0] = a_shape[1]
            inits[maker.input[0]].CopyFrom(numpy_helper.from_array(shape, maker.input[0]))


def zoo_model(name: str, seed: int = 0, size: int | None = None) -> onnx.ModelProto:
    """The zoo architecture ``name`` with seeded random weights (input side ``size``)."""
    model = load_light(name)
    size = ZOO[name].size if size is None else size
    if size != 224:
        _shrink(model, size)
    rng = np.random.default_rng(seed)
    graph = model.graph
    consumers = _consumers(graph)
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weights: dict[str, np.ndarray] = {}
    keep = []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = [int(d) for d in inits[node.input[0]]]
            weights[node.output[0]] = _random_weight(_role(node.output[0], consumers), shape, rng)
        else:
            keep.append(node)
    for name_, value in inits.items():
        if value.dtype == np.float32:
            weights[name_] = _random_weight(_role(name_, consumers), list(value.shape), rng)
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in keep for i in n.input}
    kept_inits = [t for t in graph.initializer
                  if t.name in used and t.name not in weights]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    # IR 3: every initializer is also a graph input
    data_inputs = [i for i in graph.input if i.name not in inits and i.name not in weights
                   and i.name in used]
    del graph.input[:]
    graph.input.extend(data_inputs)
    graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in graph.initializer)
    onnx.checker.check_model(model)
    return model


def data_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {t.name for t in model.graph.initializer}
    return next(i for i in model.graph.input if i.name not in inits)


def input_shape(model: onnx.ModelProto) -> list[int]:
    return [d.dim_value for d in data_input(model).type.tensor_type.shape.dim]


# -- a float64 oracle fast enough for 224x224 ------------------------------------------------
# onnx.reference is the oracle, with four ops replaced by float64 torch/numpy versions of the
# ONNX formulas: its Conv and AveragePool are pure Python (AveragePool takes ~25 s on one
# ResNet-sized tensor), its MaxPool is slow, and its BatchNormalization-9 is wrong (onnx 1.23).
# ``test_zoo.py`` checks the oracle's forward pass against onnxruntime on the source model.


def _torch_pads(pads, rank):
    pads = list(pads or [0] * 2 * rank)
    out = []
    for axis in reversed(range(rank)):
        out += [pads[axis], pads[rank + axis]]
    return out


def _only_explicit(auto_pad):
    if auto_pad not in (None, "NOTSET", b"NOTSET", ""):
        raise NotImplementedError(f"auto_pad {auto_pad!r} in the zoo oracle")


class Conv(OpRun):
    """2-D convolutions as im2col + one batched matrix product (torch's float64 convolution,
    grouped ones above all, is far slower)."""

    op_domain = ""

    def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
             pads=None, strides=None):
        import torch
        import torch.nn.functional as F

        _only_explicit(auto_pad)
        rank = w.ndim - 2
        group = group or 1
        strides = list(strides or [1] * rank)
        dilations = list(dilations or [1] * rank)
        data = F.pad(torch.from_numpy(np.array(x, np.float64)), _torch_pads(pads, rank))
        weight = torch.from_numpy(np.array(w, np.float64))
        if rank != 2:
            conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
            y = conv(data, weight, stride=strides, dilation=dilations, groups=group)
        else:
            n, m = data.shape[0], weight.shape[0]
            height = (data.shape[2] - (w.shape[2] - 1) * dilations[0] - 1) // strides[0] + 1
            width = (data.shape[3] - (w.shape[3] - 1) * dilations[1] - 1) // strides[1] + 1
            if w.shape[2:] == (1, 1) and strides == [1, 1]:
                patches = data.reshape(n, data.shape[1], -1)
            else:
                patches = F.unfold(data, tuple(w.shape[2:]), dilation=dilations, stride=strides)
            patches = patches.reshape(n, group, -1, patches.shape[-1])  # [N, G, C/G k k, L]
            kernels = weight.reshape(group, m // group, -1)  # [G, M/G, C/G k k]
            y = torch.matmul(kernels.unsqueeze(0), patches).reshape(n, m, height, width)
        if b is not None:
            y = y + torch.from_numpy(np.array(b, np.float64)).reshape(1, -1, *[1] * rank)
        return (y.numpy().astype(x.dtype),)


class MaxPool(OpRun):
    op_domain = ""

    def _run(self, x, auto_pad=None, ceil_mode=0, dilations=None, kernel_shape=None, pads=None,
             storage_order=None, strides=None):
        import torch
        import torch.nn.functional as F

        _only_explicit(auto_pad)
        if ceil_mode:
            raise NotImplementedError("ceil_mode in the zoo oracle")
        rank = len(kernel_shape)
        padded = F.pad(torch.from_numpy(np.array(x, np.float64)), _torch_pads(pads, rank),
                       value=-np.inf)
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[rank - 1]
        y = pool(padded, list(kernel_shape), list(strides or [1] * rank),
                 dilation=list(dilations or [1] * rank))
        return (y.numpy().astype(x.dtype),)


class AveragePool(OpRun):
    op_domain = ""

    def _run(self, x, auto_pad=None, ceil_mode=0, count_include_pad=0, dilations=None,
             kernel_shape=None, pads=None, strides=None):
        import torch
        import torch.nn.functional as F

        _only_explicit(auto_pad)
        if ceil_mode:
            raise NotImplementedError("ceil_mode in the zoo oracle")
        rank = len(kernel_shape)
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
        args = (list(kernel_shape), list(strides or [1] * rank))
        data = torch.from_numpy(np.array(x, np.float64))
        total = pool(F.pad(data, _torch_pads(pads, rank)), *args)
        if count_include_pad:
            return (total.numpy().astype(x.dtype),)
        ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=torch.float64)
        real = pool(F.pad(ones, _torch_pads(pads, rank)), *args)
        return ((total / real).numpy().astype(x.dtype),)


class BatchNormalization(OpRun):
    op_domain = ""

    def _run(self, x, scale, bias, mean, var, epsilon=1e-5, momentum=None, spatial=None,
             training_mode=None):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        s = scale / np.sqrt(var + epsilon)
        return ((x - mean.reshape(shape)) * s.reshape(shape) + bias.reshape(shape),)


ZOO_ORACLE_OPS = [Conv, MaxPool, AveragePool, BatchNormalization]


def scores_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` ending at the input of its trailing Softmax: the logits rectonnx explains."""
    scores = onnx.ModelProto()
    scores.CopyFrom(model)
    graph = scores.graph
    producer = {o: n for n in graph.node for o in n.output}
    softmax = producer[graph.output[0].name]
    if softmax.op_type != "Softmax":
        return scores
    name = softmax.input[0]
    graph.node.remove(softmax)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return scores


class ZooReference:
    """The float64 oracle of a zoo model's scores, one sample at a time (fixed batch of 1)."""

    def __init__(self, model: onnx.ModelProto):
        from helpers import Reference

        self.reference = Reference(scores_model(model), tuple(ZOO_ORACLE_OPS))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([self.reference(x[i:i + 1]) for i in range(len(x))])


class ConvTranspose(OpRun):
    """Float64 ConvTranspose (explicit pads): torch's full transposed convolution, the output
    padding appended at the end, then the pads cut."""

    op_domain = ""

    def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
             output_padding=None, output_shape=None, pads=None, strides=None):
        import torch
        import torch.nn.functional as F

        _only_explicit(auto_pad)
        if output_shape:
            raise NotImplementedError("output_shape in the zoo oracle")
        rank = w.ndim - 2
        transpose = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[rank - 1]
        full = transpose(torch.from_numpy(np.array(x, np.float64)),
                         torch.from_numpy(np.array(w, np.float64)),
                         stride=list(strides or [1] * rank),
                         dilation=list(dilations or [1] * rank), groups=group or 1)
        extra = list(output_padding or [0] * rank)
        full = F.pad(full, [v for axis in reversed(range(rank)) for v in (0, extra[axis])])
        pads = list(pads or [0] * 2 * rank)
        index = (slice(None), slice(None)) + tuple(
            slice(pads[a], full.shape[2 + a] - pads[rank + a]) for a in range(rank))
        y = full[index]
        if b is not None:
            y = y + torch.from_numpy(np.array(b, np.float64)).reshape(1, -1, *[1] * rank)
        return (y.numpy().astype(x.dtype),)


class MaxPoolWithIndices(MaxPool):
    """Float64 2-D MaxPool that also gives ONNX's Indices (flat positions in the input)."""

    def _run(self, x, auto_pad=None, ceil_mode=0, dilations=None, kernel_shape=None, pads=None,
             storage_order=None, strides=None):
        import torch
        import torch.nn.functional as F

        _only_explicit(auto_pad)
        if ceil_mode or len(kernel_shape) != 2:
            raise NotImplementedError("ceil_mode or a non-2-D MaxPool in the zoo oracle")
        pads = list(pads or [0] * 4)
        data = torch.from_numpy(np.array(x, np.float64))
        padded = F.pad(data, _torch_pads(pads, 2), value=-np.inf)
        y, where = F.max_pool2d(padded, list(kernel_shape), list(strides or [1, 1]),
                                dilation=list(dilations or [1, 1]), return_indices=True)
        n, c, height, width = data.shape
        row, col = where // padded.shape[3] - pads[0], where % padded.shape[3] - pads[1]
        plane = torch.arange(n * c).reshape(n, c, 1, 1) * height * width
        return (y.numpy().astype(x.dtype), (plane + row * width + col).numpy())


MaxPoolWithIndices.__name__ = "MaxPool"


def run_in_float64(explainer: onnx.ModelProto, x: np.ndarray, target) -> np.ndarray:
    """The attribution of an explainer graph evaluated in float64 (onnx.reference with the
    float64 ops above): the graph's own maths without float32 rounding."""
    from helpers import FLOAT64_OPS, as_double
    from onnx.reference import ReferenceEvaluator

    model = as_double(explainer)
    ops = [Conv, ConvTranspose, MaxPoolWithIndices, AveragePool, *FLOAT64_OPS]
    evaluator = ReferenceEvaluator(model, new_ops=ops)
    return evaluator.run(["attribution"], {model.graph.input[0].name: np.asarray(x, np.float64),
                                           "target": np.asarray(target, np.int64)})[0]
