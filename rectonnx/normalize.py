"""Put any ONNX classifier into the canonical form the backward rules assume.

Steps, in order (each a small function; the op-level ones live in canonical_ops.py):

1. load: a path, bytes or ``ModelProto``; a clear ``InvalidModelError`` for anything else;
2. weights listed as graph inputs (IR 3) become plain initializers; ``Constant`` nodes too;
3. opset conversion of the ``ai.onnx`` domain to ``TARGET_OPSET`` (17) with onnx's converter,
   run on a copy without the large weights; Gelu/Swish/Mish (newer than 17) are written with
   primitives first, and Resize nodes that were Upsample/Resize-10 keep their old coordinates;
4. constant folding: every node whose inputs are all constant is evaluated once
   (``onnx.reference``), so weights made by ``ConstantOfShape`` & co. become initializers;
   an output that shape inference predicts above ``MAX_FOLDED_ELEMENTS`` (64 Mi elements,
   ``RECTONNX_MAX_FOLDED_ELEMENTS`` or ``normalize(max_folded_elements=)``) and above its
   node's inputs stays computed in the graph, so a tiny file cannot make rewrite fill memory;
5. ``Identity`` and inference-mode ``Dropout`` removed; ``ceil_mode`` dropped from pools whose
   windows are the same in floor mode (onnx's shape inference miscounts some of those);
6. ``BatchNormalization`` with constant statistics folded into the preceding ``Conv``
   (``W' = W s``, ``B' = (B - mean) s + beta`` with ``s = gamma / sqrt(var + eps)``) when that
   Conv feeds only it, otherwise rewritten as ``x * s + (beta - mean s)``; an Einsum that is a
   matrix product becomes MatMul;
7. trailing ``Softmax``/``LogSoftmax`` stripped, so the logits are the scores before it, and an
   ``[N, C, 1, 1]`` score map flattened to ``[N, C]``;
8. shape inference, then the set of "active" tensors: floating-point tensors that depend on the
   data input and lead to the logits; for integer token ids, on the output of their embedding
   Gather instead (``embedding_gather``; docs/maths.md, 'Token models'). Only nodes
   producing active tensors need backward rules; scores of 0 classes and control flow
   (If/Loop/Scan, whose subgraphs read outer tensors by name) on that path are refused with
   UnsupportedModelError;
9. a fixed batch made symbolic where shape inference confirms it is safe, and composite
   activations (Gelu, SiLU, Mish spelt with several nodes) handed to the walker as one node
   each (composites.py).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from .canonical_ops import (decompose_newer_activations, einsum_to_matmul, fix_legacy_resize,
                            symbolic_batch)
from .composites import fuse_composites
from .errors import InvalidModelError, UnsupportedModelError
from .geometry import output_length
from .qoperator import qoperator_to_qdq
from .graphs import consumers, is_large, join_light_copy, light_copy, producers, rename

TARGET_OPSET = 17
OUTPUT_IR_VERSION = 8  # the IR version that goes with opset 17; onnxruntime 1.17+ accepts it
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
NONDETERMINISTIC_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                        "Multinomial", "Bernoulli"}
SCORE_NORMALISERS = {"Softmax", "LogSoftmax"}
SHAPE_ONLY_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
CONTROL_FLOW_OPS = {"If", "Loop", "Scan"}

Dim = int | str | None


@dataclass
class NormalizedModel:
    """A canonical classifier graph and what the backward pass needs to know about it."""

    model: onnx.ModelProto
    input_name: str
    logits_name: str
    shapes: dict[str, tuple[Dim, ...] | None]
    elem_types: dict[str, int]
    constants: dict[str, np.ndarray]
    active: set[str] = field(default_factory=set)
    path_nodes: list[onnx.NodeProto] = field(default_factory=list)
    upcast_from: str | None = None  # "float16" for a half-precision model run in float32
    # token models: the float output of the Gather that embeds the integer input (the
    # differentiable root: ``active``/``path_nodes`` start there), and that Gather's node
    embedding: str | None = None
    embedding_node: str | None = None
    # integer pixels (uint8 images) cast to float inside the model: that Cast's output (the
    # differentiable root; the attribution has the input's shape)
    pixel_cast: str | None = None

    @property
    def graph(self) -> onnx.GraphProto:
        return self.model.graph


# ---------------------------------------------------------------------------------------------
# 1. loading
def load_model(model) -> onnx.ModelProto:
    """A copy of ``model`` as a ``ModelProto``; a path, bytes or proto is accepted."""
    if isinstance(model, onnx.ModelProto):
        return copy.deepcopy(model)
    if isinstance(model, (bytes, bytearray)):
        try:
            return onnx.load_from_string(bytes(model))
        except Exception as exc:  # protobuf raises several types
            raise InvalidModelError(f"the bytes given are not an ONNX model ({exc})") from None
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise InvalidModelError(f"{path}: no such model file")
        try:
            proto = onnx.load(str(path))
        except Exception as exc:
            raise InvalidModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: "
                                    f"{exc}); is the file complete?") from None
        if not proto.graph.node:
            raise InvalidModelError(f"{path}: not an ONNX model (the file parsed to an empty graph)")
        return proto
    raise InvalidModelError(f"expected a path, bytes or onnx.ModelProto, got {type(model).__name__}")


def ai_onnx_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise InvalidModelError("the model imports no ai.onnx opset")


# ---------------------------------------------------------------------------------------------
# 2. initializers and constants
def drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """IR 3 lists every weight as a graph input; weights are initializers, not inputs."""
    init_names = {t.name for t in model.graph.initializer}
    data_inputs = [i for i in model.graph.input if i.name not in init_names]
    del model.graph.input[:]
    model.graph.input.extend(data_inputs)
    if model.ir_version < 4:
        model.ir_version = 4


def constant_nodes_to_initializers(graph: onnx.GraphProto,
                                   max_elements: int | None = None) -> None:
    """``Constant`` nodes become initializers, but a sparse one larger than
    ``folded_elements_limit(max_elements)`` when dense stays a node."""
    keep = []
    limit = None
    for node in graph.node:
        sparse = next((a.sparse_tensor for a in node.attribute if a.name == "sparse_value"), None)
        if sparse is not None:
            limit = folded_elements_limit(max_elements) if limit is None else limit
            if np.prod(sparse.dims, dtype=np.float64) > limit:
                keep.append(node)
                continue
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = _constant_node_value(node)
            graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(_single_node_model(node)).run(None, {})[0]


def _single_node_model(node: onnx.NodeProto) -> onnx.ModelProto:
    out = helper.make_tensor_value_info(node.output[0], TensorProto.UNDEFINED, None)
    graph = helper.make_graph([node], "constant", [], [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", TARGET_OPSET)],
                             ir_version=OUTPUT_IR_VERSION)


# ---------------------------------------------------------------------------------------------
# 3. opset
def convert_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    version = ai_onnx_opset(model)
    if version == TARGET_OPSET:
        return model
    from onnx import version_converter

    hidden = _hide_pads_from_converter(model) if version > TARGET_OPSET else False
    try:
        converted = version_converter.convert_version(model, TARGET_OPSET)
    except Exception as exc:
        raise InvalidModelError(
            f"could not convert the model from opset {version} to opset {TARGET_OPSET} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"re-export it with opset {TARGET_OPSET}") from None
    if hidden:
        _restore_hidden_pads(converted)
    return converted


# onnx's converter has no down-adapter for Pad (opset 18 added the optional ``axes`` input) nor
# for Split (opset 18 added ``num_outputs``), so a model from opset 18+ with either could not be
# converted. A Pad without ``axes`` in constant, reflect or edge mode, and a Split with a ``split``
# input or an even ``num_outputs``, mean the same at opset 17 (an uneven num_outputs split then
# fails shape inference, clearly): park them in a private domain while converting.
_PARKED_DOMAIN = "rectonnx.parked"


def _parkable(node: onnx.NodeProto) -> bool:
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Split":
        return True
    mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
    return (node.op_type == "Pad" and (len(node.input) < 4 or not node.input[3])
            and mode in ("constant", "reflect", "edge"))


def _hide_pads_from_converter(model: onnx.ModelProto) -> bool:
    parked = False
    for node in model.graph.node:
        if _parkable(node):
            node.domain = _PARKED_DOMAIN
            parked = True
    if parked:
        model.opset_import.append(helper.make_opsetid(_PARKED_DOMAIN, 1))
    return parked


def _restore_hidden_pads(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if node.domain == _PARKED_DOMAIN:
            node.domain = ""
            if node.op_type == "Pad":
                del node.input[3:]
            else:  # Split
                kept = [a for a in node.attribute if a.name != "num_outputs"]
                del node.attribute[:]
                node.attribute.extend(kept)
    imports = [o for o in model.opset_import if o.domain != _PARKED_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(imports)


# ---------------------------------------------------------------------------------------------
# 4. constant folding
# A folded constant is held in memory and written into the explainer graph, so a tiny model
# could ask for gigabytes (``ConstantOfShape [45000, 45000]``: 7.8 GB from 3 KB). Outputs larger
# than this many elements, and larger than every input of their node (a Transpose or Cast of a
# big weight is fine: the weight is in the file already), are left unfolded: onnxruntime
# computes them when the graph runs, as it would for the original model.
MAX_FOLDED_ELEMENTS = 64 * 2 ** 20  # 256 MB of float32
MAX_FOLDED_ELEMENTS_VARIABLE = "RECTONNX_MAX_FOLDED_ELEMENTS"


def folded_elements_limit(limit: int | None = None) -> int:
    """The size cap of one folded constant, in elements: ``limit``, else the environment
    variable ``RECTONNX_MAX_FOLDED_ELEMENTS``, else ``MAX_FOLDED_ELEMENTS``."""
    source = "max_folded_elements"
    if limit is None:
        text = os.environ.get(MAX_FOLDED_ELEMENTS_VARIABLE, "").strip()
        if not text:
            return MAX_FOLDED_ELEMENTS
        source = MAX_FOLDED_ELEMENTS_VARIABLE
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{source}={text!r}: expected a number of elements") from None
        if not np.isfinite(number) or number != int(number):
            raise ValueError(f"{source}={text!r}: expected a whole number of elements")
        limit = int(number)
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
        raise ValueError(f"{source} must be an int >= 0, got {limit!r}")
    return int(limit)


def _foldable(node: onnx.NodeProto, constant: set[str]) -> bool:
    return (node.op_type not in NONDETERMINISTIC_OPS and node.domain in ("", "ai.onnx")
            and all(i == "" or i in constant for i in node.input) and len(node.input) > 0
            and not any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute))


def _predicted_elements(model: onnx.ModelProto,
                        nodes: list[onnx.NodeProto]) -> dict[str, int | None]:
    """Element counts of the outputs of ``nodes`` (all-constant) by shape inference, which
    reads the small constants (shapes, repeats, sizes) without evaluating anything; None where
    it cannot tell."""
    graph = model.graph
    small, large = [], []
    for init in graph.initializer:
        (large if is_large(init) else small).append(init)
    outputs = [o for n in nodes for o in n.output if o]
    sub = helper.make_graph(
        nodes, "fold_sizes",
        [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in large],
        [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs],
        small)
    try:
        inferred = shape_inference.infer_shapes(
            helper.make_model(sub, opset_imports=list(model.opset_import),
                              ir_version=OUTPUT_IR_VERSION), strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - nothing known: every size is None
        return {o: None for o in outputs}
    sizes: dict[str, int | None] = {o: None for o in outputs}
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        tensor = info.type.tensor_type
        if info.name in sizes and tensor.HasField("shape") and all(
                d.HasField("dim_value") for d in tensor.shape.dim):
            sizes[info.name] = int(np.prod([d.dim_value for d in tensor.shape.dim],
                                           dtype=np.float64))
    return sizes


HALF_TYPES = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}


def upcast_half_precision(graph: onnx.GraphProto) -> str | None:
    """A float16/bfloat16 model in float32: its weights, inputs, outputs and Casts (the explainer
    then computes and takes inputs in float32; the same graph otherwise). Returns the half type
    it had ("float16", "bfloat16"), or None when the model has no half-precision tensor."""
    found = set()

    def upcast_type(tensor_type) -> None:
        if tensor_type.elem_type in HALF_TYPES:
            found.add(HALF_TYPES[tensor_type.elem_type])
            tensor_type.elem_type = TensorProto.FLOAT

    def upcast_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
        found.add(HALF_TYPES[tensor.data_type])
        return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32),
                                       tensor.name)

    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type in HALF_TYPES:
            graph.initializer[i].CopyFrom(upcast_tensor(tensor))
    for info in [*graph.input, *graph.output, *graph.value_info]:
        upcast_type(info.type.tensor_type)
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i in HALF_TYPES:
                found.add(HALF_TYPES[attribute.i])
                attribute.i = TensorProto.FLOAT
            elif attribute.type == onnx.AttributeProto.TENSOR and \
                    attribute.t.data_type in HALF_TYPES:
                attribute.t.CopyFrom(upcast_tensor(attribute.t))
    if found:
        del graph.value_info[:]  # re-inferred in float32
    return "/".join(sorted(found)) or None


def dequantize_constant_weights(graph: onnx.GraphProto) -> None:
    """``DequantizeLinear`` of constant integers (a QDQ model's weights and biases) becomes its
    float initializer ``(w - zero_point) * scale``: per tensor, per ``axis``, or blocked
    (opset 21 ``block_size`` B: scale and zero point hold one value per B consecutive entries
    along ``axis``, e.g. int4 weight-only quantization). onnx's reference evaluator, which
    folds the other constants, has no DequantizeLinear before opset 19."""
    values = {t.name: t for t in graph.initializer}
    kept = []
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type != "DequantizeLinear" or not all(i in values for i in inputs):
            kept.append(node)
            continue
        attributes = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
        w = numpy_helper.to_array(values[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(values[node.input[1]]).astype(np.float32)
        zero = numpy_helper.to_array(values[node.input[2]]).astype(np.float32) \
            if len(node.input) > 2 and node.input[2] else np.zeros_like(scale)
        block = attributes.get("block_size", 0)
        if block and w.ndim:
            axis = attributes.get("axis", 1) % w.ndim
            size = w.shape[axis]
            if scale.shape[axis] != -(-size // block):
                raise InvalidModelError(
                    f"DequantizeLinear {node.name or node.output[0]!r}: block_size {block} "
                    f"along axis {axis} needs {-(-size // block)} scales there, the scale has "
                    f"shape {list(scale.shape)}")
            scale, zero = (np.take(np.repeat(v, block, axis=axis), np.arange(size), axis=axis)
                           for v in (scale, zero))
        elif scale.ndim == 1 and scale.size > 1 and w.ndim > 1:
            axis = attributes.get("axis", 1) % w.ndim
            shape = [1] * w.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        real = ((w - zero) * scale).astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(real, node.output[0]))
    del graph.node[:]
    graph.node.extend(kept)


def fold_constants(model: onnx.ModelProto, max_elements: int | None = None) -> None:
    """Evaluate, once, every node whose inputs are all constant and replace it by initializers.

    Outputs whose size shape inference predicts above ``max_elements`` (``folded_elements_limit``)
    and above the size of each input of their node stay computed in the graph, and so do the
    nodes after them; nothing is evaluated before its size is known, except ops whose size
    shape inference cannot tell from constant inputs (NonZero, Unique: bounded by their inputs).
    """
    limit = folded_elements_limit(max_elements)
    graph = model.graph
    while True:
        constant = {t.name for t in graph.initializer}
        foldable: list[int] = []
        for index, node in enumerate(graph.node):
            if _foldable(node, constant):
                foldable.append(index)
                constant.update(o for o in node.output if o)
        if not foldable:
            return
        chosen, deferred = _within_limit(model, foldable, limit)
        if chosen:
            _evaluate_into_initializers(model, chosen)
        if not chosen or not deferred:
            return


def _within_limit(model: onnx.ModelProto, foldable: list[int],
                  limit: int) -> tuple[list[int], bool]:
    """The nodes (indices into ``graph.node``) of ``foldable`` to evaluate now, and whether
    others may be folded after them (their sizes are known once their inputs are)."""
    nodes = model.graph.node
    sizes = _predicted_elements(model, [nodes[i] for i in foldable])
    sizes.update({t.name: int(np.prod(t.dims, dtype=np.float64))
                  for t in model.graph.initializer})
    initializers = {t.name for t in model.graph.initializer}
    chosen, held = [], set()
    deferred = False
    for index in foldable:
        node = nodes[index]
        outputs = [o for o in node.output if o]
        if any(i in held for i in node.input):
            held.update(outputs)
            continue
        predicted = [sizes.get(o) for o in outputs]
        if any(n is None for n in predicted):
            if not all(i == "" or i in initializers for i in node.input):
                deferred = True  # known after its inputs are folded: next round
                held.update(outputs)
                continue
        else:
            largest_input = max((sizes.get(i) or 0 for i in node.input if i), default=0)
            if max(predicted, default=0) > max(limit, largest_input):
                held.update(outputs)
                continue
        chosen.append(index)
    return chosen, deferred


def _evaluate_into_initializers(model: onnx.ModelProto, indices: list[int]) -> None:
    graph = model.graph
    picked = set(indices)
    chosen = [graph.node[i] for i in indices]
    folded_outputs = {o for n in chosen for o in n.output if o}
    consumed = {i for k, n in enumerate(graph.node) if k not in picked for i in n.input}
    consumed |= {o.name for o in graph.output}
    wanted = sorted(folded_outputs & consumed)
    from onnx.reference import ReferenceEvaluator

    sub = helper.make_graph(
        chosen, "fold", [],
        [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None) for name in wanted],
        initializer=list(graph.initializer))
    submodel = helper.make_model(sub, opset_imports=list(model.opset_import),
                                 ir_version=OUTPUT_IR_VERSION)
    try:
        values = ReferenceEvaluator(submodel).run(None, {}) if wanted else []
    except Exception as exc:
        raise InvalidModelError(f"could not fold the model's constant subgraphs "
                                f"({type(exc).__name__}: {exc})") from None
    remaining = [n for k, n in enumerate(graph.node) if k not in picked]
    del graph.node[:]
    graph.node.extend(remaining)
    for name, value in zip(wanted, values):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))


# ---------------------------------------------------------------------------------------------
# 5. identities
def remove_identities(graph: onnx.GraphProto) -> None:
    """Drop Identity and Dropout (inference mode: output 0 is the input)."""
    output_names = {o.name for o in graph.output}
    for node in list(graph.node):
        if node.op_type not in ("Identity", "Dropout") or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
            if any(node.output[1] in n.input for n in graph.node):
                continue  # its mask is used: keep the node (it then has no rule and is reported)
        source, result = node.input[0], node.output[0]
        graph.node.remove(node)
        if result in output_names:
            # keep the output's name: rename the producer's tensor instead
            rename(graph, source, result)
        else:
            rename(graph, result, source, in_outputs=False, in_graph_io=False)


def drop_redundant_ceil_mode(model: onnx.ModelProto) -> onnx.ModelProto:
    """Set ``ceil_mode = 0`` on pools where it changes nothing; return the shape-inferred model.

    A ceil-mode window must start inside the input or the left padding (ONNX, onnxruntime,
    PyTorch), so e.g. MaxPool(3, stride 3, pad 1, ceil) on 5 pixels has 2 outputs, as in floor
    mode; onnx's shape inference ignores that rule and says 3, and every static shape after it
    would be wrong. Where both modes give the same windows, floor mode is the same op and
    everyone agrees on it. Pools are settled one at a time, re-inferring shapes in between.
    """
    while True:
        model = infer_shapes(model)
        shapes, _ = shape_table(model)
        node = next((n for n in model.graph.node if _ceil_mode_is_redundant(n, shapes)), None)
        if node is None:
            return model
        for attribute in node.attribute:
            if attribute.name == "ceil_mode":
                attribute.i = 0


def _ceil_mode_is_redundant(node: onnx.NodeProto, shapes) -> bool:
    if node.op_type not in ("MaxPool", "AveragePool") or node.domain not in ("", "ai.onnx"):
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    if not attrs.get("ceil_mode", 0) or auto_pad not in (b"NOTSET", b""):
        return False
    shape = shapes.get(node.input[0])
    sizes = list(shape[2:]) if shape is not None else []
    kernel = list(attrs.get("kernel_shape", []))
    if not sizes or not all(isinstance(n, int) for n in sizes) or len(kernel) != len(sizes):
        return False
    rank = len(kernel)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    pads = list(attrs.get("pads", [0] * 2 * rank))
    return all(
        output_length(sizes[i], kernel[i], strides[i], dilations[i], pads[i], pads[rank + i], True)
        == output_length(sizes[i], kernel[i], strides[i], dilations[i], pads[i], pads[rank + i])
        for i in range(rank))


# ---------------------------------------------------------------------------------------------
# 6. batch normalisation
def fold_batch_norms(graph: onnx.GraphProto) -> None:
    inits = {t.name: t for t in graph.initializer}
    readers, writers = consumers(graph), producers(graph)
    for node in list(graph.node):
        if node.op_type != "BatchNormalization" or not all(i in inits for i in node.input[1:5]):
            continue
        if len(node.output) > 1 and any(node.output[1:]):
            continue  # training-mode outputs: leave it (no rule, reported later)
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64)
                                  for i in node.input[1:5])
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        x = node.input[0]
        conv = writers.get(x)
        if (conv is not None and conv.op_type == "Conv" and len(readers[x]) == 1
                and conv.input[1] in inits and (len(conv.input) < 3 or conv.input[2] in inits)
                and x not in {o.name for o in graph.output}):
            _fold_into_conv(graph, conv, node, scale, shift, inits)
        else:
            _batch_norm_as_affine(graph, node, scale, shift)


def _fold_into_conv(graph, conv, bn, scale, shift, inits) -> None:
    weight = numpy_helper.to_array(inits[conv.input[1]])
    bias = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
            if len(conv.input) > 2 and conv.input[2] else np.zeros(weight.shape[0]))
    new_w = (weight * scale.reshape(-1, *[1] * (weight.ndim - 1))).astype(weight.dtype)
    new_b = (bias * scale + shift).astype(weight.dtype)
    w_name, b_name = f"{conv.name or conv.output[0]}/W_bn", f"{conv.name or conv.output[0]}/B_bn"
    graph.initializer.extend([numpy_helper.from_array(new_w, w_name),
                              numpy_helper.from_array(new_b, b_name)])
    del conv.input[1:]
    conv.input.extend([w_name, b_name])
    conv.output[0] = bn.output[0]
    graph.node.remove(bn)


def _batch_norm_as_affine(graph, bn, scale, shift) -> None:
    rank = _rank_of(graph, bn.input[0]) or 4
    shape = (-1,) + (1,) * (rank - 2)
    base = bn.name or bn.output[0]
    s_name, b_name, mid = f"{base}/scale", f"{base}/shift", f"{base}/scaled"
    graph.initializer.extend([
        numpy_helper.from_array(scale.reshape(shape).astype(np.float32), s_name),
        numpy_helper.from_array(shift.reshape(shape).astype(np.float32), b_name)])
    index = list(graph.node).index(bn)
    graph.node.remove(bn)
    graph.node.insert(index, helper.make_node("Add", [mid, b_name], [bn.output[0]],
                                              name=f"{base}/add"))
    graph.node.insert(index, helper.make_node("Mul", [bn.input[0], s_name], [mid],
                                              name=f"{base}/mul"))


def _rank_of(graph: onnx.GraphProto, name: str) -> int | None:
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        if info.name == name and info.type.tensor_type.HasField("shape"):
            return len(info.type.tensor_type.shape.dim)
    return None


# ---------------------------------------------------------------------------------------------
# 7. logits
def choose_output(graph: onnx.GraphProto, output_name: str | None) -> str:
    names = [o.name for o in graph.output]
    if output_name is not None:
        if output_name not in names:
            raise InvalidModelError(f"the model has no output {output_name!r}; outputs: {names}")
        return output_name
    if len(names) != 1:
        raise InvalidModelError(f"the model has {len(names)} outputs {names}: say which one holds "
                                "the class scores (output_name=...)")
    return names[0]


def strip_score_normalisers(graph: onnx.GraphProto, output: str) -> str:
    """The logits tensor: ``output`` with trailing Softmax/LogSoftmax (and the reshapes around
    them that opset conversion adds) walked back over."""
    writers = producers(graph)
    name = output
    while True:
        cursor = name
        while cursor in writers and writers[cursor].op_type in SHAPE_ONLY_OPS:
            cursor = writers[cursor].input[0]
        if cursor in writers and writers[cursor].op_type in SCORE_NORMALISERS:
            name = writers[cursor].input[0]
        else:
            return name


# ---------------------------------------------------------------------------------------------
# 8. shapes and the active path
def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its ``value_info`` filled by onnx's shape inference (data propagation on),
    run on the light copy (``graphs.light_copy``)."""
    graph = model.graph
    light, _ = light_copy(model)
    del light.graph.value_info[:]
    try:
        inferred = shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise InvalidModelError(f"shape inference failed on the model ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0]})") from None
    del graph.value_info[:]
    graph.value_info.extend(inferred.graph.value_info)
    del graph.output[:]
    graph.output.extend(inferred.graph.output)
    return model


def shape_table(model: onnx.ModelProto) -> tuple[dict[str, tuple | None], dict[str, int]]:
    shapes: dict[str, tuple | None] = {}
    types: dict[str, int] = {}
    graph = model.graph
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor_type = info.type.tensor_type
        types[info.name] = tensor_type.elem_type
        if not tensor_type.HasField("shape"):
            shapes[info.name] = None
            continue
        shapes[info.name] = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim)
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
        types[init.name] = init.data_type
    return shapes, types


