"""Shared test utilities: build small ONNX models, run explainer graphs, and the oracles.

Oracles (a literal oracle and a dot-product check):

* ``fd_gradient``: the full input gradient of the target logit by central differences, in
  float64, on a float64 copy of the forward model run by ``onnx.reference`` (framework-free).
  All ``2 D`` perturbed copies of a sample run as one batch, so it is cheap for small inputs.
* ``dot_product_check``: ``<t, vjp(c)>`` against ``(f(x + eps t) - f(x - eps t)) / 2 eps`` in one
  random direction ``t`` (JAX's ``check_vjp``); ``c`` is the one-hot seed of the target logit,
  and the test models end in a random dense head, so the cotangent reaching the op under test
  is a random vector.
* ``torch_gradient``: torch autograd in float64 on the module the ONNX file was exported from.

Errors are measured as ``max|a - b| / max|b|`` and recorded per oracle in ``ERRORS``; conftest
prints the largest of each at the end of the run.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, parser
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

import rectonnx

PROVIDERS = ["CPUExecutionProvider"]
TOLERANCE = 1e-4  # float32 explainer graph against a float64 oracle
ERRORS: dict[str, tuple[float, str]] = {}


# -- error measure -----------------------------------------------------------------------------
def rel_err(actual, expected) -> float:
    """``max|actual - expected| / max|expected|`` (the absolute error when expected is all 0)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.abs(expected).max() if expected.size else 0.0
    diff = np.abs(actual - expected).max() if expected.size else 0.0
    return float(diff / scale) if scale > 0 else float(diff)


def record(oracle: str, error: float, where: str = "") -> None:
    if oracle not in ERRORS or error > ERRORS[oracle][0]:
        ERRORS[oracle] = (error, where)


def assert_close(actual, expected, oracle: str, tol: float = TOLERANCE, where: str = "") -> float:
    """Assert ``rel_err(actual, expected) <= tol`` and record the error under ``oracle``."""
    error = rel_err(actual, expected)
    record(oracle, error, where)
    assert error <= tol, f"{oracle} {where}: relative error {error:.3e} > {tol:.0e}"
    return error


# -- inputs ----------------------------------------------------------------------------------
def distinct_values(shape, rng, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """A random permutation of an evenly spaced ramp: all values distinct (no max-pool ties),
    at least ``(high - low) / size`` apart, and never 0 (no ReLU kink at the input)."""
    size = int(np.prod(shape))
    ramp = low + (np.arange(size) + 0.25) * (high - low) / size
    return rng.permutation(ramp).reshape(shape).astype(np.float32)


def away_from_zero(x: np.ndarray, margin: float = 0.5) -> np.ndarray:
    """``sign(x) (|x| + margin)``: safe denominators."""
    return (np.sign(x) * (np.abs(x) + margin)).astype(np.float32)


# -- ONNX models -------------------------------------------------------------------------------
def parse(text: str, initializers: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A model from ONNX text, with ``initializers`` (numpy arrays) added to its graph."""
    model = parser.parse_model(text)
    for name, value in (initializers or {}).items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return model


def _dims(shape) -> str:
    return ",".join(str(d) for d in shape)


def op_model(body: str, x_shape, rng, *, initializers: dict[str, np.ndarray] | None = None,
             opset: int = 17, ir_version: int = 8, classes: int = 3) -> onnx.ModelProto:
    """``x -> body -> y -> Flatten -> MatMul(random [D, classes]) -> logits``.

    ``body`` is ONNX text that reads ``x`` (``float[N, *x_shape]``) and writes ``y``; the random
    dense head makes the cotangent that reaches ``y`` a random vector, one per target class.
    """
    initializers = dict(initializers or {})
    header = f'<ir_version: {ir_version}, opset_import: ["" : {opset}]>'
    probe = parse(f"{header}\nprobe (float[N,{_dims(x_shape)}] x) => (float y) "
                  f"{{\n{body}\n}}", initializers)
    probe.graph.output[0].type.tensor_type.ClearField("shape")  # any rank
    y = session(probe).run(None, {"x": np.ones((1, *x_shape), np.float32)})[0]
    width = int(np.prod(y.shape[1:]))
    initializers["head"] = rng.standard_normal((width, classes)).astype(np.float32)
    text = (f"{header}\nop_under_test (float[N,{_dims(x_shape)}] x) => "
            f"(float[N,{classes}] logits) {{\n{body}\n"
            f"   flat = Flatten <axis = 1> (y)\n   logits = MatMul(flat, head)\n}}")
    return parse(text, initializers)


def as_double(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float64 copy of a float32 model (initializers, graph inputs/outputs, Cast targets)."""
    model = copy.deepcopy(model)
    graph = model.graph
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(init).astype(np.float64), init.name))
    for info in list(graph.input) + list(graph.output) + list(graph.value_info):
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            info.type.tensor_type.elem_type = TensorProto.DOUBLE
    for node in graph.node:
        for attribute in node.attribute:
            if (node.op_type, attribute.name, attribute.i) == ("Cast", "to", TensorProto.FLOAT):
                attribute.i = TensorProto.DOUBLE
            if attribute.type == onnx.AttributeProto.TENSOR and \
                    attribute.t.data_type == TensorProto.FLOAT:
                attribute.t.CopyFrom(numpy_helper.from_array(
                    numpy_helper.to_array(attribute.t).astype(np.float64), attribute.t.name))
    return model


