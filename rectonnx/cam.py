r"""Class activation maps from gradients: Grad-CAM, Grad-CAM++ and Layer-CAM as graph methods.

Notation: ``A`` is the chosen layer's activation ``[N, K, h, w]`` (option ``layer``; default the
last 4-D activation before the global pooling or flatten, ``default_cam_layer``), ``S`` the
target logit and ``g = dS/dA`` its exact gradient, computed by walking only the nodes between
the layer and the logits (walker.path_between). Sums ``sum_ij`` run over the layer's ``h, w``.

| method | channel weights / map | source |
|---|---|---|
| ``gradcam`` | ``w_k = mean_ij g_kij``; ``map = relu(sum_k w_k A_k)`` | Selvaraju et al. 2017 |
| ``gradcam++`` | ``alpha_kij = g^2 / (2 g^2 + (sum_ab A_kab) g^3)``, ``w_k = sum_ij alpha_kij relu(g_kij)``; ``map = relu(sum_k w_k A_k)`` | Chattopadhay et al. 2018 |
| ``layercam`` | ``map_ij = relu(sum_k relu(g_kij) A_kij)`` | Jiang et al. 2021 |

* Grad-CAM is Captum's ``LayerGradCam(model, layer).attribute(x, target,
  relu_attributions=True)``.
* Grad-CAM++ is the closed form of the paper's eq. 19 for ``Y = exp(S)``, whose higher
  derivatives are powers of ``g`` (the ``exp(S)`` factors cancel in ``alpha`` and scale every
  weight of a sample by the same positive number, which is dropped), as the common literal
  implementations compute it (the authors' code, pytorch-grad-cam's ``GradCAMPlusPlus``):
  ``alpha = g^2 / (2 g^2 + sum_ab A_ab g^3)`` with ``alpha = 0`` where ``g = 0``, and
  ``w_k = sum_ij alpha relu(g)``. Where ``g > 0`` the weight's term is
  ``g^3 / (g^2 (2 + s g)) = g / (2 + s g)`` with ``s = sum_ab A_ab``, and where ``g <= 0`` it
  is 0, so the graph computes ``w_k = sum_ij relu(g) / (2 + s_k relu(g))``: the same value
  without the ``g^2``, ``g^3`` underflow of float32 (no epsilon is added; after a ReLU ``s >=
  0`` and the denominator is at least 2).
* Layer-CAM weighs every position by its own positive gradient.

The map ``[N, 1, h, w]`` is resized to the input's spatial size with ``Resize`` (mode linear,
``half_pixel``), which is ``F.interpolate(map, (H, W), mode="bilinear", align_corners=False)``,
i.e. Captum's ``LayerAttribution.interpolate(map, (H, W), interpolate_mode="bilinear")``. The
explainer's ``attribution`` output is then ``[N, 1, H, W]``, not the input's shape.

Channels-last models (Keras, tf2onnx): a layer ``[N, h, w, K]`` (``channels_last``: read from
the nodes that read it) is transposed to ``[N, K, h, w]`` before the formulas, and for a
channels-last input ``[N, H, W, C]`` the map is ``[N, H, W, 1]``, the input's layout.
"""

from __future__ import annotations

from typing import Callable

from onnx import helper

from .builder import GraphBuilder
from .normalize import NormalizedModel

CamFinish = Callable[[GraphBuilder, str, str], str]

# ops that turn a feature map [N, K, h, w] into per-sample features (the classifier's head)
_HEAD_OPS = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "Flatten", "Reshape",
             "ReduceMean", "ReduceMax", "ReduceSum", "ReduceL2", "AveragePool", "MaxPool",
             "Squeeze"}


def _spatial(shape, last: bool = False) -> bool:
    """A 4-D shape whose spatial size (axes 2, 3; 1, 2 if ``last``) is not 1 x 1 (unknown
    sizes count as spatial)."""
    if shape is None or len(shape) != 4:
        return False
    return not all(d == 1 for d in (shape[1:3] if last else shape[2:]))


def default_cam_layer(norm: NormalizedModel) -> str | None:
    """The tensor the CAM methods use by default: the 4-D input (spatial size above 1 x 1) of
    the last node on the path that reduces a feature map to per-sample features (global
    pooling, a flatten or reshape, a pooling down to 1 x 1) -- the last convolutional block's
    activation. None when the path has no such node."""
    found = None
    for node in norm.path_nodes:
        if node.op_type not in _HEAD_OPS or not node.input:
            continue
        x, y = node.input[0], node.output[0]
        if x in norm.active and _spatial(norm.shapes.get(x)):
            last = channels_last(norm, x)
            if _spatial(norm.shapes.get(x), last) and not _spatial(norm.shapes.get(y), last):
                found = x
    return found


def gradcam(g: GraphBuilder, a: str, grad: str) -> str:
    weights = g.ReduceMean(grad, axes=[2, 3], keepdims=1, hint="weights")
    return _weighted_map(g, weights, a)


def gradcam_plus_plus(g: GraphBuilder, a: str, grad: str) -> str:
    positive = g.Relu(grad, hint="positive_grad")
    total = g.ReduceSum(a, g.ints([2, 3], "axes"), keepdims=1, hint="activation_sum")
    denominator = g.Add(g.scalar(2.0, hint="two"), g.Mul(total, positive), hint="denominator")
    weights = g.ReduceSum(g.Div(positive, denominator, hint="alpha_relu_grad"),
                          g.ints([2, 3], "axes"), keepdims=1, hint="weights")
    return _weighted_map(g, weights, a)