def subgraph_inputs(node: onnx.NodeProto) -> list[str]:
    """The tensors of the enclosing graph that a node's subgraphs (If branches, Loop and Scan
    bodies) read by name, without listing them as inputs."""
    names = []
    for attribute in node.attribute:
        graphs = ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else
                  list(attribute.graphs) if attribute.type == onnx.AttributeProto.GRAPHS else [])
        for sub in graphs:
            defined = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            for inner in sub.node:
                names += [name for name in [*inner.input, *subgraph_inputs(inner)]
                          if name and name not in defined]
                defined.update(inner.output)
    return names


def active_path(graph: onnx.GraphProto, input_name: str, logits_name: str,
                types: dict[str, int]) -> tuple[set[str], list[onnx.NodeProto]]:
    """Float tensors that depend on the input and lead to the logits, and their producers
    (a node with subgraphs also reads what they read from the outer graph)."""
    reads = [[*node.input, *subgraph_inputs(node)] for node in graph.node]
    depends = {input_name}
    for node, inputs in zip(graph.node, reads):  # topologically sorted (checked by onnx.checker)
        if any(i in depends for i in inputs):
            # a quantizer's integer output carries the gradient to its DequantizeLinear
            # (rules/quantize.py: the straight-through estimator)
            depends.update(o for o in node.output
                           if o and (types.get(o, TensorProto.FLOAT) in FLOAT_TYPES
                                     or node.op_type == "QuantizeLinear"))
    needed = {logits_name}
    path: list[onnx.NodeProto] = []
    for node, inputs in zip(reversed(graph.node), reversed(reads)):
        if any(o in needed and o in depends for o in node.output):
            path.append(node)
            needed.update(inputs)
    active = depends & needed
    path.reverse()
    return active, path


