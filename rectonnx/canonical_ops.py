"""Op-level rewrites of the normaliser (normalize.py calls them; each is one small function).

* ``decompose_newer_activations``: Gelu (opset 20), Swish (24) and Mish (18) have no older
  versions, so onnx's converter cannot take a model that uses them down to opset 17. They are
  written with opset-17 primitives first (``x * 0.5 * (1 + Erf(x / sqrt 2))``, the tanh form,
  ``x * Sigmoid(alpha x)``, ``x * Tanh(Softplus(x))``); composites.py recognises them again, so
  the unit is still differentiated and gated as one activation.
* ``fix_legacy_resize``: Upsample (opset 7-9) and Resize-10 compute source coordinates as
  ``x_out / scale`` ("asymmetric") and pick the floor for nearest; onnx's converter leaves the
  opset-11 defaults (half_pixel, round_prefer_floor) in place, which changes the result of a
  linear resize. The attributes are set to what the old ops did.
* ``einsum_to_matmul``: an Einsum that is a (batched) matrix product, e.g. ``bhqd,bhkd->bhqk``
  or ``bij,jk->bik``, becomes Transpose / MatMul / Transpose, so the MatMul rule applies.
* ``symbolic_batch``: a model exported with a fixed batch (the zoo's ``[1, 3, 224, 224]`` and
  ``Reshape(x, [1, 9216])``) gets a symbolic batch ``N``: the input's first dim becomes ``N`` and
  every constant Reshape target whose first entry equals the fixed batch, applied to a tensor
  whose first dim is that batch, copies it instead (``0``). Kept only if shape inference then
  gives every active tensor that had the fixed batch in front, and the logits, a leading ``N``;
  otherwise the model keeps its fixed batch.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

BATCH = "N"


# -- newer activations -----------------------------------------------------------------------
def decompose_newer_activations(graph: onnx.GraphProto) -> None:
    """Write Gelu, Swish and Mish nodes with primitives every opset from 13 on has."""
    nodes = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Gelu", "Swish", "Mish"):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x, y = node.input[0], node.output[0]
        base = node.name or y
        names = iter(f"{base}/{i}" for i in range(100))

        def const(value: float) -> str:
            name = next(names)
            graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32),
                                                             name))
            return name

        def emit(op_type: str, *inputs: str, out: str | None = None) -> str:
            out = out or next(names)
            nodes.append(helper.make_node(op_type, list(inputs), [out], name=next(names)))
            return out

        if node.op_type == "Gelu" and attrs.get("approximate", b"none") == b"tanh":
            cube = emit("Mul", emit("Mul", x, x), x)
            inner = emit("Mul", emit("Add", x, emit("Mul", cube, const(0.044715))),
                         const(math.sqrt(2.0 / math.pi)))
            half = emit("Mul", x, const(0.5))
            emit("Mul", half, emit("Add", emit("Tanh", inner), const(1.0)), out=y)
        elif node.op_type == "Gelu":
            erf = emit("Erf", emit("Div", x, const(math.sqrt(2.0))))
            emit("Mul", emit("Mul", x, emit("Add", erf, const(1.0))), const(0.5), out=y)
        elif node.op_type == "Swish":
            alpha = float(attrs.get("alpha", 1.0))
            scaled = x if alpha == 1.0 else emit("Mul", x, const(alpha))
            emit("Mul", x, emit("Sigmoid", scaled), out=y)
        else:  # Mish
            emit("Mul", x, emit("Tanh", emit("Softplus", x)), out=y)
    del graph.node[:]
    graph.node.extend(nodes)


# -- legacy resize ---------------------------------------------------------------------------
def fix_legacy_resize(graph: onnx.GraphProto) -> None:
    """Give Resize nodes converted from Upsample / Resize-10 the old ops' coordinate rule."""
    for node in graph.node:
        if node.op_type != "Resize" or node.domain not in ("", "ai.onnx"):
            continue
        keep = [a for a in node.attribute
                if a.name not in ("coordinate_transformation_mode", "nearest_mode")]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.append(helper.make_attribute("coordinate_transformation_mode",
                                                    "asymmetric"))
        node.attribute.append(helper.make_attribute("nearest_mode", "floor"))


# -- Einsum ------------------------------------------------------------------------------------
def _parse_einsum(equation: str, ranks: list[int | None]):
    """Terms of a two-operand equation as letter lists, '...' as shared leading dims; or None."""
    equation = equation.replace(" ", "")
    if "->" not in equation:
        return None
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    ellipsis = 0
    if any("..." in t for t in terms + [out]):
        if not all(t.startswith("...") and t.count("...") == 1 for t in terms + [out]):
            return None
        counts = [r - (len(t) - 3) if r is not None else None for t, r in zip(terms, ranks)]
        if None in counts or counts[0] != counts[1]:
            return None
        ellipsis = counts[0]
        terms, out = [t[3:] for t in terms], out[3:]
    if any(len(set(t)) != len(t) for t in terms + [out]):
        return None
    return [list(t) for t in terms], list(out), ellipsis


