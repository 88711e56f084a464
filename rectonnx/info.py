"""A coverage report for a model: what it takes and returns, which ops it uses, and which of the
ops between the input and the logits have backward rules (``rectonnx info``)."""

from __future__ import annotations

from collections import Counter

import onnx

from .artifact import read_stamp
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
    try:
        check_supported(norm)
    except RectonnxError as exc:
        return "\n".join(lines), str(exc)
    return "\n".join(lines), None
