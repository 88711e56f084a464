"""Half-precision explainers: a float16 model explained as it is deployed (docs/maths.md,
'Half-precision models').

``rewrite`` always builds the explainer in float32 first (normalize.upcast_half_precision upcasts
a half model's weights, inputs, outputs and Casts; every float16 value is exact in float32).
Option ``precision`` then decides what the graph computes in, for a float16 source model only
(it is ignored for float32 models):

* ``"model"`` (default): ``in_float16`` converts that graph to compute in float16: every float32
  tensor of the forward and backward pass becomes float16, the weights are rounded back to
  float16 (exact for the model's own weights; a folded BatchNorm's ``W s`` is rounded once), and
  Casts to float32 cast to float16. The data input takes the model's own input type (float16
  for a ``.half()`` export); ``logits`` and ``attribution`` (and ``attribution/<node>``) are
  float16, as the model's scores and the gradient of a float16 input are.
* ``"fp32"``: the float32 graph unchanged (today's behaviour: equal to torch autograd of the net
  in float32 with the float16 weights).

What stays float32 in the float16 graph, and why:

* the percentile threshold (RectGrad's per-layer ``tau``, the final threshold): its nodes are
  found from the graph, not from names: for each comparison ``Greater(scores, cut)`` emitted by
  rectonnx (scopes ``grad/``, ``final_threshold/``, ``attribution/``) they are the nodes that
  ``cut`` depends on and ``scores`` does not (TopK, the two-stage selection, bisection's
  counting, the subsample of ``approx``, ``q`` from the ``q`` input), plus the comparison itself.
  The importance scores ``y R`` are computed in float16 like the rest of the backward pass and
  cast up exactly, so ``tau`` is one of those float16 values (TopK) and the gate
  ``I(y R > tau)`` is the one of the float16 scores; a constant ``tau`` (or a ReLU's 0) that
  float16 holds exactly is compared in float16, any other in float32. Bisection's counts
  (float sums of 0/1, exact below 2^24 in float32 but only below 2^11 in float16) and its
  float32 bit search need float32.
* the ``target`` input (int64) and ``q`` (float64) keep their types.

Constants rectonnx adds (epsilons, scales) are rounded to float16 with two guards: a non-zero
value below the smallest float16 subnormal (2^-24) becomes +-2^-24 instead of 0, so a stabiliser
never vanishes, and a value beyond 65504 becomes +-65504 instead of infinity.

The conversion is this module's own pass, not onnxruntime's ``convert_float_to_float16``: given
the threshold nodes as ``node_block_list`` (1.31) that one casts every output of a blocked node
back to float16, so the threshold's float32 chain round-trips through float16 between its nodes
(756 times in test_precision's small CNN with bisection, whose counts above 2048 would round),
and it appends its Casts after the nodes that read them (the graph is not topologically sorted:
onnx.checker and onnx.reference refuse it). The benchmark uses it only to make float16 models.

bfloat16 models are explained in float32 with a ``UserWarning`` (``precision="model"`` computes
in float16 only: onnxruntime and OpenVINO run few bfloat16 kernels on CPUs, and a float16
graph would not be the model as deployed either).

Runtimes (docs/maths.md, 'Half-precision models'; benchmarks/fp16.py): ``onnx.reference`` runs
the float16 graph; onnxruntime 1.31's CPU provider runs the ``runtime="onnxruntime-cpu"`` graph
(which ``Explainer`` picks on that provider) but has no float16 ``ScatterElements`` with
``reduction="add"`` (the portable max-pool backward): ``Explainer`` then fails with a message
naming ``precision="fp32"`` and the CUDA provider (runtime._half_failure); OpenVINO's CPU plugin
runs the portable graph.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP16_MIN = float(np.finfo(np.float16).smallest_subnormal)  # 2^-24
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
BUILDER_SCOPES = ("grad/", "final_threshold/", "attribution/")
# inputs that ONNX types as float32 whatever the data's type (Resize's scales)
FLOAT32_INPUTS = {"Resize": {2}}
# ops whose output does not depend on the values of their inputs: no Cast in front of them
SHAPE_READERS = {"Shape", "Size"}
# ops with a dtype attribute that creates float tensors
DTYPE_OPS = {"EyeLike", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
             "Multinomial", "Bernoulli"}


class PrecisionWarning(UserWarning):
    """The explainer computes in another precision than the one asked for (bfloat16 models)."""


def source_float_type(model: onnx.ModelProto, input_name: str) -> int | None:
    """The element type of ``input_name`` in the (unnormalised) source model, or None."""
    for value in model.graph.input:
        if value.name == input_name:
            return value.type.tensor_type.elem_type
    return None


def in_precision(explainer: onnx.ModelProto, source: onnx.ModelProto, input_name: str,
                 upcast_from: str | None, precision: str) -> tuple[onnx.ModelProto, str | None]:
    """``explainer`` (built in float32) in the precision option ``precision`` asks for, and the
    precision it computes in ("float16", "float32"; None for a float32 source model)."""
    if not upcast_from:
        return explainer, None
    if precision == "fp32":
        return explainer, "float32"
    if upcast_from != "float16":
        warnings.warn(PrecisionWarning(
            f"the model is {upcast_from}: its explainer computes in float32 with the weights "
            "upcast (precision='model' computes in float16 only; pass precision='fp32' to "
            "silence this)"), stacklevel=3)
        return explainer, "float32"
    data_type = source_float_type(source, input_name)
    keep_input = data_type in (TensorProto.FLOAT, TensorProto.DOUBLE) and data_type is not None
    return in_float16(explainer, keep_input_float32=keep_input), "float16"


# -- which nodes stay float32 ------------------------------------------------------------------
def _ancestors(tensor: str, producer: dict[str, int], nodes) -> set[int]:
    seen: set[int] = set()
    stack = [tensor]
    while stack:
        index = producer.get(stack.pop())
        if index is None or index in seen:
            continue
        seen.add(index)
        stack.extend(i for i in nodes[index].input if i)
    return seen


def threshold_nodes(graph: onnx.GraphProto) -> set[int]:
    """Indices of the nodes that compute a percentile threshold and the comparisons against it
    (module docstring): for ``Greater(scores, cut)`` in rectonnx's scopes, the ancestors of
    ``cut`` that are not ancestors of ``scores``, and the Greater itself; a Greater against a
    constant only when float16 cannot hold that constant exactly."""
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    constants = {t.name: t for t in graph.initializer}
    blocked: set[int] = set()
    for i, node in enumerate(nodes):
        if node.op_type != "Greater" or not node.name.startswith(BUILDER_SCOPES):
            continue
        cut = _ancestors(node.input[1], producer, nodes)
        cone = cut - _ancestors(node.input[0], producer, nodes)
        if cone or _inexact_in_float16(constants.get(node.input[1])):
            blocked |= cone | {i}
    return blocked


def _inexact_in_float16(tensor: onnx.TensorProto | None) -> bool:
    """A float32 constant that float16 cannot hold exactly (a RectGrad ``tau`` of 1e-4; a
    ReLU's 0 is exact, so its comparison stays float16)."""
    if tensor is None or tensor.data_type != TensorProto.FLOAT:
        return False
    values = numpy_helper.to_array(tensor)
    return bool((values.astype(np.float16).astype(np.float32) != values).any())


# -- the conversion ----------------------------------------------------------------------------
def _half_array(array: np.ndarray) -> np.ndarray:
    """float32 constants to float16 with the guards of the module docstring."""
    values = np.asarray(array, np.float32)
    tiny = (values != 0) & (np.abs(values) < FP16_MIN)
    values = np.where(tiny, np.copysign(FP16_MIN, values), values)
    return np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16)