def layercam(g: GraphBuilder, a: str, grad: str) -> str:
    weighted = g.Mul(g.Relu(grad, hint="positive_grad"), a, hint="weighted")
    return g.Relu(g.ReduceSum(weighted, g.ints([1], "axes"), keepdims=1, hint="map"),
                  hint="cam")


def _weighted_map(g: GraphBuilder, weights: str, a: str) -> str:
    summed = g.ReduceSum(g.Mul(weights, a, hint="weighted"), g.ints([1], "axes"), keepdims=1,
                         hint="map")
    return g.Relu(summed, hint="cam")


FINISHES: dict[str, CamFinish] = {"gradcam": gradcam, "gradcam++": gradcam_plus_plus,
                                  "layercam": layercam}


def upsampled(g: GraphBuilder, cam: str, x: str, x_channels_last: bool = False) -> str:
    """``cam [N, 1, h, w]`` resized to the spatial size of ``x`` (bilinear, half-pixel);
    ``[N, H, W, 1]`` when ``x`` is channels-last."""
    size = g.Shape(x, start=1, end=3, hint="size") if x_channels_last else \
        g.Shape(x, start=2, hint="size")
    sizes = g.Concat(g.Shape(cam, end=2, hint="map_shape"), size, axis=0, hint="sizes")
    resized = g.Resize(cam, "", "", sizes, mode="linear",
                       coordinate_transformation_mode="half_pixel", hint="upsampled")
    return g.Transpose(resized, perm=[0, 2, 3, 1], hint="channels_last") if x_channels_last \
        else resized


# ops that read a 4-D tensor as [N, C, H, W]
_CHANNELS_FIRST_OPS = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool",
                       "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
                       "BatchNormalization", "InstanceNormalization", "MaxUnpool",
                       "SpaceToDepth", "DepthToSpace"}
_REDUCE_OPS = {"ReduceMean", "ReduceMax", "ReduceSum", "ReduceL2", "ReduceMin"}


def channels_last(norm: NormalizedModel, tensor: str) -> bool:
    """Whether the 4-D ``tensor`` is ``[N, H, W, C]``, read from the nodes that read it: a
    Transpose with ``perm [0, 3, 1, 2]`` or a reduction over axes 1 and 2 (a Keras global
    pooling) say channels-last; a convolution, a pooling or a Transpose ``[0, 2, 3, 1]`` say
    channels-first. A graph input read by none of those is channels-last when its last axis
    has 1, 3 or 4 entries and its second does not (an image ``[N, H, W, 3]``). Otherwise
    channels-first."""
    for node in norm.graph.node:
        if tensor not in node.input:
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Transpose" and node.input[0] == tensor:
            perm = list(attributes.get("perm", []))
            if perm in ([0, 3, 1, 2], [0, 2, 3, 1]):
                return perm == [0, 3, 1, 2]
        elif node.op_type in _CHANNELS_FIRST_OPS and node.input[0] == tensor:
            return False
        elif node.op_type in _REDUCE_OPS and node.input[0] == tensor:
            axes = attributes.get("axes")
            if axes is None and len(node.input) > 1 and node.input[1] in norm.constants:
                axes = norm.constants[node.input[1]].tolist()
            if axes is not None:
                spatial = {int(a) % 4 for a in axes}
                if spatial in ({1, 2}, {2, 3}):
                    return spatial == {1, 2}
    shape = norm.shapes.get(tensor)
    if tensor in {i.name for i in norm.graph.input} and shape is not None and len(shape) == 4:
        return shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4)
    return False


def class_activation_map(g: GraphBuilder, norm: NormalizedModel, finish: CamFinish,
                         layer: str, grad: str) -> tuple[str, tuple | None]:
    """The map of ``finish`` at ``layer`` (with its gradient ``grad``), resized to the input:
    ``[N, 1, H, W]``, or ``[N, H, W, 1]`` for a channels-last input. A channels-last layer is
    transposed to ``[N, C, h, w]`` first. Returns the map and its static shape."""
    if channels_last(norm, layer):
        layer = g.Transpose(layer, perm=[0, 3, 1, 2], hint="channels_first")
        grad = g.Transpose(grad, perm=[0, 3, 1, 2], hint="channels_first")
    x = norm.input_name
    last = channels_last(norm, x)
    cam = upsampled(g, finish(g, layer, grad), x, last)
    shape = norm.shapes.get(x)
    if shape is None or len(shape) != 4:
        return cam, None
    return cam, (shape[0], *shape[1:3], 1) if last else (shape[0], 1, *shape[2:])


def check_layer(norm: NormalizedModel, layer: str) -> None:
    """A CAM layer must be a 4-D tensor ``[N, K, h, w]``."""
    from .options import OptionError

    shape = norm.shapes.get(layer)
    if shape is not None and len(shape) != 4:
        raise OptionError(f"option layer = {layer!r} is not allowed: the CAM methods need a "
                          f"4-D feature map [N, K, h, w]; {layer!r} has shape {list(shape)}")


__all__ = ["default_cam_layer", "FINISHES", "upsampled", "check_layer", "channels_last",
           "class_activation_map"]