class Erf(OpRun):
    """onnx.reference's Erf rounds to float32 (``np.vectorize(erf, otypes=["f"])``), which makes
    float64 central differences of anything with an Erf useless: the same, in float64."""

    op_domain = ""

    def _run(self, x):
        return (np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype),)


class Gelu(OpRun):
    """onnx.reference expands Gelu into its schema's body, whose Erf is the float32 one."""

    op_domain = ""

    def _run(self, x, approximate="none"):
        if approximate == "tanh":
            inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
            return ((0.5 * x * (1 + np.tanh(inner))).astype(x.dtype),)
        erf = np.vectorize(math.erf, otypes=[np.float64])
        return ((0.5 * x * (1 + erf(x / math.sqrt(2)))).astype(x.dtype),)


class LRN(OpRun):
    """onnx.reference's LRN loops over the batch instead of the channels (onnx 1.23): the
    spec's formula, literally."""

    op_domain = ""

    def _run(self, x, alpha=1e-4, beta=0.75, bias=1.0, size=None):
        channels = x.shape[1]
        low, high = (size - 1) // 2, math.ceil((size - 1) / 2)
        squares = np.zeros_like(x)
        for c in range(channels):
            squares[:, c] = (x[:, max(0, c - low):min(channels, c + high + 1)] ** 2).sum(axis=1)
        return ((x / (bias + alpha / size * squares) ** beta).astype(x.dtype),)


FLOAT64_OPS = [Erf, Gelu, LRN]


