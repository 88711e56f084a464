"""rectonnx speed and memory, side by side with onnxruntime inference, eager PyTorch and Captum.

    python benchmarks/bench.py [--quick] [--out DIR] [--micro] [--extra] [--rounds N]
        [--models paper_cnn,resnet50,efficientnet_lite0] [--compile inductor,aot_eager|none]

Models (benchmarks/nets.py): the paper's CIFAR CNN and ResNet-50 (224 px) with random weights,
exported to ONNX, and the shipped EfficientNet-Lite0 (models/efficientnet_lite0.onnx, its own
photos as inputs) with a torch twin that reads its weights from the ONNX file. Per model and
batch size (paper CNN 1 and 64, the others 1 and 8) it measures:

* onnxruntime inference of the exported model, with spinning off (as every rectonnx contender)
  and with onnxruntime's default session options (spinning on); the ratios are taken against
  the faster of the two (``INFERENCE``: the reference, ratio 1.0 for the faster);
* rectonnx explainer graphs: saliency, RectGrad q = 98 with the exact threshold ("topk") and
  with ``threshold="approx"`` (default recall), and with ``--extra`` guided backprop and the
  TensorRT-safe "bisect", run by ``rectonnx.Explainer`` as a user calls it;
* eager PyTorch: the forward pass, RectGrad by autograd-function gating with torch.topk
  (benchmarks/eager.py), the same under ``torch.compile`` (each backend of ``--compile`` in
  turn until one compiles and agrees with eager; the compile time is printed and recorded, not
  timed; a failure is reported as "did not compile: reason"), and Captum's GuidedBackprop and
  Saliency;
* the approximation's agreement with exact RectGrad (benchmarks/approx.py's ``compare``: map
  cosine, top-5 % overlap, per-layer recall of the exact gates' units);
* (full mode) the optimisations one at a time, each switched back to its old form in an
  otherwise identical graph: plain TopK, ConvTranspose backward, ``Where`` gate, full-size
  percentile under max pools, ScatterElements max-pool backward;
* peak memory (RSS) of one attribution run in a fresh subprocess per contender;
* how onnxruntime optimises the graph (nodes before/after, fused and NCHWc convolutions).

Timing: every contender of a (model, batch) runs once per round, rounds interleaved, so machine
noise hits all alike; the median over rounds is reported (and the best). onnxruntime sessions
are created with ``session.intra_op.allow_spinning = 0``: spinning worker threads otherwise steal
the CPU from the PyTorch call that follows (up to 60x slower on 2 cores); a short pause separates
contenders, and a 0.5 s one follows the default-options (spinning) inference session. Numbers
are reported, never asserted: ``--quick`` (CI: no torch.compile, no ablation, batch 1 except
the paper CNN's 16, 3 rounds) takes about a minute; the full run prints each part's time as
it goes (estimated from a quiet run's per-contender times: about 6 min of timed rounds, 1-2
min building graphs, exporting and measuring memory, and torch.compile's compiles, 4-5 min
with an empty inductor cache, 1-2 min with a warm one: 10-13 min on a quiet 2-core machine;
a loaded machine slows PyTorch's contenders most, up to tens of times).
Writes ``bench.md`` and ``bench.json`` (with machine, versions and load average) to ``--out``:
the summary table of the issue's done-condition first, then a paragraph stating which goals
hold and by how much (README copies it), then every table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import rectonnx  # noqa: E402
from rectonnx.runtime import Explainer, make_session  # noqa: E402

PAUSE_S = 0.02  # between contenders: lets PyTorch's OpenMP threads go to sleep
SPIN_PAUSE_S = 0.5  # after a contender whose onnxruntime threads spin (default options)
INFERENCE = ("onnxruntime inference", "onnxruntime inference (default options)")
Q = 98.0


# -- timing ----------------------------------------------------------------------------------------
CPU_TIMES: dict[str, list[float]] = {}  # CPU ms (all threads) of the last interleaved() call


def interleaved(contenders: dict, rounds: int, warmup: int,
                label: str | None = None) -> dict[str, list[float]]:
    """Wall milliseconds per call of each contender, ``rounds`` interleaved rounds after warm-up.

    The process CPU time of each call (all threads, ms) goes to ``CPU_TIMES``: on a busy
    machine it still measures the work done, where wall time also counts waiting for a core.
    With a ``label``, the time the rest will take (from the first round) goes to stderr.
    """
    times: dict[str, list[float]] = {name: [] for name in contenders}
    CPU_TIMES.clear()
    CPU_TIMES.update({name: [] for name in contenders})
    block_started = time.perf_counter()
    for round_index in range(warmup + rounds):
        if label and round_index == 1:
            per_round = time.perf_counter() - block_started
            print(f"[bench] {label}: {per_round:.1f} s a round, about "
                  f"{per_round * (warmup + rounds - 1):.0f} s to go", file=sys.stderr, flush=True)
        for name, run in contenders.items():
            cpu_started, started = time.process_time(), time.perf_counter()
            run()
            elapsed = (time.perf_counter() - started) * 1000
            cpu = (time.process_time() - cpu_started) * 1000
            if round_index >= warmup:
                times[name].append(elapsed)
                CPU_TIMES[name].append(cpu)
            time.sleep(SPIN_PAUSE_S if name == INFERENCE[1] else PAUSE_S)
    return times


def inference_reference(values: dict) -> float:
    """The faster of the inference contenders present in ``values`` (name -> median)."""
    return min(values[name] for name in INFERENCE if name in values)


# -- contenders ------------------------------------------------------------------------------------
def ort_session(model: onnx.ModelProto):
    return make_session(model, ["CPUExecutionProvider"], spinning=False)


def explainer(model: onnx.ModelProto, method: str, **options) -> Explainer:
    return Explainer(model, method, providers=["CPUExecutionProvider"], batch_size=1 << 20,
                     spinning=False, **options)


def compiled_rectgrad(net, inputs, classes, reference, backends) -> tuple:
    """``(callable or None, log)``: eager RectGrad under ``torch.compile`` with the first of
    ``backends`` that compiles (static shapes: one compile per batch size, made and checked
    here by a first call whose time is the compile time, kept out of the timing)."""
    import torch

    from eager import TorchRectGrad

    log = []
    for backend in backends:
        started = time.perf_counter()
        try:
            rect = TorchRectGrad(net, Q, compile=backend)
            _, attribution = rect(inputs, classes)
            seconds = time.perf_counter() - started
            # compiled kernels round differently, so a few units at a layer's threshold may
            # flip: the check is the maps' cosine, as approx's (max difference recorded);
            # ResNet-50 (random weights) at batch 8 measured 0.995, a broken compile far less
            a, b = attribution.reshape(len(inputs), -1), reference.reshape(len(inputs), -1)
            cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())
            error = float((a - b).abs().max()) / (float(b.abs().max()) or 1.0)
            log.append(dict(backend=backend, compile_s=seconds, cosine_vs_eager=cosine,
                            max_rel_error=error))
            if not cosine > 0.98:
                log[-1]["error"] = f"map differs from eager (cosine {cosine:.3f})"
                continue
            return (lambda: rect(inputs, classes)), log
        except Exception as failure:  # noqa: BLE001 -- any compile failure is a result
            reason = f"{type(failure).__name__}: {str(failure).strip().splitlines()[0][:200]}" \
                if str(failure).strip() else type(failure).__name__
            log.append(dict(backend=backend, compile_s=time.perf_counter() - started,
                            error=reason))
            torch._dynamo.reset()
    return None, log


def torch_contenders(net, x: np.ndarray, target: np.ndarray, compile_backends=(),
                     compile_log: list | None = None) -> dict:
    import torch

    from eager import CaptumGuided, TorchRectGrad

    inputs = torch.from_numpy(x)
    classes = torch.from_numpy(target)
    rect = TorchRectGrad(net, Q)
    found = {"torch inference": lambda: _no_grad(net, inputs),
             "torch RectGrad (eager)": lambda: rect(inputs, classes)}
    if compile_backends:
        run, log = compiled_rectgrad(net, inputs, classes, rect(inputs, classes)[1],
                                     compile_backends)
        if compile_log is not None:
            compile_log.append(dict(batch=len(x), tries=log, compiled=run is not None))
        if run is not None:
            found[COMPILED] = run
    try:
        from eager import CaptumSaliency

        guided, saliency = CaptumGuided(net), CaptumSaliency(net)
        found["Captum GuidedBackprop"] = lambda: guided(inputs, classes)
        found["Captum Saliency"] = lambda: saliency(inputs, classes)
    except ImportError:  # captum not installed: report the rest
        pass
    return found


def _no_grad(net, inputs):
    import torch

    with torch.no_grad():
        return net(inputs)


EXPLAINERS = [("saliency", "saliency", {}),
              ("rectgrad", "rectgrad", {"q": Q, "padding_trick": False}),
              ("rectgrad (approx)", "rectgrad", {"q": Q, "threshold": "approx",
                                                 "padding_trick": False})]
EXTRA_EXPLAINERS = [("guided_backprop", "guided_backprop", {}),
                    ("rectgrad (bisect)", "rectgrad", {"q": Q, "threshold": "bisect",
                                                       "padding_trick": False})]
COMPILED = "torch RectGrad (torch.compile)"


def bench_speed(name: str, net, model, shape, batches, rounds: int, warmup: int,
                with_torch: bool = True, explainers=EXPLAINERS,
                graphs: dict | None = None, compile_backends=(),
                compile_log: list | None = None, inputs=None) -> list[dict]:
    """Speed rows; the explainer graphs built go into ``graphs`` (label -> ModelProto), the
    torch.compile tries into ``compile_log``; ``inputs(batch)`` gives the images (default:
    random normal)."""
    import warnings

    forward = ort_session(model)
    default = make_session(model, ["CPUExecutionProvider"])  # onnxruntime's default options
    input_name = model.graph.input[0].name
    built = {}
    for label, method, options in explainers:
        started = time.perf_counter()
        made = explainer(model, method, **options)
        built[label] = (made, time.perf_counter() - started)
        if graphs is not None:
            graphs[label] = made.graph
    rows = []
    for batch in batches:
        x = inputs(batch) if inputs else \
            np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
        logits = forward.run(None, {input_name: x})[0]
        target = logits.argmax(axis=1).astype(np.int64)
        contenders = {INFERENCE[0]: lambda: forward.run(None, {input_name: x}),
                      INFERENCE[1]: lambda: default.run(None, {input_name: x})}
        for label, (made, _) in built.items():
            contenders[f"rectonnx {label}"] = lambda made=made: made.explain(x, target)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Captum's hook warnings, torch.compile's
            if with_torch:
                log: list = []
                contenders.update(torch_contenders(net, x, target, compile_backends, log))
                for entry in log:
                    if compile_log is not None:
                        compile_log.append(dict(model=name, **entry))
                    for tried in entry["tries"]:
                        print(f"[bench] {name} batch {batch}: torch.compile "
                              f"{tried['backend']}: {tried['compile_s']:.1f} s"
                              + (f", {tried['error']}" if "error" in tried else ""),
                              file=sys.stderr, flush=True)
            times = interleaved(contenders, rounds, warmup, f"{name} batch {batch}")
        reference = inference_reference({k: statistics.median(v) for k, v in times.items()})
        cpu_reference = inference_reference({k: statistics.median(v)
                                             for k, v in CPU_TIMES.items()})
        for contender, values in times.items():
            median = statistics.median(values)
            cpu = statistics.median(CPU_TIMES[contender])
            row = dict(model=name, batch=batch, contender=contender, ms=median,
                       best_ms=min(values), ms_per_image=median / batch,
                       x_inference=median / reference, cpu_ms=cpu,
                       cpu_x_inference=cpu / cpu_reference, rounds=len(values))
            label = contender.removeprefix("rectonnx ")
            if label in built:
                row["nodes"] = len(built[label][0].graph.graph.node)
                row["setup_s"] = built[label][1]
            rows.append(row)
    return rows


def bench_shipped(rounds: int, warmup: int, skip=()) -> list[dict]:
    """The shipped ONNX models (rectonnx.models), where present and not in ``skip`` (those
    benchmarked with their torch twins): onnxruntime only."""
    try:
        from rectonnx import models
    except ImportError:
        return []
    rows = []
    for name in (models.PAPER_CNN, models.EFFICIENTNET_LITE0):
        if name in skip:
            continue
        try:
            model = onnx.load(str(models.path(name)))
        except FileNotFoundError:
            continue
        dims = model.graph.input[0].type.tensor_type.shape.dim
        shape = tuple(d.dim_value for d in dims[1:])
        batches = [1, 8] if dims[0].dim_value in (0, None) else [dims[0].dim_value]
        rows += bench_speed(f"{name} (shipped)", None, model, shape, batches, rounds, warmup,
                            with_torch=False, explainers=EXPLAINERS)
    return rows


# -- the approximation's agreement with exact RectGrad ---------------------------------------------
def bench_agreement(name: str, model, x: np.ndarray) -> dict:
    """threshold="approx" against exact RectGrad q=98 (default recall) on the images ``x``:
    benchmarks/approx.py's ``compare`` (map cosine, top-5 % overlap, per-layer recall of the
    exact gates' units)."""
    import approx

    from rectonnx.threshold import DEFAULT_RECALL

    found = approx.compare(model, x, Q, DEFAULT_RECALL)
    return dict(model=name, q=Q, recall=DEFAULT_RECALL, **found)