# ---------------------------------------------------------------------------------------------
def normalize(model, *, input_name: str | None = None, output_name: str | None = None,
              max_folded_elements: int | None = None) -> NormalizedModel:
    """Load ``model`` and return it in canonical form with the tables the rules need.

    ``max_folded_elements``: the size cap of one folded constant (``folded_elements_limit``).
    """
    folded_elements_limit(max_folded_elements)  # a bad setting fails before any work
    proto = load_model(model)
    if not proto.graph.output:
        raise InvalidModelError("the model has no outputs")
    drop_initializer_inputs(proto)
    constant_nodes_to_initializers(proto.graph, max_folded_elements)
    qoperator_to_qdq(proto.graph)  # QLinearConv & co. as float ops between DQ and Q
    dequantize_constant_weights(proto.graph)  # before the opset converter: blocked (opset 21)
    light, large = light_copy(proto)
    try:
        onnx.checker.check_model(light)
    except Exception as exc:
        raise InvalidModelError(f"the model is not valid ONNX: {str(exc).splitlines()[0]}") from None
    source_opset = ai_onnx_opset(light)
    if source_opset > TARGET_OPSET:
        decompose_newer_activations(light.graph)
    light = convert_opset(light)
    if source_opset <= 10:
        fix_legacy_resize(light.graph)
    proto = join_light_copy(light, large)
    proto.ir_version = OUTPUT_IR_VERSION
    constant_nodes_to_initializers(proto.graph, max_folded_elements)
    upcast = upcast_half_precision(proto.graph)
    fold_constants(proto, max_folded_elements)
    remove_identities(proto.graph)
    proto = drop_redundant_ceil_mode(proto)
    fold_batch_norms(proto.graph)
    if any(n.op_type == "Einsum" for n in proto.graph.node):
        shapes, _ = shape_table(proto)
        einsum_to_matmul(proto.graph, {k: None if v is None else len(v)
                                       for k, v in shapes.items()})
    output = choose_output(proto.graph, output_name)
    logits = strip_score_normalisers(proto.graph, output)

    init_names = {t.name for t in proto.graph.initializer}
    data_inputs = [i.name for i in proto.graph.input if i.name not in init_names]
    if input_name is None and len(data_inputs) > 1:
        input_name = token_input(proto.graph, data_inputs)
    if input_name is None:
        if len(data_inputs) != 1:
            raise InvalidModelError(f"the model has {len(data_inputs)} data inputs {data_inputs}: "
                                    "say which one is the image (input_name=...)")
        input_name = data_inputs[0]
    elif input_name not in data_inputs:
        raise InvalidModelError(f"the model has no input {input_name!r}; inputs: {data_inputs}")

    proto = infer_shapes(proto)
    shapes, types = shape_table(proto)
    embedding = pixel_cast = None
    if types.get(input_name) in INTEGER_TYPES:
        embedding = embedding_gather(proto.graph, input_name)
        if embedding is None:
            pixel_cast = float_cast(proto.graph, input_name)
    if types.get(input_name) != TensorProto.FLOAT and embedding is None and pixel_cast is None:
        raise InvalidModelError(
            f"input {input_name!r} has element type "
            f"{TensorProto.DataType.Name(types.get(input_name, 0))}; rectonnx explains float32 "
            "inputs, integer pixels that a Cast turns into floats first (attributed at the "
            "Cast's output), and integer token ids that index a constant float embedding "
            "table (Gather)")
    root = embedding.output[0] if embedding is not None else \
        pixel_cast.output[0] if pixel_cast is not None else input_name
    logits_shape = shapes.get(logits)
    if logits_shape is not None and len(logits_shape) == 4 and tuple(logits_shape[2:]) == (1, 1):
        flat = logits + "/flat"
        proto.graph.node.append(helper.make_node("Flatten", [logits], [flat], axis=1,
                                                 name=f"{logits}/flatten"))
        logits = flat
        proto = infer_shapes(proto)
        shapes, types = shape_table(proto)
    logits_shape = shapes.get(logits)
    if logits_shape is not None and len(logits_shape) != 2:
        raise InvalidModelError(f"the class scores {logits!r} have shape {list(logits_shape)}; "
                                "expected [N, C] (or [N, C, 1, 1])")
    if logits_shape is not None and logits_shape[1] == 0:
        raise UnsupportedModelError(f"the scores {logits!r} have 0 classes (shape "
                                    f"{list(logits_shape)}): there is no class to explain")

    active, path = _active_from(proto.graph, root, logits, types)
    control = [(n.op_type, n.name or f"producing {n.output[0]!r}") for n in path
               if n.op_type in CONTROL_FLOW_OPS or subgraph_inputs(n)
               or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                      for a in n.attribute)]
    if control:
        listing = ", ".join(f"{op} (node {name!r})" for op, name in control)
        raise UnsupportedModelError(
            f"control-flow ops (If/Loop/Scan) are not supported between the input and the "
            f"logits: {listing}; export the model without data-dependent control flow (trace "
            "it with the branch it takes, or fold constant conditions with onnx-simplifier)",
            control)
    if root not in active:
        raise InvalidModelError(f"the scores {logits!r} do not depend on input {input_name!r}")
    if symbolic_batch(proto, input_name, logits, active, infer_shapes,
                      lambda m: light_copy(m)[0]):
        proto = infer_shapes(proto)
        shapes, types = shape_table(proto)
        active, path = _active_from(proto.graph, root, logits, types)
    constants = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    path = fuse_composites(proto.graph, path, constants)
    return NormalizedModel(proto, input_name, logits, shapes, types, constants, active, path,
                           upcast, embedding=None if embedding is None else root,
                           embedding_node=None if embedding is None else embedding.name,
                           pixel_cast=None if pixel_cast is None else root)