def einsum_plan(equation: str, ranks: list[int | None]):
    """``(perm_a, perm_b, perm_out)`` that turn the Einsum into Transpose/MatMul/Transpose, or
    None when it is not a plain (batched) matrix product."""
    parsed = _parse_einsum(equation, ranks)
    if parsed is None:
        return None
    (a, b), out, ellipsis = parsed
    contracted = [c for c in a if c in b and c not in out]
    if len(contracted) != 1 or any(c not in a and c not in b for c in out):
        return None
    if any(c not in out and c not in contracted for c in a + b):
        return None  # a letter summed over one operand only
    (k,) = contracted
    common = [c for c in out if c in a and c in b]
    free_a = [c for c in out if c in a and c not in b]
    free_b = [c for c in out if c in b and c not in a]
    if not free_a or not free_b:
        return None
    if common and (len(free_a) != 1 or len(free_b) != 1):
        return None
    if len(free_a) > 1 and len(free_b) > 1:
        return None
    m, n = free_a[-1], free_b[-1]
    batch_a, batch_b = common + free_a[:-1], common + free_b[:-1]
    lead = list(range(ellipsis))
    perm_a = lead + [ellipsis + a.index(c) for c in batch_a + [m, k]]
    perm_b = lead + [ellipsis + b.index(c) for c in batch_b + [k, n]]
    # MatMul's result: [..., batch (the longer operand's extra letters), m, n]
    result = batch_a + [m, n] if len(batch_a) >= len(batch_b) else batch_b + [m, n]
    perm_out = lead + [ellipsis + result.index(c) for c in out]
    return perm_a, perm_b, perm_out


def einsum_to_matmul(graph: onnx.GraphProto, ranks: dict[str, int | None]) -> None:
    nodes = []
    for node in graph.node:
        plan = None
        if node.op_type == "Einsum" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
            equation = helper.get_attribute_value(node.attribute[0]).decode() \
                if node.attribute else ""
            plan = einsum_plan(equation, [ranks.get(i) for i in node.input])
        if plan is None:
            nodes.append(node)
            continue
        perm_a, perm_b, perm_out = plan
        base = node.name or node.output[0]
        inputs = []
        for name, perm, tag in ((node.input[0], perm_a, "a"), (node.input[1], perm_b, "b")):
            if perm == sorted(perm):
                inputs.append(name)
                continue
            moved = f"{base}/{tag}_transposed"
            nodes.append(helper.make_node("Transpose", [name], [moved], perm=perm,
                                          name=f"{base}/transpose_{tag}"))
            inputs.append(moved)
        if perm_out == sorted(perm_out):
            nodes.append(helper.make_node("MatMul", inputs, [node.output[0]],
                                          name=f"{base}/matmul"))
        else:
            product = f"{base}/product"
            nodes.append(helper.make_node("MatMul", inputs, [product], name=f"{base}/matmul"))
            nodes.append(helper.make_node("Transpose", [product], [node.output[0]],
                                          perm=perm_out, name=f"{base}/transpose_out"))
    del graph.node[:]
    graph.node.extend(nodes)


# -- symbolic batch ----------------------------------------------------------------------------
def _leading_dims(model: onnx.ModelProto) -> dict[str, int | str | None]:
    dims = {}
    for info in list(model.graph.input) + list(model.graph.value_info) + \
            list(model.graph.output):
        shape = info.type.tensor_type.shape
        if info.type.tensor_type.HasField("shape") and len(shape.dim):
            d = shape.dim[0]
            dims[info.name] = d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
    return dims


def symbolic_batch(model: onnx.ModelProto, input_name: str, logits: str, active: set[str],
                   infer, light_copy) -> bool:
    """Make a fixed batch symbolic in place (see the module docstring); True if it was done.

    ``infer`` is the normaliser's shape inference (it fills value_info on the model it gets);
    the trial runs on ``light_copy(model)``, a copy without the large weights.
    """
    graph = model.graph
    data = next(i for i in graph.input if i.name == input_name)
    dims = data.type.tensor_type.shape.dim
    if not len(dims) or not dims[0].HasField("dim_value"):
        return False
    batch = dims[0].dim_value
    before = _leading_dims(model)
    inits = {t.name: t for t in graph.initializer}
    changes = []  # (node index, new Reshape target)
    for index, node in enumerate(graph.node):
        if node.op_type != "Reshape" or node.input[1] not in inits:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        target = numpy_helper.to_array(inits[node.input[1]])
        if target.ndim == 1 and len(target) and target[0] == batch and \
                before.get(node.input[0]) == batch:
            fixed = target.astype(np.int64)
            fixed[0] = 0
            changes.append((index, fixed))
    trial = infer(_apply(light_copy(model), input_name, changes))
    after = _leading_dims(trial)
    checked = [name for name in active if before.get(name) == batch] + [logits]
    if any(after.get(name) != BATCH for name in checked):
        return False
    _apply(model, input_name, changes)
    return True


def _apply(model: onnx.ModelProto, input_name: str, changes) -> onnx.ModelProto:
    """Symbolic batch on the input, output shapes left to inference, Reshape targets copied."""
    graph = model.graph
    for info in graph.input:
        if info.name == input_name:
            info.type.tensor_type.shape.dim[0].Clear()
            info.type.tensor_type.shape.dim[0].dim_param = BATCH
    for info in graph.output:
        info.type.tensor_type.ClearField("shape")
    del graph.value_info[:]
    for index, fixed in changes:
        node = graph.node[index]
        name = f"{node.input[1]}/batch_copied"
        if not any(t.name == name for t in graph.initializer):
            graph.initializer.append(numpy_helper.from_array(fixed, name))
        node.input[1] = name
    return model
