"""``rewrite``: a classifier in, one explainer graph out (docs/maths.md, "The explainer graph contract").

The emitted graph takes the model's data input and ``target`` (int64 ``[N]``, negative = the
predicted class) and returns ``logits`` (``[N, C]``, before any Softmax) and ``attribution``
(the input's shape; with ``wrt`` the shape of that tensor; ``[N, 1, H, W]`` for the CAM
methods, whose map at a layer is resized to the input, cam.py). The backward pass is seeded with ``one_hot(target)`` on the logits, so it
computes ``dS/dx`` of the target score ``S``, modified at activations by the method. Methods that
need several inputs per sample (SmoothGrad, Integrated Gradients, DeepLIFT) run the forward and
backward graph on copies of each sample and combine their gradients (baselines.py). On request
the graph also returns the gradient reaching every activation's output, ``attribution/<node>``
(the paper's Figure 6), and the attribution can be thresholded at a percentile (Sec. 5.2).
A token model (integer ids) is attributed at its embedding output and per token, ``[N, T]``
(option ``token_reduction``); its other inputs (attention mask) stay graph inputs
(docs/maths.md, 'Token models'). Integer pixels that the model casts to float are attributed
at that Cast's output (docs/maths.md, 'Integer pixels').
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .artifact import describe_source, read_stamp, source_fingerprint, stamp
from .baselines import SINGLE, final_threshold
from .builder import GraphBuilder
from .cam import check_layer, class_activation_map, default_cam_layer
from .errors import InvalidModelError, UnsupportedModelError
from .methods import RUNTIMES, build, rules_of, token_reduction
from .options import OptionError
from .graphs import light_copy, prune, rename
from .normalize import OUTPUT_IR_VERSION, TARGET_OPSET, NormalizedModel, load_model, normalize
from .rules import RuleContext
from .spec import ExplanationSpec, resolve
from .walker import backpropagate, check_supported, node_names_filled, path_between

LOGITS, ATTRIBUTION, TARGET, Q = "logits", "attribution", "target", "q"
__all__ = ["rewrite", "RUNTIMES", "VanishingMapWarning", "LOGITS", "ATTRIBUTION", "TARGET", "Q"]


class VanishingMapWarning(UserWarning):
    """A setting makes (part of) the attribution map zero by construction, e.g. a RectGrad
    layer too small for its percentile (gates.py, "Vanishing maps")."""


def rewrite(model, method: "str | ExplanationSpec" = "rectgrad", *,
            input_name: str | None = None, output_name: str | None = None,
            **options) -> onnx.ModelProto:
    """Return the explainer graph of ``model`` for ``method`` and its options.

    Args:
        model: path, bytes or ``onnx.ModelProto`` of a classifier (opset 9+).
        method: a method name (``rectonnx.METHOD_NAMES``) or an ``ExplanationSpec``.
        input_name, output_name: which input is the image and which output holds the scores,
            for models with several (default input of a token model: the integer input whose
            embedding table has the most rows).
        options: the method's options, validated by ``ExplanationSpec`` (with a spec they
            change it): ``q``, ``tau``, ``q_input`` (rectgrad); ``samples``, ``sigma``,
            ``seed`` (smoothgrad); ``steps``, ``baseline``, ``integration``
            (integrated_gradients); ``baseline`` (deeplift); ``epsilon`` (epsilon_lrp);
            ``wrt`` (saliency, grad_input, rectgrad: attribute to that tensor, docs/maths.md
            'Layer attribution'); ``layer`` (gradcam, gradcam++, layercam: the feature map,
            default found automatically, docs/maths.md 'Class activation maps'); and for
            every method ``padding_trick`` (False, "exact", "border"; rectgrad: "exact"),
            ``prr``, ``final_percentile``, ``threshold`` ("topk", the TensorRT-safe
            "bisect", or "approx" from a subsample, with ``recall``), ``layer_outputs`` (also output ``attribution/<node>``) and ``runtime``
            ("any", or "onnxruntime-cpu" for its faster MaxUnpool), and ``token_reduction``
            (token models: "auto", "norm", "sum" or "none"). ``q_input=True`` makes q an
            optional graph input ``q`` (float64, ``[1]`` or ``[N]``, clipped to [0, 100], NaN
            = the default) whose default is ``q``. See docs/maths.md for every formula.

    The graph's ``metadata_props`` record the spec, the rectonnx version and the source
    model's sha256 (artifact.py). Layers that a setting closes entirely (a RectGrad layer too
    small for q) are reported with a ``VanishingMapWarning``.
    """
    spec = resolve(method, **options)
    proto = load_model(model)
    made = read_stamp(proto)
    if made is not None:
        raise UnsupportedModelError(
            f"{describe_source(model)} is already an explainer graph "
            f"({made.spec.describe() if made.spec else made.method}); rewrite the source "
            "classifier instead (or load this one with Explainer / export-triton as it is)", [])
    fingerprint = source_fingerprint(model)
    settings = spec.settings()
    chosen = build(spec)
    norm = normalize(proto, input_name=input_name, output_name=output_name)
    node_names_filled(norm.graph)
    wrt = _stop_at(norm, chosen)
    check_supported(norm, wrt)
    source_names = (norm.input_name, norm.logits_name)
    _reserve_contract_names(norm)
    if wrt is not None and wrt in (source_names[1], TARGET, ATTRIBUTION, LOGITS, Q):
        wrt = LOGITS if wrt == source_names[1] else f"model/{wrt}"

    graph = norm.graph
    taken = {name for n in graph.node for name in list(n.input) + list(n.output)}
    taken |= {t.name for t in graph.initializer} | {i.name for i in graph.input}
    taken |= {LOGITS, ATTRIBUTION, TARGET, Q}
    g = GraphBuilder(taken)
    layers: dict[str, str] = {}  # activation output -> the gradient reaching it
    layer_outputs = settings["layer_outputs"]
    walked = _recording(chosen, layers) if layer_outputs else chosen
    ctx = RuleContext(g, norm.shapes, norm.constants, norm.active, walked.activation,
                      overrides=rules_of(chosen), opset=TARGET_OPSET,
                      max_unpool=settings["runtime"] == "onnxruntime-cpu")
    copies = chosen.copies or SINGLE
    differentiated, stop = copies.feed(norm, g, LOGITS, wrt)
    g.scope("seed")
    seed = one_hot_seed(g, norm, LOGITS, TARGET)
    grad_input = backpropagate(differentiated, ctx, copies.repeat(g, seed), stop)
    g.scope("attribution")
    x = norm.input_name if wrt is None else wrt
    rank = len(norm.shapes.get(x) or ())
    grads = copies.combine(g, grad_input, rank)
    if chosen.cam:
        attribution, attribution_shape = class_activation_map(g, norm, chosen.finish, x, grads)
    else:
        attribution, attribution_shape = chosen.finish(g, x, grads), norm.shapes.get(x)
    if norm.embedding is not None and rank == 3:
        attribution, attribution_shape = per_token(
            g, attribution, attribution_shape,
            token_reduction(spec.method, settings["token_reduction"]))
    if settings["final_percentile"] is not None:
        attribution = final_threshold(g, attribution, attribution_shape,
                                      settings["final_percentile"],
                                      settings["threshold"], settings["recall"])
    g.Identity(attribution, outputs=[ATTRIBUTION])
    extra = []
    for node in norm.path_nodes if layer_outputs else ():
        if node.output[0] in layers:
            name = g.scope("").fresh(f"{ATTRIBUTION}/{node.name.strip('/')}")
            shape = norm.shapes.get(node.output[0])
            g.Identity(copies.combine(g, layers[node.output[0]], len(shape or ())),
                       outputs=[name])
            extra.append((name, shape))
    defaults = {Q: np.array([settings["q"]], np.float64)} if settings.get("q_input") else {}
    explainer = assemble(norm, g, spec.method, extra, defaults,
                         attribution_shape="input" if wrt is None else attribution_shape)
    from .precision import in_precision  # a float16 model computes in float16 (or fp32)

    explainer, computes_in = in_precision(explainer, proto, source_names[0], norm.upcast_from,
                                          settings["precision"])
    stamp(explainer, spec, source_sha256=fingerprint, input_name=source_names[0],
          output_name=source_names[1], upcast_from=norm.upcast_from, computes_in=computes_in,
          input_kind="pixels" if norm.pixel_cast is not None else None)
    for message in ctx.warnings:
        warnings.warn(VanishingMapWarning(message), stacklevel=2)
    return explainer


def per_token(g: GraphBuilder, attribution: str, shape, reduction: str):
    """A token model's ``[N, T, D]`` attribution reduced over ``D`` to ``[N, T]``: the L2 norm
    (``"norm"``) or the sum (``"sum"``); ``"none"`` keeps it. Returns the tensor and its
    shape."""
    if reduction == "none":
        return attribution, shape
    axes = g.ints([-1], "embedding_axis")
    if reduction == "sum":
        reduced = g.ReduceSum(attribution, axes, keepdims=0, hint="per_token")
    else:
        squares = g.Mul(attribution, attribution, hint="squares")
        reduced = g.Sqrt(g.ReduceSum(squares, axes, keepdims=0), hint="per_token")
    return reduced, None if shape is None else tuple(shape[:2])


def _stop_at(norm: NormalizedModel, method) -> str | None:
    """The tensor the backward stops at: None for the input, the layer (or the default CAM
    layer) for the CAM methods, ``wrt`` for layer attribution (validated: walker.path_between),
    and for a token model without ``wrt`` its embedding output (normalize.embedding_gather)."""
    if norm.embedding is not None and method.cam:
        raise OptionError(f"{method.name} makes a map at the input's spatial size, which "
                          f"token ids (input {norm.input_name!r}) do not have; use saliency, "
                          "grad_input or rectgrad (per token)")
    if norm.embedding is not None and not method.cam and method.wrt is None:
        return norm.embedding
    if norm.pixel_cast is not None and not method.cam and method.wrt in (None, norm.input_name):
        return norm.pixel_cast  # integer pixels: their float values
    if not method.cam and method.wrt is None:
        return None
    option = "layer" if method.cam else "wrt"
    wrt = method.wrt
    if wrt is None:
        wrt = default_cam_layer(norm)
        if wrt is None:
            raise UnsupportedModelError(
                f"{method.name}: found no 4-D feature map before a global pooling or flatten "
                "between the input and the logits; name the layer (option layer)", [])
    path_between(norm, wrt, option)  # validates the name
    if method.copies is not None and wrt == norm.logits_name:
        raise OptionError(f"{method.name} makes its copies at option wrt = {wrt!r}, which is "
                          "the scores tensor itself: name a tensor before the scores")
    if method.cam:
        check_layer(norm, wrt)
    return None if wrt == norm.input_name and not method.cam else wrt


def _recording(method, layers: dict[str, str]):
    """``method`` whose activation gate also notes ``layers[y] = R`` (the gradient at ``y``)."""
    def gate(ctx, act):
        layers[act.y] = act.upstream
        return method.activation(ctx, act)
    return dataclasses.replace(method, activation=gate)


def _reserve_contract_names(norm: NormalizedModel) -> None:
    """Make ``logits`` the scores tensor and free the names ``target`` and ``attribution``."""
    graph = norm.graph
    for name in (TARGET, ATTRIBUTION, LOGITS, Q):
        if name != norm.logits_name and _tensor_exists(graph, name):
            _rename_everywhere(norm, name, f"model/{name}")
    if norm.logits_name != LOGITS:
        _rename_everywhere(norm, norm.logits_name, LOGITS)


def _tensor_exists(graph: onnx.GraphProto, name: str) -> bool:
    return any(name in n.output or name in n.input for n in graph.node) or \
        any(t.name == name for t in graph.initializer)


def _rename_everywhere(norm: NormalizedModel, old: str, new: str) -> None:
    rename(norm.graph, old, new)
    for table in (norm.shapes, norm.elem_types, norm.constants):
        if old in table:
            table[new] = table.pop(old)
    if old in norm.active:
        norm.active.discard(old)
        norm.active.add(new)
    if norm.logits_name == old:
        norm.logits_name = new
    if norm.input_name == old:
        norm.input_name = new


def one_hot_seed(g: GraphBuilder, norm: NormalizedModel, logits: str, target: str) -> str:
    """``one_hot(where(target < 0, argmax(logits), target))`` as float ``[N, C]``."""
    predicted = g.ArgMax(logits, axis=1, keepdims=0, hint="predicted")
    chosen = g.Where(g.Less(target, g.const(0, "zero", dtype="int64")), predicted, target,
                     hint="class")
    num_classes = (norm.shapes.get(logits) or (None, None))[1]
    if isinstance(num_classes, int):
        classes = g.const([list(range(num_classes))], "classes", dtype="int64")  # [1, C]
    else:
        count = g.Gather(g.Shape(logits), g.ints([1], "axis"), axis=0, hint="num_classes")
        classes = g.Range(g.const(0, "zero", dtype="int64"),
                          g.Squeeze(count, g.ints([0], "axes")),
                          g.const(1, "one", dtype="int64"), hint="classes")
        classes = g.Unsqueeze(classes, g.ints([0], "axes"), hint="classes")
    hot = g.Equal(g.Unsqueeze(chosen, g.ints([1], "axes")), classes, hint="one_hot")
    return g.Cast(hot, to=TensorProto.FLOAT, hint="one_hot")


def assemble(norm: NormalizedModel, g: GraphBuilder, method_name: str,
             extra_outputs: list[tuple[str, tuple | None]] = (),
             defaults: dict[str, np.ndarray] | None = None, *,
             attribution_shape: tuple | None | str = "input") -> onnx.ModelProto:
    """The explainer model; ``defaults``: extra per-sample inputs (``[1]`` or ``[N]``) with
    default values (graph inputs with an initializer of the same name);
    ``attribution_shape``: the attribution's shape when it is not the input's (a layer's
    ``[N, ...]`` for ``wrt``, ``[N, 1, H, W]`` for the CAM methods; None: unknown); its batch
    axis is the input's."""
    graph = norm.graph
    data_input = next(i for i in graph.input if i.name == norm.input_name)
    batch = data_input.type.tensor_type.shape.dim[0] if \
        data_input.type.tensor_type.shape.dim else None
    batch_dim = (batch.dim_param or batch.dim_value or "N") if batch is not None else "N"
    target_info = helper.make_tensor_value_info(TARGET, TensorProto.INT64, [batch_dim])
    logits_shape = norm.shapes.get(LOGITS)
    shape = norm.shapes.get(norm.input_name)
    if attribution_shape is None:
        shape = None
    elif attribution_shape != "input":
        shape = (shape[0] if shape else batch_dim, *attribution_shape[1:])
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, logits_shape),
               helper.make_tensor_value_info(ATTRIBUTION, TensorProto.FLOAT, shape)]
    outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
                for name, shape in extra_outputs]
    nodes = prune([*graph.node, *g.nodes], {o.name for o in outputs})
    used = {name for n in nodes for name in n.input}
    initializers = [t for t in [*graph.initializer, *g.initializers] if t.name in used]
    inputs = [data_input, target_info]
    # the model's other inputs that the graph still reads (a token model's attention mask)
    others = [i for i in graph.input if i.name in used and i.name != norm.input_name
              and i.name not in {t.name for t in initializers}
              and i.name not in (defaults or {})]
    if others and norm.embedding is None:
        raise InvalidModelError(
            f"the scores depend on input(s) {[i.name for i in others]} besides "
            f"{norm.input_name!r}; only token models (integer ids) keep other inputs (an "
            "attention mask, token type ids) as inputs of the explainer graph: fix the other "
            "inputs in the model (e.g. as constants)")
    inputs += others
    for name, value in (defaults or {}).items():
        inputs.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(value.dtype), ["Q"]))
        initializers.append(numpy_helper.from_array(value, name))
    explainer = helper.make_graph(nodes, f"{graph.name or 'model'}_{method_name}",
                                  inputs, outputs, initializers)
    model = helper.make_model(explainer, opset_imports=[helper.make_opsetid("", TARGET_OPSET)],
                              ir_version=OUTPUT_IR_VERSION, producer_name="rectonnx")
    try:
        # the same check without serialising the large weights (they become typed inputs)
        onnx.checker.check_model(light_copy(model)[0], full_check=True)
    except Exception as exc:  # a bug in a rule, never the user's fault
        raise InvalidModelError(f"rectonnx built an invalid explainer graph (please report): "
                                f"{str(exc).splitlines()[0]}") from exc
    return model
