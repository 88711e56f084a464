"""Micro-benchmarks behind rectonnx's graph choices, one onnxruntime session per variant.

    python benchmarks/micro.py [--quick] [--out DIR]

* the per-layer threshold: one TopK over all M scores vs rectonnx's two-stage block selection
  vs the TopK-free bisection (threshold.py), in ns per score, at ResNet-50 and paper-CNN sizes;
* a convolution's input gradient: ConvTranspose vs a Conv with the flipped kernel (stride 1,
  what rectonnx emits unless X has fewer than 8 channels, as an RGB first layer) vs the
  polyphase Conv + DepthToSpace (stride 2, not emitted: slower);
* the RectGrad gate ``Where(s > tau, R, 0)`` vs ``R * Cast(s > tau)``;
* MaxPool with and without its Indices output (the exact max-pool backward needs them);
* EfficientNet-Lite0's depthwise stride-2 input gradients: ConvTranspose vs zero insertion +
  stride-1 depthwise Conv vs polyphase depthwise Convs + DepthToSpace;
* the padding-trick mask as a Mul after the gate vs folded into the gate's boolean (And).

Variants of one case run interleaved, best of ``repeats`` (the least disturbed run) is
reported: on a shared machine that is the most stable estimate of what each kernel costs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from rectonnx.builder import GraphBuilder
from rectonnx.geometry import conv_transpose_geometry, flipped_kernel, flipped_kernel_pads
from rectonnx.rules.linear import FEW_CHANNELS, flipped_kernel_plan
from rectonnx.threshold import percentile_rank, percentile_threshold
import rectonnx.threshold as threshold_module


def session(nodes, inputs, outputs, initializers=()) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "micro", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def builder_session(build, inputs: dict[str, tuple], output_shape) -> ort.InferenceSession:
    """A session of the nodes ``build(g)`` emits; ``build`` returns the output's name."""
    g = GraphBuilder(set(inputs) | {"out"})
    g.Identity(build(g), outputs=["out"])
    infos = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
             for name, shape in inputs.items()]
    return session(g.nodes, infos, [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                                  output_shape)],
                   g.initializers)


def best_ms(runs: dict[str, callable], repeats: int) -> dict[str, float]:
    """Interleaved: each round runs every variant once; the best round per variant, in ms."""
    times = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - started) * 1000)
    return {name: min(values) for name, values in times.items()}


# -- thresholds ------------------------------------------------------------------------------
def threshold_session(size: int, q: float, algorithm: str, two_stage: bool = True):
    saved = threshold_module.BLOCK_SELECT_MIN
    threshold_module.BLOCK_SELECT_MIN = saved if two_stage else 2 ** 62
    try:
        return builder_session(lambda g: percentile_threshold(g, "s", ("N", size), q, algorithm),
                               {"s": ["N", size]}, ["N", 1])
    finally:
        threshold_module.BLOCK_SELECT_MIN = saved