def _active_from(graph: onnx.GraphProto, root: str, logits: str,
                 types: dict[str, int]) -> tuple[set[str], list[onnx.NodeProto]]:
    """``active_path`` from ``root`` (the input, or a token model's embedding output, whose
    Gather is then no path node)."""
    active, path = active_path(graph, root, logits, types)
    return active, [n for n in path if root not in n.output]


# ---------------------------------------------------------------------------------------------
# token inputs
INTEGER_TYPES = {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8,
                 TensorProto.UINT64, TensorProto.UINT32, TensorProto.UINT16, TensorProto.UINT8}
SHAPE_READERS = {"Shape", "Size"}  # read a tensor's shape, not its values


def value_dependents(graph: onnx.GraphProto, name: str) -> set[str]:
    """Tensors whose values depend on the values of ``name`` (any element type; a ``Shape``
    or ``Size`` of it depends on its shape only, e.g. BERT's position ids)."""
    depends = {name}
    for node in graph.node:
        if node.op_type not in SHAPE_READERS and any(i in depends for i in node.input):
            depends.update(o for o in node.output if o)
    return depends


def _float_table(graph: onnx.GraphProto, name: str) -> onnx.TensorProto | None:
    table = next((t for t in graph.initializer if t.name == name), None)
    if table is None or table.data_type not in FLOAT_TYPES or len(table.dims) != 2:
        return None
    return table


