"""rectonnx on a GPU: where onnxruntime places each node, agreement with the CPU, and speed.

    python benchmarks/gpu.py [--provider cuda|cpu] [--quick]
                             [--models paper_cnn,resnet50,shipped,shipped_fp16] [--out DIR]

The GPU goal of issue 4: "the CUDA provider runs the same graph with no CPU fallback nodes, and
beats Captum on CUDA". Per model (benchmarks/nets.py's paper CNN and ResNet-50 with random
weights, the shipped EfficientNet-Lite0 and, as ``shipped_fp16``, that model converted to
float16, whose explainers compute in float16 as it would be served: benchmarks/fp16.py) and
explainer graph (saliency, guided backprop,
RectGrad q=98 with the exact TopK threshold and with the TensorRT-safe bisection):

* placement: one profiled run; each node's provider. Nodes the provider leaves to the CPU are
  split into shape arithmetic (integer or bool tensors of at most 16 elements: the CUDA provider
  keeps such nodes on the CPU on purpose) and compute (the fallbacks that matter); Memcpy nodes
  are copies between host and device.
* agreement: logits and attribution on the provider vs the same graph on the CPU provider, as
  the largest difference relative to the largest value, and the share of attribution values
  that differ by more than 1e-3 of it (a RectGrad gate can flip where a score lies within
  rounding of its threshold, so a few may).
* speed: median over interleaved rounds of onnxruntime inference and of each explainer graph
  with inputs and outputs on the device (IO binding), the ``Explainer`` as a user calls it
  (host arrays in and out), and eager PyTorch RectGrad and Captum's GuidedBackprop on the same
  device (inputs on the device; CUDA synchronised after each call).

``--provider cpu`` runs the same checks on the CPU provider (what CI and a machine without a
GPU can do). CUDA needs onnxruntime-gpu built for the machine's CUDA (1.31 wheels: CUDA 13),
PyTorch with CUDA for the torch contenders and captum for Captum's. Writes gpu.md and gpu.json
to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

try:  # CUDA libraries of a CUDA build of torch load first, so onnxruntime finds them
    import torch
except ImportError:  # placement and onnxruntime speed need no torch
    torch = None
import onnxruntime as ort  # noqa: E402

from bench import PAUSE_S, save  # noqa: E402
from rectonnx import rewrite  # noqa: E402
from rectonnx.rewrite import ATTRIBUTION, LOGITS  # noqa: E402
from rectonnx.runtime import Explainer, cuda_usable  # noqa: E402

Q = 98.0
METHODS = [("saliency", "saliency", {}),
           ("guided_backprop", "guided_backprop", {}),
           ("rectgrad", "rectgrad", {"q": Q, "padding_trick": False}),
           ("rectgrad (bisect)", "rectgrad", {"q": Q, "threshold": "bisect",
                                              "padding_trick": False})]
SHAPE_ELEMENTS = 16  # at most this many integer/bool elements: shape arithmetic
PROVIDERS = {"cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "cpu": ["CPUExecutionProvider"]}


class ProviderMissing(RuntimeError):
    pass


def providers_for(kind: str) -> list[str]:
    if kind == "cuda" and not cuda_usable():
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            why = (f"this onnxruntime ({ort.__version__}) has no CUDA provider: install "
                   "onnxruntime-gpu")
        else:
            try:
                from onnxruntime.capi.build_and_package_info import cuda_version
            except ImportError:
                cuda_version = "?"
            why = (f"onnxruntime-gpu {ort.__version__} is installed but its CUDA provider does "
                   f"not load: no NVIDIA driver, or no CUDA {cuda_version} / cuDNN libraries")
        raise ProviderMissing(why)
    return PROVIDERS[kind]


def session(model: onnx.ModelProto, providers: list[str], profile_dir: str | None = None):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # idle worker threads sleep at once instead of spinning, which would slow PyTorch
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(profile_dir) / "placement")
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)


def input_dtype(model: onnx.ModelProto):
    """The numpy type of the model's data input (float32, or float16 for a float16 model)."""
    return onnx.helper.tensor_dtype_to_np_dtype(
        model.graph.input[0].type.tensor_type.elem_type)


def feeds_of(graph: onnx.ModelProto, x: np.ndarray, target: np.ndarray) -> dict:
    names = [i.name for i in graph.graph.input]
    found = {names[0]: x}
    if len(names) > 1:
        found[names[1]] = target
    return found