def _half_tensor(tensor: onnx.TensorProto, name: str | None = None) -> onnx.TensorProto:
    return numpy_helper.from_array(_half_array(numpy_helper.to_array(tensor)),
                                   tensor.name if name is None else name)


def _float_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor (shape inference without the large weights)."""
    from .graphs import light_copy

    light = light_copy(model)[0]
    inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    types = {}
    g = inferred.graph
    for value in [*g.input, *g.output, *g.value_info]:
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for tensor in model.graph.initializer:
        types[tensor.name] = tensor.data_type
    return types


def in_float16(model: onnx.ModelProto, *, keep_input_float32: bool = False) -> onnx.ModelProto:
    """The float32 explainer ``model`` computing in float16 except its threshold nodes (module
    docstring). ``keep_input_float32``: the data input stays float32 (a model whose own input
    is float32 and casts to float16 inside) and is cast to float16 at the start."""
    types = _float_types(model)
    graph = model.graph
    blocked = threshold_nodes(graph)
    nodes = list(graph.node)
    initializers = {t.name: t for t in graph.initializer}
    # where each float32 tensor lives: "half" (converted) or "full" (float32)
    half: set[str] = set()
    for value in graph.input:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT and not (
                keep_input_float32 and value.name == graph.input[0].name):
            half.add(value.name)
    for i, node in enumerate(nodes):
        if i in blocked:
            continue
        for out in node.output:
            if out and types.get(out) == TensorProto.FLOAT:
                half.add(out)
    new_nodes: list[onnx.NodeProto] = []
    new_initializers: dict[str, onnx.TensorProto] = {}
    casts: dict[tuple[str, int], str] = {}  # (tensor, to) -> its cast
    taken = {n for node in nodes for n in [*node.input, *node.output]} | set(initializers)
    taken |= {v.name for v in [*graph.input, *graph.output]}

    def fresh(base: str) -> str:
        name, count = base, 0
        while name in taken:
            count += 1
            name = f"{base}_{count}"
        taken.add(name)
        return name

    def initializer_as(name: str, to: int) -> str:
        """An initializer as float16 (``to`` FLOAT16) or float32, shared by its readers."""
        tensor = initializers[name]
        if to == TensorProto.FLOAT16:
            key = name if name not in used_full else fresh(name + "/fp16")
            if (name, to) not in casts:
                new_initializers[key] = _half_tensor(tensor, key)
                casts[(name, to)] = key
            return casts[(name, to)]
        used_full.add(name)
        new_initializers.setdefault(name, tensor)
        return name

    def cast(name: str, to: int) -> str:
        if (name, to) not in casts:
            out = fresh(f"{name}/{'fp16' if to == TensorProto.FLOAT16 else 'fp32'}")
            new_nodes.append(helper.make_node("Cast", [name], [out], to=to,
                                              name=fresh(f"{out}/cast")))
            casts[(name, to)] = out
        return casts[(name, to)]

    # initializers read at full precision keep their name; read both ways, the half copy is
    # renamed: collect the full readers first
    used_full: set[str] = set()
    for i, node in enumerate(nodes):
        for k, name in enumerate(node.input):
            if name in initializers and initializers[name].data_type == TensorProto.FLOAT and (
                    i in blocked or k in FLOAT32_INPUTS.get(node.op_type, ())):
                used_full.add(name)

    for i, node in enumerate(nodes):
        node = onnx.NodeProto.FromString(node.SerializeToString())
        wants_half = i not in blocked
        for k, name in enumerate(node.input):
            if not name:
                continue
            full_input = not wants_half or k in FLOAT32_INPUTS.get(node.op_type, ())
            if name in initializers:
                if initializers[name].data_type == TensorProto.FLOAT:
                    node.input[k] = initializer_as(
                        name, TensorProto.FLOAT if full_input else TensorProto.FLOAT16)
                else:
                    new_initializers.setdefault(name, initializers[name])
                continue
            if types.get(name) != TensorProto.FLOAT and name not in half:
                continue  # not a float32 tensor (int64, bool, float64)
            if full_input and name in half and node.op_type not in SHAPE_READERS:
                node.input[k] = cast(name, TensorProto.FLOAT)
            elif not full_input and name not in half:
                node.input[k] = cast(name, TensorProto.FLOAT16)
        if wants_half:
            _attributes_to_half(node)
        new_nodes.append(node)

    # graph outputs: float16 (the graph computes in float16); float32 ones produced by blocked
    # nodes are cast down so every output has one type
    renamed_outputs = {}
    for value in graph.output:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT and value.name not in half:
            renamed_outputs[value.name] = value.name
    if renamed_outputs:  # rename the producer's output, cast it down to the output's name
        for node in new_nodes:
            for k, out in enumerate(node.output):
                if out in renamed_outputs:
                    inner = fresh(out + "/fp32")
                    node.output[k] = inner
                    for other in new_nodes:
                        for j, name in enumerate(other.input):
                            if name == out:
                                other.input[j] = inner
                    renamed_outputs[out] = inner
        for out, inner in renamed_outputs.items():
            new_nodes.append(helper.make_node("Cast", [inner], [out], to=TensorProto.FLOAT16,
                                              name=fresh(out + "/cast")))
    inputs = []
    for value in graph.input:
        value = onnx.ValueInfoProto.FromString(value.SerializeToString())
        if value.name in half:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
        inputs.append(value)
    outputs = []
    for value in graph.output:
        value = onnx.ValueInfoProto.FromString(value.SerializeToString())
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
        outputs.append(value)
    # a float32 data input (keep_input_float32) was cast to float16 where it is read (``cast``)
    result = helper.make_graph(new_nodes, graph.name, inputs, outputs,
                               list(new_initializers.values()))
    converted = helper.make_model(result, opset_imports=list(model.opset_import),
                                  ir_version=model.ir_version,
                                  producer_name=model.producer_name)
    converted.metadata_props.extend(model.metadata_props)
    return converted


def _attributes_to_half(node: onnx.NodeProto) -> None:
    """A node that computes in float16: Casts to float32 cast to float16, float tensor
    attributes (ConstantOfShape's value) and float dtypes become float16."""
    for attribute in node.attribute:
        if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT:
            attribute.i = TensorProto.FLOAT16
        elif node.op_type in DTYPE_OPS and attribute.name == "dtype" and \
                attribute.i == TensorProto.FLOAT:
            attribute.i = TensorProto.FLOAT16
        elif attribute.type == onnx.AttributeProto.TENSOR and \
                attribute.t.data_type == TensorProto.FLOAT:
            attribute.t.CopyFrom(_half_tensor(attribute.t))
    if node.op_type in ("RandomNormal", "RandomUniform") and \
            not any(a.name == "dtype" for a in node.attribute):
        node.attribute.append(helper.make_attribute("dtype", TensorProto.FLOAT16))
    if node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in node.attribute):
        # the default value is a float32 0
        node.attribute.append(helper.make_attribute(
            "value", helper.make_tensor("value", TensorProto.FLOAT16, [1], [0.0])))