def bench_thresholds(quick: bool, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    cases = [(1, 64 * 112 * 112), (1, 512 * 28 * 28), (1, 32 * 32 * 32), (16, 32 * 32 * 32)]
    if not quick:
        cases += [(8, 64 * 112 * 112), (8, 1024 * 14 * 14), (64, 32 * 32 * 32)]
    rows = []
    for batch, size in cases:
        y = np.maximum(rng.standard_normal((batch, size)), 0)
        scores = (y * rng.standard_normal((batch, size))).astype(np.float32)  # ReLU-like
        variants = {"plain TopK": threshold_session(size, 98.0, "topk", two_stage=False),
                    "two-stage TopK": threshold_session(size, 98.0, "topk"),
                    "bisect (no TopK)": threshold_session(size, 98.0, "bisect")}
        results = {name: s.run(None, {"s": scores})[0] for name, s in variants.items()}
        reference = -np.sort(-scores, axis=1)[:, percentile_rank(size, 98.0) - 1]
        exact = all(np.array_equal(r.reshape(-1), reference) for r in results.values())
        times = best_ms({name: (lambda s=s: s.run(None, {"s": scores}))
                         for name, s in variants.items()}, repeats)
        for name, ms in times.items():
            rows.append(dict(case="threshold q=98", shape=f"N={batch}, M={size}", variant=name,
                             ms=ms, ns_per_element=ms * 1e6 / (batch * size), exact=exact))
    return rows


# -- convolution input gradients ---------------------------------------------------------------
CONVS = [  # (c_in, c_out, kernel, stride, pad, n): the forward conv whose dX is computed
    (3, 64, 7, 2, 3, 224), (64, 64, 3, 1, 1, 56), (64, 256, 1, 1, 0, 56),
    (128, 128, 3, 2, 1, 56), (256, 512, 1, 2, 0, 56), (256, 256, 3, 1, 1, 14),
    (32, 32, 3, 1, 1, 32), (64, 64, 3, 1, 1, 16), (3, 32, 3, 1, 1, 32)]


def polyphase(weight: np.ndarray, n: int, m: int, s: int, b: int):
    """The polyphase ("sub-pixel") Conv weight and pads for a square stride-``s`` conv's dX
    (tried and measured slower than ConvTranspose, so rectonnx does not emit it).

    Input position ``i = t s + r`` receives tap ``j`` from output ``t + (r + b - j) / s`` when
    that is integral: each phase ``r`` is a correlation of dY with its own small kernel; the
    ``s^2`` phases are the output channels of one Conv and DepthToSpace (CRD) interleaves them.
    """
    c_out, c_in, k, _ = weight.shape
    offsets = {(r, j): (r + b - j) // s for r in range(s) for j in range(k)
               if (r + b - j) % s == 0}
    low, high = min(offsets.values()), max(offsets.values())
    taps = np.full((s, high - low + 1), k, dtype=np.int64)  # k: a zero tap
    for (r, j), delta in offsets.items():
        taps[r, delta - low] = j
    padded = np.pad(weight, [(0, 0), (0, 0), (0, 1), (0, 1)])
    length = taps.shape[1]
    picked = padded[:, :, taps.reshape(-1)[:, None], taps.reshape(-1)[None, :]]
    picked = picked.reshape(c_out, c_in, s, length, s, length).transpose(1, 2, 4, 0, 3, 5)
    phase_length = -(-n // s)
    begin = -low
    end = phase_length - m - begin + length - 1
    return np.ascontiguousarray(picked.reshape(c_in * s * s, c_out, length, length)), begin, end


def bench_convs(quick: bool, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for batch in ([1] if quick else [1, 8]):
        for c_in, c_out, k, s, p, n in CONVS:
            m = (n + 2 * p - k) // s + 1
            weight = (rng.standard_normal((c_out, c_in, k, k)) * 0.1).astype(np.float32)
            dy = rng.standard_normal((batch, c_out, m, m)).astype(np.float32)
            geometry = conv_transpose_geometry([n, n], [m, m], [k, k], [s, s], [1, 1], [p] * 4)
            dy_info = [helper.make_tensor_value_info("dy", TensorProto.FLOAT,
                                                     [batch, c_out, m, m])]
            out_info = [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                      [batch, c_in, n, n])]
            variants = {"ConvTranspose": session(
                [helper.make_node("ConvTranspose", ["dy", "w"], ["out"], strides=[s, s],
                                  pads=geometry.pads, output_padding=geometry.output_padding)],
                dy_info, out_info, [numpy_helper.from_array(weight, "w")])}
            plan = flipped_kernel_plan([n, n], [m, m], [k, k], [s, s], [1, 1], [p] * 4)
            if s == 1:
                pads = flipped_kernel_pads(n, m, k, 1, p)
                variants["Conv, flipped kernel"] = session(
                    [helper.make_node("Conv", ["dy", "w"], ["out"], pads=[pads[0]] * 2 +
                                      [pads[1]] * 2)], dy_info, out_info,
                    [numpy_helper.from_array(flipped_kernel(weight, 1), "w")])
            elif k >= s:
                w_poly, begin, end = polyphase(weight, n, m, s, p)
                cut = -(-n // s) * s != n
                nodes = [helper.make_node("Conv", ["dy", "w"], ["phases"], pads=[begin] * 2 +
                                          [end] * 2),
                         helper.make_node("DepthToSpace", ["phases"], ["full" if cut else "out"],
                                          blocksize=s, mode="CRD")]
                inits = [numpy_helper.from_array(w_poly, "w")]
                if cut:
                    nodes.append(helper.make_node("Slice", ["full", "zeros", "ends", "axes"],
                                                  ["out"]))
                    inits += [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in
                              (("zeros", [0, 0]), ("ends", [n, n]), ("axes", [2, 3]))]
                variants["Conv, polyphase + DepthToSpace"] = session(nodes, dy_info, out_info,
                                                                     inits)
            outputs = {name: v.run(None, {"dy": dy})[0] for name, v in variants.items()}
            base = outputs["ConvTranspose"]
            error = max(float(np.abs(o - base).max() / np.abs(base).max())
                        for o in outputs.values())
            times = best_ms({name: (lambda v=v: v.run(None, {"dy": dy}))
                             for name, v in variants.items()}, repeats)
            for name, ms in times.items():
                flipped = plan is not None and c_in >= FEW_CHANNELS
                emitted = "flipped" in name if flipped else name == "ConvTranspose"
                rows.append(dict(case="conv dX", shape=f"N={batch}, {c_in}<-{c_out}, k{k} s{s} "
                                 f"p{p}, {n}px", variant=name, ms=ms, chosen=emitted,
                                 max_rel_diff=error))
    return rows


# -- depthwise stride-2 input gradients (EfficientNet-Lite0) ---------------------------------
DEPTHWISE_STRIDE_2 = [  # (channels, kernel, input size, output size, pads): Lite0's four
    (96, 3, 112, 56, [0, 0, 1, 1]), (144, 5, 56, 28, [1, 1, 2, 2]),
    (240, 3, 28, 14, [0, 0, 1, 1]), (672, 5, 14, 7, [1, 1, 2, 2])]


def depthwise_phase_kernels(weight: np.ndarray, n: int, m: int, b: int):
    """Per output phase ``r`` of a stride-2 depthwise conv's dX (``dx[2u + r]``): the taps ``j``
    with ``r + b - j`` even, as a correlation over dY with offsets ``(r + b - j) / 2``;
    returns ``(taps (-1: zero), begin pad, end pad)`` per phase."""
    k = weight.shape[-1]
    phases = []
    for r in range(2):
        offsets = {j: (r + b - j) // 2 for j in range(k) if (r + b - j) % 2 == 0}
        low, high = min(offsets.values()), max(offsets.values())
        taps = np.full(high - low + 1, -1)
        for j, d in offsets.items():
            taps[d - low] = j
        length = (n - r + 1) // 2
        phases.append((taps, -low, (length - 1 + high) - (m - 1)))
    return phases


def bench_depthwise_stride2(quick: bool, repeats: int) -> list[dict]:
    """dX of Lite0's depthwise stride-2 convs: ConvTranspose (what rectonnx emits) vs zero
    insertion (Pad to 4C channels + DepthToSpace) + the flipped-kernel stride-1 depthwise Conv
    vs polyphase (four stride-1 depthwise Convs on dY + Concat + DepthToSpace)."""
    rng = np.random.default_rng(0)
    rows = []
    for batch in ([1] if quick else [1, 8]):
        for c, k, n, m, pads in DEPTHWISE_STRIDE_2:
            weight = rng.standard_normal((c, 1, k, k)).astype(np.float32)
            b = pads[0]
            geometry = conv_transpose_geometry([n, n], [m, m], [k, k], [2, 2], [1, 1], pads)

            def transpose(g):
                dx = g.ConvTranspose("dy", g.const(weight), strides=[2, 2], pads=geometry.pads,
                                     group=c, kernel_shape=[k, k],
                                     output_padding=geometry.output_padding)
                return g.Pad(dx, g.ints([0] * 6 + geometry.extra_end)) \
                    if geometry.needs_extra else dx

            def zero_insertion(g):
                spread = g.DepthToSpace(g.Pad("dy", g.ints([0] * 5 + [3 * c, 0, 0])),
                                        blocksize=2, mode="DCR")
                begin, end = k - 1 - b, n + b - 2 * m
                return g.Conv(spread, g.const(flipped_kernel(weight, c)), group=c,
                              pads=[begin, begin, end, end], kernel_shape=[k, k])

            def polyphase_depthwise(g):
                phases = depthwise_phase_kernels(weight, n, m, b)
                outs = []
                for taps_y, begin_y, end_y in phases:
                    for taps_x, begin_x, end_x in phases:
                        kernel = np.zeros((c, 1, len(taps_y), len(taps_x)), np.float32)
                        for i, jy in enumerate(taps_y):
                            for j, jx in enumerate(taps_x):
                                if jy >= 0 and jx >= 0:
                                    kernel[:, :, i, j] = weight[:, :, jy, jx]
                        outs.append(g.Conv("dy", g.const(kernel), group=c,
                                           pads=[begin_y, begin_x, end_y, end_x],
                                           kernel_shape=list(kernel.shape[2:])))
                return g.DepthToSpace(g.Concat(*outs, axis=1), blocksize=2, mode="DCR")

            dy = rng.standard_normal((batch, c, m, m)).astype(np.float32)
            variants = {name: builder_session(build, {"dy": [batch, c, m, m]},
                                              [batch, c, n, n])
                        for name, build in (("ConvTranspose", transpose),
                                            ("zero insertion + Conv", zero_insertion),
                                            ("polyphase Convs + DepthToSpace",
                                             polyphase_depthwise))}
            outputs = {name: v.run(None, {"dy": dy})[0] for name, v in variants.items()}
            base = outputs["ConvTranspose"]
            error = max(float(np.abs(o - base).max() / np.abs(base).max())
                        for o in outputs.values())
            times = best_ms({name: (lambda v=v: v.run(None, {"dy": dy}))
                             for name, v in variants.items()}, repeats)
            for name, ms in times.items():
                rows.append(dict(case="depthwise s2 dX", shape=f"N={batch}, C={c}, k{k}, "
                                 f"{n}<-{m}", variant=name, ms=ms, max_rel_diff=error,
                                 chosen=name == "ConvTranspose"))
    return rows


def bench_padding_fold(quick: bool, repeats: int) -> list[dict]:
    """The padding-trick mask after a gate: ``(R * Cast(b)) * m`` (a float Mul) vs
    ``R * Cast(b & m)`` (an And of booleans; rules/linear._fold_into_gate, bit-equal)."""
    rng = np.random.default_rng(0)
    shape = [1, 144, 56, 56] if quick else [8, 144, 56, 56]
    r = rng.standard_normal(shape).astype(np.float32)
    keep = rng.random(shape) < 0.1
    mask = np.ones([1, 1] + shape[2:], np.float32)
    mask[..., [0, -1], :] = 0
    mask[..., :, [0, -1]] = 0

    def separate(g):
        return g.Mul(g.Mul("r", g.CastLike("keep", "r")), g.const(mask))

    def folded(g):
        return g.Mul("r", g.CastLike(g.And("keep", g.const(mask.astype(bool))), "r"))

    variants = {}
    for name, build in (("gate, then Mul by the mask", separate),
                        ("mask folded into the gate (And)", folded)):
        g = GraphBuilder({"r", "keep", "out"})
        g.Identity(build(g), outputs=["out"])
        infos = [helper.make_tensor_value_info("r", TensorProto.FLOAT, shape),
                 helper.make_tensor_value_info("keep", TensorProto.BOOL, shape)]
        variants[name] = session(g.nodes, infos, [helper.make_tensor_value_info(
            "out", TensorProto.FLOAT, shape)], g.initializers)
    feeds = {"r": r, "keep": keep}
    assert np.array_equal(*[v.run(None, feeds)[0] for v in variants.values()])
    return [dict(case="padding mask after a gate", shape=str(shape), variant=name, ms=ms,
                 chosen="folded" in name)
            for name, ms in best_ms({n: (lambda v=v: v.run(None, feeds))
                                     for n, v in variants.items()}, repeats).items()]


# -- the gate and max-pool ---------------------------------------------------------------------
def bench_gate_and_pool(quick: bool, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    shape = [1, 256, 56, 56] if quick else [8, 256, 56, 56]
    r = rng.standard_normal(shape).astype(np.float32)
    s = rng.standard_normal(shape).astype(np.float32)
    tau = np.full([shape[0], 1, 1, 1], 0.5, np.float32)
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, sh)
            for n, sh in (("r", shape), ("s", shape), ("tau", [shape[0], 1, 1, 1]))]
    out = [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)]
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    variants = {
        "Where(s > tau, R, 0)": session([helper.make_node("Greater", ["s", "tau"], ["c"]),
                                         helper.make_node("Where", ["c", "r", "zero"], ["out"])],
                                        info, out, [zero]),
        "R * Cast(s > tau)": session([helper.make_node("Greater", ["s", "tau"], ["c"]),
                                      helper.make_node("Cast", ["c"], ["f"], to=1),
                                      helper.make_node("Mul", ["r", "f"], ["out"])], info, out)}
    feeds = {"r": r, "s": s, "tau": tau}
    assert np.array_equal(*[v.run(None, feeds)[0] for v in variants.values()])
    for name, ms in best_ms({n: (lambda v=v: v.run(None, feeds)) for n, v in variants.items()},
                            repeats).items():
        rows.append(dict(case="gate", shape=str(shape), variant=name, ms=ms))
    pool_shape = [shape[0], 64, 112, 112]
    x = rng.standard_normal(pool_shape).astype(np.float32)
    x_info = [helper.make_tensor_value_info("x", TensorProto.FLOAT, pool_shape)]
    y_info = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    attrs = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    pools = {"MaxPool": session([helper.make_node("MaxPool", ["x"], ["y"], **attrs)],
                                x_info, y_info),
             "MaxPool + Indices": session([helper.make_node("MaxPool", ["x"], ["y", "i"],
                                                            **attrs)], x_info,
                                          y_info + [helper.make_tensor_value_info(
                                              "i", TensorProto.INT64, None)])}
    for name, ms in best_ms({n: (lambda v=v: v.run(None, {"x": x})) for n, v in pools.items()},
                            repeats).items():
        rows.append(dict(case="max-pool 3x3 s2", shape=str(pool_shape), variant=name, ms=ms))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| case | shape | variant | best ms | note |", "|---|---|---|---|---|"]
    for r in rows:
        note = []
        if "ns_per_element" in r:
            note.append(f"{r['ns_per_element']:.2f} ns/score" + ("" if r["exact"] else
                                                                 " NOT EXACT"))
        if "max_rel_diff" in r:
            note.append(f"max rel. diff {r['max_rel_diff']:.1e}")
        if r.get("chosen"):
            note.append("rectonnx emits this")
        lines.append(f"| {r['case']} | {r['shape']} | {r['variant']} | {r['ms']:.3f} | "
                     f"{'; '.join(note)} |")
    return "\n".join(lines)


def run(quick: bool) -> list[dict]:
    repeats = 5 if quick else 15
    return (bench_thresholds(quick, repeats) + bench_convs(quick, repeats)
            + bench_depthwise_stride2(quick, repeats) + bench_padding_fold(quick, repeats)
            + bench_gate_and_pool(quick, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="directory for micro.md / micro.json")
    args = parser.parse_args()
    rows = run(args.quick)
    table = markdown(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "micro.md").write_text(table + "\n")
        (out / "micro.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