def embedding_gather(graph: onnx.GraphProto, input_name: str) -> onnx.NodeProto | None:
    """The embedding of integer input ``input_name``: the first Gather (topological order)
    whose indices depend on its values and whose data is a constant float table ``[V, D]``
    (axis 0); None when there is none."""
    depends = value_dependents(graph, input_name)
    for node in graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in depends \
                and _float_table(graph, node.input[0]) is not None \
                and all(a.i == 0 for a in node.attribute if a.name == "axis"):
            return node
    return None


def float_cast(graph: onnx.GraphProto, input_name: str) -> onnx.NodeProto | None:
    """The Cast that turns integer input ``input_name`` (uint8 pixels) into floats, when it is
    the only node that reads the input's values (Shape and Size read only its shape)."""
    readers = consumers(graph).get(input_name, [])
    casts = [n for n in readers if n.op_type == "Cast" and any(
        a.name == "to" and a.i in FLOAT_TYPES for a in n.attribute)]
    others = [n for n in readers if n not in casts and n.op_type not in ("Shape", "Size")]
    return casts[0] if len(casts) == 1 and not others else None


def token_input(graph: onnx.GraphProto, data_inputs: list[str]) -> str | None:
    """Of several data inputs, the integer one whose embedding table has the most rows (the
    token ids: BERT's token type ids index a 2-row table, the attention mask none); None when
    there is no such input or two tie."""
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    rows = {}
    for name in data_inputs:
        if types.get(name) in INTEGER_TYPES:
            node = embedding_gather(graph, name)
            if node is not None:
                rows[name] = _float_table(graph, node.input[0]).dims[0]
    if not rows:
        return None
    most = max(rows.values())
    best = [name for name, n in rows.items() if n == most]
    return best[0] if len(best) == 1 else None