# -- placement -------------------------------------------------------------------------------------
def is_shape_arithmetic(args: dict) -> bool:
    """True for a node whose inputs and outputs are all small integer/bool tensors."""
    tensors = list(args.get("input_type_shape", [])) + list(args.get("output_type_shape", []))
    for tensor in tensors:
        for dtype, shape in tensor.items():
            if dtype not in ("int64", "int32", "bool") or int(np.prod(shape)) > SHAPE_ELEMENTS:
                return False
    return True


def placement(graph: onnx.ModelProto, providers: list[str], feeds: dict) -> dict:
    """Which provider ran each node of ``graph`` in one profiled run."""
    with tempfile.TemporaryDirectory() as tmp:
        profiled = session(graph, providers, profile_dir=tmp)
        profiled.run(None, feeds)
        with open(profiled.end_profiling()) as handle:
            events = json.load(handle)
    return dict(summarise_placement(events, providers[0]), graph_nodes=len(graph.graph.node))


def summarise_placement(events: list[dict], wanted: str) -> dict:
    """Node counts per provider from onnxruntime profile ``events``; the nodes not on
    ``wanted``, split into shape arithmetic and compute; the host/device copies."""
    nodes = {event["name"].removesuffix("_kernel_time"): event["args"] for event in events
             if event.get("cat") == "Node" and event["name"].endswith("_kernel_time")}
    elsewhere = {name: args for name, args in nodes.items() if args.get("provider") != wanted}
    copies = {name for name, args in nodes.items() if args["op_name"].startswith("Memcpy")}
    compute = sorted(f"{args['op_name']} {name}" for name, args in elsewhere.items()
                     if name not in copies and not is_shape_arithmetic(args))
    return dict(provider=wanted, nodes=len(nodes),
                by_provider=dict(Counter(args.get("provider") for args in nodes.values())),
                shape_nodes_elsewhere=sum(1 for name, args in elsewhere.items()
                                          if name not in copies and is_shape_arithmetic(args)),
                compute_nodes_elsewhere=compute, copies=len(copies))


# -- agreement -------------------------------------------------------------------------------------
def agreement(graph: onnx.ModelProto, providers: list[str], feeds: dict) -> dict:
    """The provider's logits and attribution vs the CPU provider's, for the same graph."""
    names = [ATTRIBUTION, LOGITS]
    on_provider = session(graph, providers).run(names, feeds)
    on_cpu = session(graph, PROVIDERS["cpu"]).run(names, feeds)
    found = {}
    for name, got, want in zip(("attribution", "logits"), on_provider, on_cpu):
        scale = float(np.abs(want).max()) or 1.0
        difference = np.abs(got - want)
        found[f"{name}_max_rel"] = float(difference.max() / scale)
        found[f"{name}_share_off"] = float((difference > 1e-3 * scale).mean())
    return found


# -- speed -----------------------------------------------------------------------------------------
class DeviceRun:
    """One graph run with inputs and outputs bound on the provider's device (IO binding)."""

    def __init__(self, made, feeds: dict, device: str):
        self.session = made
        self.binding = made.io_binding()
        for name, value in feeds.items():
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value,
                                                                                   device, 0))
        for output in made.get_outputs():
            self.binding.bind_output(output.name, device)

    def __call__(self):
        self.session.run_with_iobinding(self.binding)


