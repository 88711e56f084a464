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