def agreement_inputs(name: str, shape, count: int) -> np.ndarray:
    """The shipped model's own images where it has some (approx.py's), random normal ones else."""
    import approx
    import nets

    if name in approx.SHIPPED or name in nets.SHIPPED:
        return approx.load(name, count)[1]
    return nets.random_batch(shape, count)


# -- the optimisations one at a time ---------------------------------------------------------------
def legacy_threshold(g, scores, shape, q, algorithm="topk", q_tensor=None, recall=None):
    """rectonnx's first threshold: one sorted TopK over all M scores, then ReduceMin."""
    from rectonnx.threshold import percentile_rank

    rank = len(shape)
    flat = g.Reshape(scores, g.ints([0, -1], "per_sample"), hint="scores_flat")
    k = g.ints([percentile_rank(int(np.prod(shape[1:])), q)], "k")
    top, _ = g.op("TopK", flat, k, axis=1, largest=1, sorted=1, outputs=2, hint="top")
    tau = g.ReduceMin(top, axes=[1], keepdims=1, hint="tau")
    return g.Reshape(tau, g.ints([-1] + [1] * (rank - 1), "broadcast"), hint="tau")


def legacy_gate(q, tau, threshold="topk", q_tensor=None, recall=None):
    """rectonnx's first gate: ``Where(y R > tau, R, 0)``."""
    import rectonnx.gates as gates

    def gate(ctx, act):
        g = ctx.g
        scores = g.Mul(act.y, act.upstream, hint="importance")
        cut = gates.percentile_threshold(g, scores, ctx.shape(act.y), q, threshold)
        passed = act.upstream if act.is_relu else act.exact
        return g.Where(g.Greater(scores, cut), passed, g.scalar(0.0), hint="rectgrad")
    return gate


