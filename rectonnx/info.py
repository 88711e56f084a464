"""A coverage report for a model: what it takes and returns, which ops it uses, and which of the
ops between the input and the logits have backward rules (``rectonnx info``)."""

from __future__ import annotations

from collections import Counter

import onnx

from .artifact import read_stamp
from .cam import default_cam_layer
from .errors import RectonnxError
from .normalize import TARGET_OPSET, ai_onnx_opset, load_model, normalize
from .rules import RULES
from .walker import check_supported, node_names_filled, unsupported_nodes


def _value_text(info: onnx.ValueInfoProto) -> str:
    tensor = info.type.tensor_type
    dtype = onnx.TensorProto.DataType.Name(tensor.elem_type) if tensor.elem_type else "?"
    dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?")
            for d in tensor.shape.dim]
    return f"{info.name}: {dtype}[{', '.join(dims)}]"


def attribution_lines(proto: onnx.ModelProto, norm, chosen_by_user: bool = False) -> list[str]:
    """What ``rewrite`` attributes for each data input, and why."""
    initializers = {t.name for t in proto.graph.initializer}
    data = [i for i in proto.graph.input if i.name not in initializers]
    used = {name for n in norm.graph.node for name in n.input}
    how = "named by input_name" if chosen_by_user else (
        "the only data input" if len(data) == 1 else
        "the integer input whose embedding table has the most rows")
    lines = ["attributed (option wrt names another tensor instead):"]
    for info in data:
        name = info.name
        if name == norm.input_name and norm.embedding is not None:
            table = norm.shapes.get(next(n.input[0] for n in norm.graph.node
                                         if n.name == norm.embedding_node))
            dims = "x".join("?" if d is None else str(d) for d in (table or ()))
            lines.append(
                f"  {name}: tokens ({how}): integer ids, so the attribution is taken at "
                f"{norm.embedding!r}, the output of Gather {norm.embedding_node!r} of the "
                f"float table [{dims}] (the first Gather whose indices depend on the ids' "
                "values), and reduced over the embedding dimension to [N, T] (option "
                "token_reduction: norm for gradients, sum for gradient x input)")
        elif name == norm.input_name and norm.pixel_cast is not None:
            lines.append(f"  {name}: integer pixels ({how}): the model casts them to float, so "
                         f"the attribution is taken at that Cast's output {norm.pixel_cast!r} "
                         "(the input's shape; the Explainer takes the integer values)")
        elif name == norm.input_name:
            lines.append(f"  {name}: every value ({how}): a float input, so the attribution "
                         "has its shape (pixels for an image)")
        elif name in used:
            lines.append(f"  {name}: not attributed: an other input of the explainer graph, "
                         "fed as given (Explainer.explain(..., name=value))")
        else:
            lines.append(f"  {name}: not attributed and not needed")
    return lines


def coverage_report(model, *, input_name: str | None = None,
                    output_name: str | None = None) -> str:
    """The coverage report of ``model`` as text (see ``coverage``)."""
    return coverage(model, input_name=input_name, output_name=output_name,
                    problem_in_text=True)[0]


def coverage(model, *, input_name: str | None = None, output_name: str | None = None,
             problem_in_text: bool = False) -> tuple[str, str | None]:
    """The coverage report of ``model`` and, when ``rewrite`` would refuse it, why: the
    normaliser's error (an invalid graph, an opset it cannot convert, control flow, scores of
    no class) or the ops without a backward rule; None for an explainer graph, which is
    rewritten already. ``problem_in_text``: also end the report with that reason."""
    proto = load_model(model)
    initializers = {t.name for t in proto.graph.initializer}
    lines = [f"model: {proto.graph.name or '(unnamed)'}  opset {ai_onnx_opset(proto)}, "
             f"IR {proto.ir_version}, producer {proto.producer_name or '?'} "
             f"{proto.producer_version}".rstrip()]
    lines.append("inputs:")
    lines += [f"  {_value_text(i)}" for i in proto.graph.input if i.name not in initializers]
    lines.append("outputs:")
    lines += [f"  {_value_text(o)}" for o in proto.graph.output]
    counts = Counter(n.op_type for n in proto.graph.node)
    lines.append(f"operators ({sum(counts.values())} nodes): " +
                 ", ".join(f"{op} x{n}" for op, n in sorted(counts.items())))
    made = read_stamp(proto)
    if made is not None:  # an explainer graph: its stamp, no coverage to tell
        return "\n".join(lines + made.lines()), None
    try:
        norm = normalize(proto, input_name=input_name, output_name=output_name)
    except RectonnxError as exc:
        if problem_in_text:
            lines.append(f"cannot prepare the model for rewriting: {exc}")
        return "\n".join(lines), str(exc)
    node_names_filled(norm.graph)
    lines += attribution_lines(proto, norm, chosen_by_user=input_name is not None)
    if norm.upcast_from == "float16":
        lines.append("precision: a float16 model; its explainer computes in float16 as deployed "
                     "(precision='model', the default; percentile thresholds in float32), or "
                     "in float32 with its weights upcast (precision='fp32')")
    elif norm.upcast_from:
        lines.append(f"precision: a {norm.upcast_from} model; its explainer computes in float32 "
                     "with its weights upcast (bfloat16 is not computed as deployed)")
    path_counts = Counter(n.op_type for n in norm.path_nodes)
    missing = unsupported_nodes(norm)
    lines.append(f"after normalisation to opset {TARGET_OPSET}: {len(norm.path_nodes)} nodes "
                 f"between input {norm.input_name!r} and logits {norm.logits_name!r}")
    for op, n in sorted(path_counts.items()):
        lines.append(f"  {'ok ' if op in RULES else 'NO '} {op} x{n}")
    if missing:
        names = ", ".join(f"{name} ({op})" for op, name in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        lines.append(f"unsupported: {len(missing)} node(s): {names}{more}")
    else:
        lines.append("supported: every op on the path has a backward rule")
    layer = default_cam_layer(norm)
    if layer is None:
        lines.append("default CAM layer: none (no 4-D feature map before a global pooling or "
                     "flatten; give gradcam/gradcam++/layercam a layer)")
    else:
        shape = norm.shapes.get(layer)
        dims = ", ".join("?" if d is None else str(d) for d in shape) if shape else "?"
        lines.append(f"default CAM layer (gradcam, gradcam++, layercam): {layer!r} [{dims}]")
    try:
        check_supported(norm)
    except RectonnxError as exc:
        return "\n".join(lines), str(exc)
    return "\n".join(lines), None