def timed(contenders: dict, rounds: int, warmup: int, synchronise) -> dict[str, list[float]]:
    """Milliseconds per call of each contender, rounds interleaved after ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for index in range(warmup + rounds):
        for name, run in contenders.items():
            synchronise()
            started = time.perf_counter()
            run()
            synchronise()
            if index >= warmup:
                times[name].append((time.perf_counter() - started) * 1000)
            time.sleep(PAUSE_S)  # PyTorch's CPU threads go to sleep before the next contender
    return times


def torch_contenders(net, x: np.ndarray, target: np.ndarray, device: str) -> dict:
    from eager import CaptumGuided, TorchRectGrad

    net = net.to(device)
    inputs = torch.from_numpy(x).to(device)
    classes = torch.from_numpy(target).to(device)
    rect = TorchRectGrad(net, Q)

    def inference():
        with torch.no_grad():
            net(inputs)

    found = {"torch inference": inference,
             "torch RectGrad (eager)": lambda: rect(inputs, classes)}
    try:
        guided = CaptumGuided(net)
        found["Captum GuidedBackprop"] = lambda: guided(inputs, classes)
    except ImportError:
        pass
    return found


def speed(name: str, model: onnx.ModelProto, graphs: dict, net, shape, batches, kind: str,
          rounds: int, warmup: int) -> list[dict]:
    import warnings

    providers = PROVIDERS[kind]
    device = "cuda" if kind == "cuda" else "cpu"
    synchronise = torch.cuda.synchronize if (kind == "cuda" and torch is not None) else \
        (lambda: None)
    forward = session(model, providers)
    rows = []
    for batch in batches:
        x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(
            input_dtype(model))
        target = forward.run(None, {model.graph.input[0].name: x})[0].argmax(1).astype(np.int64)
        contenders = {"onnxruntime inference": DeviceRun(forward, {model.graph.input[0].name: x},
                                                         device)}
        for label, graph in graphs.items():
            contenders[f"rectonnx {label}"] = DeviceRun(session(graph, providers),
                                                        feeds_of(graph, x, target), device)
        explainer = Explainer.from_graph(graphs["rectgrad"], providers=providers,
                                         batch_size=1 << 20, spinning=False)
        contenders["rectonnx rectgrad (Explainer, host arrays)"] = \
            lambda: explainer.explain(x, target)
        if net is not None and torch is not None:
            contenders.update(torch_contenders(net, x, target, device))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Captum's hook warnings
            times = timed(contenders, rounds, warmup, synchronise)
        reference = statistics.median(times["onnxruntime inference"])
        for contender, values in times.items():
            median = statistics.median(values)
            rows.append(dict(model=name, batch=batch, provider=providers[0], contender=contender,
                             ms=median, best_ms=min(values), x_inference=median / reference,
                             rounds=len(values)))
    return rows


def goals(rows: list[dict]) -> list[dict]:
    by_key: dict = {}
    for r in rows:
        by_key.setdefault((r["model"], r["batch"]), {})[r["contender"]] = r["ms"]
    found = []
    for (model, batch), ms in by_key.items():
        rect = ms["rectonnx rectgrad"]
        found.append(dict(model=model, batch=batch, goal="RectGrad / inference",
                          value=rect / ms["onnxruntime inference"]))
        for other in ("Captum GuidedBackprop", "torch RectGrad (eager)"):
            if other in ms:
                found.append(dict(model=model, batch=batch, goal=f"{other} / rectonnx RectGrad "
                                  "(> 1: rectonnx faster)", value=ms[other] / rect))
    return found


# -- models ----------------------------------------------------------------------------------------
def load_models(names: list[str], quick: bool):
    """``(name, torch module or None, onnx model, input shape, batches)`` per requested model."""
    import nets

    plan = {"paper_cnn": [2] if quick else [1, 64], "resnet50": [1] if quick else [1, 8, 32],
            "efficientnet_lite0": [1] if quick else [1, 8]}
    for name in names:
        if name in ("shipped", "shipped_fp16"):
            from rectonnx import models
            path = models.path(models.EFFICIENTNET_LITE0)
            if name == "shipped":
                model, label = onnx.load(str(path)), "efficientnet_lite0 (shipped)"
            else:
                from fp16 import half_model
                model, label = half_model(path), "efficientnet_lite0 (shipped, float16)"
            dims = model.graph.input[0].type.tensor_type.shape.dim
            yield (label, None, model, tuple(d.dim_value for d in dims[1:]),
                   [1] if quick else [1, 8])
            continue
        if name not in nets.MODELS:
            raise SystemExit(f"error: unknown model {name!r}; choose from "
                             f"{', '.join(list(nets.MODELS) + ['shipped', 'shipped_fp16'])}")
        net, model, shape = nets.build(name)
        yield name, net, model, shape, plan[name]


def check_model(name: str, model: onnx.ModelProto, shape, kind: str, methods) -> tuple:
    """Placement and agreement rows of each explainer graph, and the graphs (label -> model)."""
    providers = PROVIDERS[kind]
    x = np.random.default_rng(0).standard_normal((2, *shape)).astype(input_dtype(model))
    target = session(model, PROVIDERS["cpu"]).run(
        None, {model.graph.input[0].name: x})[0].argmax(1).astype(np.int64)
    graphs, placed, agreed = {}, [], []
    for label, method, options in methods:
        graph = rewrite(model, method, runtime="any", **options)
        graphs[label] = graph
        feeds = feeds_of(graph, x, target)
        placed.append(dict(model=name, method=label, **placement(graph, providers, feeds)))
        agreed.append(dict(model=name, method=label, **agreement(graph, providers, feeds)))
    return graphs, placed, agreed


# -- report ----------------------------------------------------------------------------------------
def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def markdown(report: dict) -> str:
    placement_rows = []
    for p in report["placement"]:
        elsewhere = ", ".join(p["compute_nodes_elsewhere"][:6]) or "none"
        if len(p["compute_nodes_elsewhere"]) > 6:
            elsewhere += f" (+{len(p['compute_nodes_elsewhere']) - 6})"
        providers = ", ".join(f"{k}: {v}" for k, v in p["by_provider"].items())
        placement_rows.append([p["model"], p["method"], p["nodes"], providers,
                               p["shape_nodes_elsewhere"], elsewhere, p["copies"]])
    return "\n".join(
        [f"Provider: {report['provider']}; device: {report['device']}; onnxruntime "
         f"{report['onnxruntime']}, torch {report['torch']}; {report['date']}.", "",
         "### Placement (one profiled run, batch 2)", ""]
        + markdown_table(["model", "method", "nodes run", "by provider", "shape nodes elsewhere",
                          "compute nodes elsewhere", "host/device copies"], placement_rows)
        + ["", "### Agreement with the CPU provider (batch 2)", ""]
        + markdown_table(["model", "method", "attribution max rel diff", "share > 1e-3",
                          "logits max rel diff"],
                         [[a["model"], a["method"], f"{a['attribution_max_rel']:.1e}",
                           f"{a['attribution_share_off']:.2e}", f"{a['logits_max_rel']:.1e}"]
                          for a in report["agreement"]])
        + ["", "### Speed (median over interleaved rounds)", ""]
        + markdown_table(["model", "batch", "contender", "ms", "best ms", "x inference"],
                         [[r["model"], r["batch"], r["contender"], f"{r['ms']:.2f}",
                           f"{r['best_ms']:.2f}", f"{r['x_inference']:.2f}"]
                          for r in report["speed"]])
        + [""] + markdown_table(["model", "batch", "ratio", "value"],
                                [[g["model"], g["batch"], g["goal"], f"{g['value']:.2f}"]
                                 for g in report["goals"]]))


def device_name(kind: str) -> str:
    if kind == "cuda" and torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform
    return f"CPU ({platform.processor() or platform.machine()})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", choices=sorted(PROVIDERS), default="cuda")
    parser.add_argument("--quick", action="store_true", help="few rounds, small batches")
    parser.add_argument("--models", default="paper_cnn,resnet50,shipped,shipped_fp16")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch contenders")
    parser.add_argument("--out", default="benchmarks/results/gpu")
    args = parser.parse_args(argv)
    try:
        providers_for(args.provider)
    except ProviderMissing as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import datetime
    rounds, warmup = (2, 1) if args.quick else (20, 3)
    report = dict(provider=PROVIDERS[args.provider][0], device=device_name(args.provider),
                  onnxruntime=ort.__version__, torch=getattr(torch, "__version__", None),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  quick=args.quick, placement=[], agreement=[], speed=[], goals=[])
    methods = METHODS[2:3] if args.quick else METHODS
    for name, net, model, shape, batches in load_models(
            [n for n in args.models.split(",") if n], args.quick):
        print(f"[gpu] {name}: placement and agreement", file=sys.stderr, flush=True)
        graphs, placed, agreed = check_model(name, model, shape, args.provider, methods)
        report["placement"] += placed
        report["agreement"] += agreed
        print(f"[gpu] {name}: speed", file=sys.stderr, flush=True)
        report["speed"] += speed(name, model, graphs, None if args.no_torch else net, shape,
                                 batches, args.provider, rounds, warmup)
    report["goals"] = goals(report["speed"])
    table = markdown(report)
    print(table)
    save(Path(args.out), "gpu", table, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