@contextlib.contextmanager
def switched_off(*features: str):
    """Rewrite with the named optimisations replaced by what rectonnx did before them."""
    import rectonnx.gates as gates
    import rectonnx.methods as methods  # the registry builds RectGrad with its rectified_gate
    import rectonnx.rules.linear as linear
    import rectonnx.rules.pool as pool

    saved = (gates.percentile_threshold, methods.rectified_gate, linear.flipped_kernel_plan,
             gates._pooled_threshold, pool._unpool_pads)
    try:
        if "threshold" in features:
            gates.percentile_threshold = legacy_threshold
        if "gate" in features:
            methods.rectified_gate = legacy_gate
        if "conv" in features:
            linear.flipped_kernel_plan = lambda *args: None
        if "pooled" in features:
            gates._pooled_threshold = lambda *args: None
        if "unpool" in features:
            pool._unpool_pads = lambda *args: None
        yield
    finally:
        (gates.percentile_threshold, methods.rectified_gate, linear.flipped_kernel_plan,
         gates._pooled_threshold, pool._unpool_pads) = saved


ABLATIONS = [
    ("all optimisations", ()),
    ("plain sorted TopK threshold (was)", ("threshold",)),
    ("ConvTranspose backward (was)", ("conv",)),
    ("Where gate (was)", ("gate",)),
    ("full-size percentile and gate under max pools (was)", ("pooled",)),
    ("ScatterElements max-pool backward (was)", ("unpool",)),
    ("none: the first rectonnx graph", ("threshold", "conv", "gate", "pooled", "unpool")),
]