class Reference:
    """The forward model in float64 under ``onnx.reference`` (the framework-free oracle)."""

    def __init__(self, model: onnx.ModelProto, extra_ops: tuple = ()):
        self.model = as_double(model)
        self.evaluator = ReferenceEvaluator(self.model, new_ops=[*extra_ops, *FLOAT64_OPS])
        self.input_name = self.model.graph.input[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self.evaluator.run(None, {self.input_name: np.asarray(x, np.float64)})[0]
        return out.reshape(len(out), -1) if out.ndim == 4 and out.shape[2:] == (1, 1) else out


def resolve_targets(logits: np.ndarray, target) -> np.ndarray:
    target = np.asarray(target, np.int64)
    return np.where(target < 0, logits.argmax(axis=1), target)


def fd_gradient(reference: Reference, x: np.ndarray, target, eps: float = 1e-6) -> np.ndarray:
    """d logits[n, target[n]] / d x[n] for every sample, by central differences in float64."""
    x = np.asarray(x, np.float64)
    target = resolve_targets(reference(x), target)
    n, size = x.shape[0], int(np.prod(x.shape[1:]))
    steps = np.eye(size).reshape(size, *x.shape[1:]) * eps
    grads = np.empty_like(x)
    for i in range(n):
        batch = np.concatenate([x[i] + steps, x[i] - steps])
        scores = reference(batch)[:, target[i]]
        grads[i] = ((scores[:size] - scores[size:]) / (2 * eps)).reshape(x.shape[1:])
    return grads


def dot_product_check(reference: Reference, x: np.ndarray, target, vjp: np.ndarray, rng,
                      eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per sample ``(<t, vjp>, (f(x + eps t) - f(x - eps t)) / 2 eps)`` for a random ``t``."""
    x = np.asarray(x, np.float64)
    target = resolve_targets(reference(x), target)
    t = rng.standard_normal(x.shape)
    rows = np.arange(len(x))
    plus = reference(x + eps * t)[rows, target]
    minus = reference(x - eps * t)[rows, target]
    axes = tuple(range(1, x.ndim))
    return (t * np.asarray(vjp, np.float64)).sum(axis=axes), (plus - minus) / (2 * eps)


# -- running explainer graphs ----------------------------------------------------------------
def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=PROVIDERS)


def run_explainer(explainer: onnx.ModelProto, x: np.ndarray, target) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """``(logits, attribution)`` of an explainer graph under onnxruntime (CPU)."""
    sess = session(explainer)
    data = explainer.graph.input[0].name
    logits, attribution = sess.run(["logits", "attribution"],
                                   {data: np.asarray(x, np.float32),
                                    "target": np.asarray(target, np.int64)})
    return logits, attribution


def explain(model, x, target, method: str = "saliency", **options):
    """Rewrite ``model`` for ``method`` and run it: ``(logits, attribution)``."""
    return run_explainer(rectonnx.rewrite(model, method, **options), x, target)


def check_rule(model: onnx.ModelProto, x: np.ndarray, target, rng, where: str,
               method: str = "saliency", **options) -> None:
    """The explainer's exact gradient against both float64 oracles (saliency and grad*input)."""
    reference = Reference(model)
    logits, attribution = explain(model, x, target, method, **options)
    assert_close(logits, reference(x), "forward logits vs onnx.reference", where=where)
    expected = fd_gradient(reference, x, target)
    if method == "grad_input":
        expected = expected * np.asarray(x, np.float64)
    assert_close(attribution, expected, "gradient vs central differences", where=where)
    if method == "saliency":
        lhs, rhs = dot_product_check(reference, x, target, attribution, rng)
        assert_close(lhs, rhs, "dot-product check", where=where)


# -- torch -------------------------------------------------------------------------------------
def export(module, example, *, opset: int = 17, dynamic_batch: bool = True,
           input_name: str = "x", output_name: str = "scores") -> onnx.ModelProto:
    """Export a float32 torch module with the TorchScript exporter (dynamic batch by default)."""
    import torch

    module = module.eval()
    buffer = io.BytesIO()
    axes = {input_name: {0: "N"}, output_name: {0: "N"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.as_tensor(example),), buffer, dynamo=False,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_axes=axes, opset_version=opset)
    return onnx.load_from_string(buffer.getvalue())


def torch_gradient(module, x: np.ndarray, target) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, d logits[n, target[n]] / d x)`` in float64 by torch autograd."""
    import torch

    module = copy.deepcopy(module).double().eval()
    inputs = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    logits = module(inputs)
    target = resolve_targets(logits.detach().numpy(), target)
    logits[torch.arange(len(target)), torch.as_tensor(target)].sum().backward()
    return logits.detach().numpy(), inputs.grad.numpy()


def torch_function_gradient(function, model: onnx.ModelProto, x: np.ndarray,
                            target) -> tuple[np.ndarray, np.ndarray]:
    """Torch autograd (float64) of ``flatten(function(x, weights)) @ head`` for an ``op_model``.

    ``function`` re-states the op under test in torch; ``weights`` are the model's initializers
    as float64 tensors (int64 ones stay numpy), so both sides use exactly the same numbers.
    """
    import torch

    weights = {}
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init)
        weights[init.name] = torch.from_numpy(value.astype(np.float64)) \
            if value.dtype.kind == "f" else value
    inputs = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    logits = torch.flatten(function(inputs, weights), 1) @ weights["head"]
    target = resolve_targets(logits.detach().numpy(), target)
    logits[torch.arange(len(target)), torch.as_tensor(target)].sum().backward()
    return logits.detach().numpy(), inputs.grad.numpy()


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17, ir_version: int = 8):
    """``helper.make_model`` with one ai.onnx opset and an explicit IR version."""
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=ir_version)


# -- the command line --------------------------------------------------------------------------
def cli(*args):
    """``rectonnx ARGS`` through click's test runner (arguments become strings)."""
    from click.testing import CliRunner

    from rectonnx.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *words):
    """Exit 2, exactly one ``error:`` line, no traceback, naming ``words``."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]