def bench_ablation(name: str, model, shape, batch: int, rounds: int, warmup: int) -> list[dict]:
    forward = ort_session(model)
    input_name = model.graph.input[0].name
    x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
    target = forward.run(None, {input_name: x})[0].argmax(axis=1).astype(np.int64)
    contenders, graphs = {"onnxruntime inference": lambda: forward.run(None, {input_name: x})}, {}
    for label, features in ABLATIONS:
        with switched_off(*features):
            made = explainer(model, "rectgrad", q=Q, padding_trick=False)
        graphs[label] = made.graph
        contenders[label] = lambda made=made: made.explain(x, target)
    reference_map = contenders["all optimisations"]().attribution
    times = interleaved(contenders, rounds, warmup)
    reference = statistics.median(times["onnxruntime inference"])
    full = statistics.median(times["all optimisations"])
    rows = []
    for label, values in times.items():
        median = statistics.median(values)
        row = dict(model=name, batch=batch, variant=label, ms=median, best_ms=min(values),
                   x_inference=median / reference, vs_all=median / full)
        if label in graphs:
            made_map = contenders[label]().attribution
            row["same_attribution"] = bool(np.allclose(made_map, reference_map, rtol=1e-4,
                                                       atol=1e-6 * np.abs(reference_map).max()))
            row["nodes"] = len(graphs[label].graph.node)
            row["file_mb"] = graphs[label].ByteSize() / 2 ** 20
        rows.append(row)
    return rows


# -- onnxruntime's graph optimisations ----------------------------------------------------------
def ort_optimisations(name: str, model: onnx.ModelProto, graph: onnx.ModelProto) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(graph.SerializeToString(), options,
                             providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    ops: dict[str, int] = {}
    for node in optimized.graph.node:
        key = f"{node.domain + ':' if node.domain else ''}{node.op_type}"
        ops[key] = ops.get(key, 0) + 1
    fused = sum(1 for n in optimized.graph.node if n.op_type in ("Conv", "FusedConv") and any(
        a.name == "activation" for a in n.attribute))
    standard = {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}
    return dict(model=name, nodes=len(graph.graph.node), optimized_nodes=len(optimized.graph.node),
                optimized_ops=ops, convs_with_fused_activation=fused,
                nchwc_nodes=sum(v for k, v in ops.items() if "nchwc" in k),
                standard_onnx_only=standard, file_mb=graph.ByteSize() / 2 ** 20,
                source_file_mb=model.ByteSize() / 2 ** 20)


# -- memory ----------------------------------------------------------------------------------------
def probe(kind: str, model_dir: str, name: str, batch: int) -> None:
    """Child process: set up one contender, run one attribution, print peak RSS as JSON.

    Peak RSS is the kernel's high-water mark ``VmHWM`` of this process (``ru_maxrss`` would
    carry the parent's peak over the fork)."""

    def status_mb(field: str) -> float:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    target = np.zeros(batch, np.int64)
    if kind.startswith("rectonnx"):  # no torch in this process
        budget = float(kind.split(":")[1]) if ":" in kind else None
        made = Explainer.from_graph(Path(model_dir) / f"{name}_rectgrad.onnx",
                                    providers=["CPUExecutionProvider"], batch_size=batch,
                                    memory_budget_mb=budget)
        x = np.random.default_rng(0).standard_normal(
            (batch, *made.input_shape[1:])).astype(np.float32)
        run = lambda: made.explain(x, target)  # noqa: E731
        extra = {"chunk": made.batch_size}
    else:
        import torch

        import nets
        from eager import CaptumGuided, TorchRectGrad

        x = nets.random_batch(nets.MODELS[name][1], batch)
        net = nets.MODELS[name][0](calibrate=False) if name == "resnet50" else \
            nets.MODELS[name][0]()
        net.load_state_dict(torch.load(Path(model_dir) / f"{name}.pt"))
        method = TorchRectGrad(net, Q) if kind == "torch" else CaptumGuided(net)
        del net
        inputs, classes = torch.from_numpy(x), torch.from_numpy(target)
        run = lambda: method(inputs, classes)  # noqa: E731
        extra = {}
    import gc
    gc.collect()
    before = status_mb("VmRSS")
    setup_peak = status_mb("VmHWM")
    run()
    print(json.dumps(dict(kind=kind, before_mb=before, setup_peak_mb=setup_peak,
                          peak_mb=status_mb("VmHWM"), **extra)))


def bench_memory(name: str, net, graph, batch: int, budget_mb: float | None,
                 kinds=("rectonnx", "torch", "captum")) -> list[dict]:
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(graph, str(Path(tmp) / f"{name}_rectgrad.onnx"))
        torch.save(net.state_dict(), Path(tmp) / f"{name}.pt")
        for kind in list(kinds) + ([f"rectonnx:{budget_mb}"] if budget_mb else []):
            done = subprocess.run([sys.executable, __file__, "--probe", kind, tmp, name,
                                   str(batch)], capture_output=True, text=True, cwd=HERE.parent)
            if done.returncode != 0:
                rows.append(dict(model=name, batch=batch, contender=kind,
                                 error=done.stderr.strip().splitlines()[-1:]))
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            label = {"rectonnx": "rectonnx RectGrad (Explainer)", "torch": "torch RectGrad (eager)",
                     "captum": "Captum GuidedBackprop"}.get(kind, f"rectonnx RectGrad, "
                                                                  f"memory_budget_mb={budget_mb}")
            rows.append(dict(model=name, batch=batch, contender=label,
                             peak_mb=result["peak_mb"], setup_peak_mb=result["setup_peak_mb"],
                             before_run_mb=result["before_mb"],
                             run_growth_mb=result["peak_mb"] - result["before_mb"],
                             chunk=result.get("chunk")))
    return rows


# -- report ----------------------------------------------------------------------------------------
def machine() -> dict:
    import numpy
    info = dict(python=platform.python_version(), platform=platform.platform(),
                machine=platform.machine(), cores=os.cpu_count(), onnx=onnx.__version__,
                onnxruntime=ort.__version__, numpy=numpy.__version__,
                rectonnx=getattr(rectonnx, "__version__", "dev"),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = cpuinfo.read().splitlines()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in lines
                           if line.startswith("model name"))
        flags = next((line.split(":", 1)[1].split() for line in lines
                      if line.startswith("flags")), [])
        # the widest vector unit decides onnxruntime's NCHWc block and conv speed
        info["simd"] = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else \
            "SSE/other"
        with open("/proc/meminfo") as meminfo:
            info["memory_gb"] = round(int(meminfo.readline().split()[1]) / 2 ** 20, 1)
    except (OSError, StopIteration):
        pass
    for package in ("torch", "captum"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m.get('cpu', m['machine'])} ({m.get('simd', '?')}), {m['cores']} cores, "
             f"{m.get('memory_gb', '?')} GB; Python {m['python']}, onnxruntime "
             f"{m['onnxruntime']} (CPUExecutionProvider), onnx {m['onnx']}, torch {m['torch']}, "
             f"captum {m['captum']}; {m['date']}. Load average before/after: "
             f"{report['load_before']} / {report['load_after']}."
             + (f" Run time {report['seconds'] / 60:.1f} min." if report.get("seconds") else "")
             + (" (--quick: few rounds, small batches.)" if report.get("quick") else ""), ""]
    lines += summary(report)
    lines += ["### Speed (median over interleaved rounds; CPU ms = process CPU time, all threads)",
              "", "x inference: against the faster of onnxruntime inference with spinning off "
              "and with its default session options (spinning on, then a 0.5 s pause).", "",
              "| model | batch | contender | ms | best ms | ms / image | x inference | "
              "CPU ms | CPU x inference |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["speed"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['contender']} | {r['ms']:.1f} | "
                     f"{r['best_ms']:.1f} | {r['ms_per_image']:.2f} | {r['x_inference']:.2f} | "
                     f"{r['cpu_ms']:.1f} | {r['cpu_x_inference']:.2f} |")
    if report["goals"]:
        lines += ["", "### Goals (wall: median time; CPU: median process CPU time)", "",
                  "| model | batch | goal | time | value | holds |", "|---|---|---|---|---|---|"]
        for g in report["goals"]:
            lines.append(f"| {g['model']} | {g['batch']} | {g['goal']} | {g['unit']} | "
                         f"{g['value']:.2f} | {'yes' if g['holds'] else 'no'} |")
    if report.get("compile"):
        lines += ["", "### torch.compile of eager RectGrad (one compile per batch size, static "
                  "shapes; compile time = the first call, not in the timing)", "",
                  "| model | batch | backend | compile s | cosine vs eager (min over samples) | "
                  "max abs diff / max | result |", "|---|---|---|---|---|---|---|"]
        for entry in report["compile"]:
            for t in entry["tries"]:
                cosine = f"{t['cosine_vs_eager']:.4f}" if "cosine_vs_eager" in t else ""
                diff = f"{t['max_rel_error']:.2g}" if "max_rel_error" in t else ""
                lines.append(f"| {entry['model']} | {entry['batch']} | {t['backend']} | "
                             f"{t['compile_s']:.1f} | {cosine} | {diff} | "
                             f"{t.get('error', 'timed')} |")
    if report["ablation"]:
        lines += ["", "### Each optimisation switched back to its old form (RectGrad q=98)", "",
                  "| model | batch | graph | ms | x inference | x all optimisations | nodes | "
                  "file MB | same map |", "|---|---|---|---|---|---|---|---|---|"]
        for r in report["ablation"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['ms']:.1f} | "
                         f"{r['x_inference']:.2f} | {r['vs_all']:.2f} | {r.get('nodes', '')} | "
                         f"{r['file_mb']:.1f} | {r.get('same_attribution', '')} |"
                         if "file_mb" in r else
                         f"| {r['model']} | {r['batch']} | {r['variant']} | {r['ms']:.1f} | "
                         f"{r['x_inference']:.2f} | {r['vs_all']:.2f} | | | |")
    if report["memory"]:
        lines += ["", "### Peak memory of one attribution run (fresh process each)", "",
                  "| model | batch | contender | peak RSS MB | peak before the run MB | "
                  "RSS before the run MB | growth in the run MB |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["memory"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['batch']} | {r['contender']} | error: "
                             f"{r['error']} | | | |")
                continue
            chunk = f" (chunks of {r['chunk']})" if r.get("chunk") and r["chunk"] < r["batch"] \
                else ""
            lines.append(f"| {r['model']} | {r['batch']} | {r['contender']}{chunk} | "
                         f"{r['peak_mb']:.0f} | {r['setup_peak_mb']:.0f} | "
                         f"{r['before_run_mb']:.0f} | {r['run_growth_mb']:.0f} |")
    if report["onnxruntime"]:
        lines += ["", "### onnxruntime graph optimisations on the RectGrad graph", "",
                  "| model | nodes | after onnxruntime | convs with fused activation | "
                  "NCHWc nodes | standard ONNX only | file MB (source) |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["onnxruntime"]:
            lines.append(f"| {r['model']} | {r['nodes']} | {r['optimized_nodes']} | "
                         f"{r['convs_with_fused_activation']} | {r['nchwc_nodes']} | "
                         f"{r['standard_onnx_only']} | {r['file_mb']:.1f} "
                         f"({r['source_file_mb']:.1f}) |")
    if report.get("micro"):
        from micro import markdown as micro_markdown
        lines += ["", "### Micro-benchmarks (benchmarks/micro.py, best of interleaved runs)", "",
                  micro_markdown(report["micro"])]
    return "\n".join(lines)


RECTGRADS = (("exact", "rectonnx rectgrad"), ("approx", "rectonnx rectgrad (approx)"))
RIVALS = ("torch RectGrad (eager)", "Captum GuidedBackprop")
SPEEDUP_GOAL = 1.5


def inference_limit(model: str) -> float:
    """The issue's RectGrad / inference goal: 3x, 4x for EfficientNet-Lite0 (depthwise convs,
    cheap to run forward, a gate per ReLU6)."""
    return 4.0 if "efficientnet" in model else 3.0


def _compile_note(report: dict, model: str, batch: int) -> str | None:
    """Why the torch.compile column is empty for (model, batch), or None."""
    if not report.get("compile_backends"):
        return "not run" + (" (--quick)" if report.get("quick") else " (--compile none)")
    for entry in report.get("compile", []):
        if entry["model"] == model and entry["batch"] == batch and not entry["compiled"]:
            return "did not compile: " + "; ".join(f"{t['backend']}: {t.get('error', '?')}"
                                                   for t in entry["tries"])
    return None


def summary(report: dict) -> list[str]:
    """The issue's table: per (model, batch) inference, saliency, exact and approximate
    RectGrad (ms and x inference), the PyTorch contenders and the approximation's agreement."""
    by_key: dict = {}
    for r in report["speed"]:
        by_key.setdefault((r["model"], r["batch"]), {})[r["contender"]] = r
    agreement = {a["model"]: a for a in report.get("agreement", [])}
    compiled = {(c["model"], c["batch"]): c for c in report.get("compile", [])}
    lines = ["### Summary (median wall ms per batch; x inf = / the faster onnxruntime inference)",
             "", f"RectGrad q = {Q:g} without the padding trick; approx: `threshold=\"approx\"` "
             "with the default recall. Agreement of approx with exact RectGrad (benchmarks/"
             f"approx.py's measures, q = {Q:g}, on "
             f"{max((a['samples'] for a in agreement.values()), default=0)} images a model: "
             "random normal ones, EfficientNet-Lite0's shipped photos): map cosine median (min), "
             "top-5 % "
             "overlap median (min), and per (layer, sample) the share of the exact gate's units "
             "the approximate gate keeps, median / worst. torch.compile: compile time in "
             "brackets, not in the timing.", "",
             "| model | batch | ORT inference ms (spinning off / default) | saliency ms | "
             "RectGrad exact ms | RectGrad approx ms | saliency x inf | exact x inf | "
             "approx x inf | eager torch RectGrad ms | torch.compile RectGrad ms | "
             "Captum GuidedBackprop ms | Captum Saliency ms | approx agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(row):
        return f"{row['ms']:.1f}" if row else ""

    def ratio(row):
        return f"{row['x_inference']:.2f}" if row else ""

    for (model, batch), rows in by_key.items():
        if "rectonnx rectgrad" not in rows:
            continue
        get = rows.get
        inference = "/".join(ms(get(name)) or "-" for name in INFERENCE)
        if COMPILED in rows:
            tries = compiled.get((model, batch), {}).get("tries", [])
            done = next((t for t in tries if "error" not in t), None)
            compile_cell = ms(rows[COMPILED]) + (
                f" ({done['backend']}, {done['compile_s']:.0f} s)" if done else "")
        else:
            compile_cell = "" if "torch RectGrad (eager)" not in rows else \
                (_compile_note(report, model, batch) or "")
        a = agreement.get(model.removesuffix(" (shipped)"))
        agree = (f"cos {a['cosine_median']:.3f} ({a['cosine_min']:.3f}); top-5 % "
                 f"{a['top5_overlap_median']:.2f} ({a['top5_overlap_min']:.2f}); recall "
                 f"{a['recovered_median']:.2f} / {a['recovered_worst']:.2f}") if a else ""
        lines.append(
            f"| {MODEL_NAMES.get(model, model)} | {batch} | {inference} | "
            f"{ms(get('rectonnx saliency'))} | {ms(get('rectonnx rectgrad'))} | "
            f"{ms(get('rectonnx rectgrad (approx)'))} | {ratio(get('rectonnx saliency'))} | "
            f"{ratio(get('rectonnx rectgrad'))} | {ratio(get('rectonnx rectgrad (approx)'))} | "
            f"{ms(get('torch RectGrad (eager)'))} | {compile_cell} | "
            f"{ms(get('Captum GuidedBackprop'))} | {ms(get('Captum Saliency'))} | {agree} |")
    lines += [""]
    if report.get("goals_text"):
        lines += [report["goals_text"], ""]
    return lines


def goals(speed: list[dict]) -> list[dict]:
    """The issue's goals, from the speed rows: ratios measured in the same rounds."""
    found = []
    by_key: dict = {}
    for r in speed:
        by_key.setdefault((r["model"], r["batch"]), {})[r["contender"]] = (r["ms"], r["cpu_ms"])
    for (model, batch), ms in by_key.items():
        limit = inference_limit(model)
        for variant, contender in RECTGRADS:
            if contender not in ms:
                continue
            for unit, i in (("wall", 0), ("CPU", 1)):
                rect = ms[contender][i]
                ratio = rect / inference_reference({k: v[i] for k, v in ms.items()})
                found.append(dict(model=model, batch=batch, unit=unit, value=ratio,
                                  variant=variant, kind="inference", limit=limit,
                                  goal=f"RectGrad {variant} / inference <= {limit:g}",
                                  holds=ratio <= limit))
                for other in RIVALS:
                    if other in ms:
                        speedup = ms[other][i] / rect
                        found.append(dict(model=model, batch=batch, unit=unit, value=speedup,
                                          variant=variant, kind=other, limit=SPEEDUP_GOAL,
                                          goal=f"{other} / rectonnx RectGrad {variant} >= "
                                               f"{SPEEDUP_GOAL:g}",
                                          holds=speedup >= SPEEDUP_GOAL))
    return found


MODEL_NAMES = {"paper_cnn": "paper CNN 32 px", "resnet50": "ResNet-50 224 px",
               "efficientnet_lite0": "EfficientNet-Lite0 (shipped) 224 px",
               "paper_cnn_digits (shipped)": "paper CNN digits (shipped; onnxruntime only)"}


def goals_paragraph(found: list[dict], date: str) -> str:
    """Which goals hold and by how much (wall-time medians of this run), as README prose; the
    benchmark models only (not the onnxruntime-only shipped paper CNN)."""
    wall = [g for g in found if g["unit"] == "wall" and not g["model"].endswith("(shipped)")]
    if not wall:
        return ""

    def cases(rows):
        return ", ".join(f"{MODEL_NAMES.get(g['model'], g['model'])} b{g['batch']} "
                         f"{g['value']:.2f}x" for g in rows)

    parts = [f"Goals, from this run ({date}; wall-clock medians, every ratio from the same "
             "interleaved rounds):"]
    def sentence(variant: str, kind: str, goal: str, misses: str) -> None:
        rows = [g for g in wall if g["variant"] == variant and g["kind"] == kind]
        if not rows:
            return
        held = [g for g in rows if g["holds"]]
        missed = [g for g in rows if not g["holds"]]
        text = f"RectGrad {variant} {goal} holds in {len(held)} of {len(rows)} cases"
        text += f" ({cases(held)})" if held else ""
        text += f"; {misses} {cases(missed)}" if missed else ""
        parts.append(text + ".")

    for variant, _ in RECTGRADS:
        sentence(variant, "inference", "<= 3x inference (<= 4x for EfficientNet-Lite0)",
                 "it misses in")
        for other in RIVALS:
            sentence(variant, other, f">= {SPEEDUP_GOAL:g}x ahead of {other}", "not in")
    return " ".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI: few rounds, small batches")
    parser.add_argument("--out", default="benchmarks/results", help="directory for bench.md/json")
    parser.add_argument("--models", default="paper_cnn,resnet50,efficientnet_lite0")
    parser.add_argument("--micro", action="store_true", help="also run benchmarks/micro.py")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch contenders")
    parser.add_argument("--compile", default=None,
                        help="torch.compile backends to try in turn for eager RectGrad, comma-"
                             "separated, or 'none' (default: inductor,aot_eager; none with "
                             "--quick)")
    parser.add_argument("--extra", action="store_true",
                        help="also guided backprop and RectGrad threshold='bisect'")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--probe", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        kind, model_dir, name, batch = args.probe
        return probe(kind, model_dir, name, int(batch))
    import nets

    started = time.perf_counter()
    if not args.quick:
        print("[bench] full run: about 10-13 min on a quiet 2-core machine (4-5 min of it "
              "torch.compile with an empty cache); each part prints its time", file=sys.stderr,
              flush=True)
    names = [n for n in args.models.split(",") if n]
    plan = {"paper_cnn": [1, 16] if args.quick else [1, 64],
            "resnet50": [1] if args.quick else [1, 8],
            "efficientnet_lite0": [1] if args.quick else [1, 8]}
    rounds, warmup = (args.rounds or 3, 1) if args.quick else (args.rounds or 10, 2)
    memory_plan = {"paper_cnn": (64, 8.0), "resnet50": (16, 600.0)}
    compile_option = args.compile or ("none" if args.quick else "inductor,aot_eager")
    backends = tuple(b for b in compile_option.split(",") if b and b != "none")
    explainers = EXPLAINERS + (EXTRA_EXPLAINERS if args.extra else [])
    report = dict(machine=machine(), load_before=load_average(), quick=args.quick, speed=[],
                  goals=[], ablation=[], memory=[], onnxruntime=[], micro=None, agreement=[],
                  compile=[], compile_backends=list(backends), seconds_by_part={})
    seconds = report["seconds_by_part"]

    def part(label: str, since: float) -> float:
        now = time.perf_counter()
        seconds[label] = seconds.get(label, 0.0) + now - since
        print(f"[bench] {label}: {now - since:.0f} s (total {now - started:.0f} s)",
              file=sys.stderr, flush=True)
        return now

    for name in names:
        mark = time.perf_counter()
        net, model, shape = nets.build(name)
        print(f"[bench] {name}: speed", file=sys.stderr, flush=True)
        graphs: dict = {}
        real = None
        if name in nets.SHIPPED:  # the shipped model's own images, as approx.py
            import approx
            real = lambda batch, name=name: approx.load(name, batch)[1]  # noqa: E731
        report["speed"] += bench_speed(name, net, model, shape, plan[name], rounds, warmup,
                                       with_torch=not args.no_torch, graphs=graphs,
                                       explainers=explainers, compile_backends=backends,
                                       compile_log=report["compile"], inputs=real)
        mark = part(f"{name} speed", mark)
        print(f"[bench] {name}: approx agreement", file=sys.stderr, flush=True)
        report["agreement"].append(bench_agreement(
            name, model, agreement_inputs(name, shape, 2 if args.quick else 4)))
        mark = part(f"{name} agreement", mark)
        if not args.quick and not args.no_ablation and name in ("paper_cnn", "resnet50"):
            print(f"[bench] {name}: ablation", file=sys.stderr, flush=True)
            for batch in plan[name]:
                report["ablation"] += bench_ablation(name, model, shape, batch, rounds, warmup)
            mark = part(f"{name} ablation", mark)
        report["onnxruntime"].append(ort_optimisations(name, model, graphs["rectgrad"]))
        if not args.no_memory and not args.no_torch and name in memory_plan and (
                name == "paper_cnn" or not args.quick):
            print(f"[bench] {name}: memory", file=sys.stderr, flush=True)
            batch, budget = memory_plan[name]
            report["memory"] += bench_memory(
                name, net, graphs["rectgrad"], batch, None if args.quick else budget,
                kinds=("rectonnx", "torch") if args.quick else ("rectonnx", "torch", "captum"))
            mark = part(f"{name} memory", mark)
    if args.micro:
        import micro
        print("[bench] micro", file=sys.stderr, flush=True)
        mark = time.perf_counter()
        report["micro"] = micro.run(args.quick)
        part("micro", mark)
    if not args.quick:
        mark = time.perf_counter()
        report["speed"] += bench_shipped(rounds, warmup, skip=names)
        part("shipped models", mark)
    report["goals"] = goals(report["speed"])
    report["goals_text"] = goals_paragraph(report["goals"], report["machine"]["date"])
    report["load_after"] = load_average()
    report["seconds"] = time.perf_counter() - started
    print(f"[bench] done in {report['seconds'] / 60:.1f} min", file=sys.stderr, flush=True)
    table = markdown(report)
    print(table)
    save(Path(args.out), "bench", table, report)


def save(out: Path, stem: str, table: str, report: dict) -> None:
    """``stem.md`` (the tables) and ``stem.json`` (every number) in the folder ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(table + "\n")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
