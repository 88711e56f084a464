"""Hostile models and arguments (an adversarial run's findings): each ends in a result or in one
clear error (on the command line: one ``error: ...`` line, exit status 2), never a traceback, a
silent wrong answer, gigabytes of memory or a damaged file.

Covered: constant folding that would blow up (ConstantOfShape, sparse constants); onnxruntime's
own errors and models of 0 classes; batch sizes, memory budgets and targets that are not what
they seem; files replaced atomically (rewrite -o, Triton entries, external data); Triton
configs changed behind an existing model's back, and empty model names; control flow on the
path and ``rectonnx info`` on models that cannot be rewritten.
"""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper, parser
from PIL import Image

import rectonnx
from rectonnx import InputError, InvalidModelError, RectonnxError, UnsupportedModelError
from rectonnx import fileio
from helpers import cli, one_line_error
from rectonnx.cli import friendly_errors
from rectonnx.errors import ExecutionError
from rectonnx.normalize import MAX_FOLDED_ELEMENTS, MAX_FOLDED_ELEMENTS_VARIABLE, normalize


run = cli  # rectonnx ARGS through click's test runner (helpers.cli)


def model_from(text: str, **initializers) -> onnx.ModelProto:
    model = parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>\n' + text)
    for name, value in initializers.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return model


def dense(rows: int, columns: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, columns)).astype(np.float32)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 4 -> 3 classifier (Relu, MatMul) as a file, and its explainer graph."""
    model = model_from("g (float[N,4] x) => (float[N,3] y) { r = Relu(x)\n y = MatMul(r, w) }",
                       w=dense(4, 3))
    path = tmp_path_factory.mktemp("small") / "small.onnx"
    onnx.save(model, path)
    return path, rectonnx.rewrite(model, "saliency")


# -- 1. constant folding --------------------------------------------------------------------------
def bomb(shape, *, sparse: bool = False) -> onnx.ModelProto:
    """A tiny model whose scores add a slice of a constant of ``shape`` (ConstantOfShape, or a
    sparse Constant with one value) to a dense layer's."""
    big = "" if sparse else "big = ConstantOfShape <value = float[1] {0.5}> (shape)"
    model = model_from(f"""g (float[N,4] x) => (float[N,3] y) {{
        {big}
        b = Slice(big, starts, ends)
        r = Relu(x)
        h = MatMul(r, w)
        y = Add(h, b)
    }}""", shape=np.array(shape, np.int64), starts=np.array([0, 0], np.int64),
        ends=np.array([1, 3], np.int64), w=dense(4, 3))
    if sparse:
        values = numpy_helper.from_array(np.array([0.5], np.float32), "values")
        indices = numpy_helper.from_array(np.array([0], np.int64), "indices")
        node = helper.make_node("Constant", [], ["big"], name="sparse_big",
                                sparse_value=helper.make_sparse_tensor(values, indices, shape))
        model.graph.node.insert(0, node)
    return model


@pytest.mark.parametrize("sparse", [False, True], ids=["ConstantOfShape", "sparse Constant"])
def test_a_constant_over_the_fold_cap_is_left_to_the_runtime(sparse):
    """A model of a few hundred bytes asked rewrite for a 324 MB constant (7.8 GB with
    [45000, 45000]): the node stays in the graph instead, nothing large is allocated."""
    model = bomb([9000, 9000], sparse=sparse)  # 81 M elements > MAX_FOLDED_ELEMENTS
    assert 9000 * 9000 > MAX_FOLDED_ELEMENTS and len(model.SerializeToString()) < 1024
    tracemalloc.start()
    try:
        started = time.perf_counter()
        graph = rectonnx.rewrite(model, "saliency")
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2 ** 20, f"rewrite allocated {peak / 2 ** 20:.0f} MB"
    assert seconds < 20
    assert ("Constant" if sparse else "ConstantOfShape") in {n.op_type for n in graph.graph.node}
    assert max(int(np.prod(t.dims)) for t in graph.graph.initializer) < 1000


def test_the_fold_cap_is_a_setting_and_big_weights_still_fold(monkeypatch):
    """With a cap of 2 elements, the [1, 3] ConstantOfShape stays a node (by the keyword or the
    environment variable) and the explainer computes the same; the Transpose of a [3, 4]
    weight is folded anyway (no larger than its input)."""
    model = bomb([1, 3])
    model.graph.initializer.append(numpy_helper.from_array(dense(3, 4), "wt"))
    model.graph.node.insert(0, helper.make_node("Transpose", ["wt"], ["w"], perm=[1, 0]))
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "w"))

    def ops(norm):
        return {n.op_type for n in norm.graph.node}

    assert {"ConstantOfShape", "Transpose"}.isdisjoint(ops(normalize(model)))
    capped = ops(normalize(model, max_folded_elements=2))
    assert "ConstantOfShape" in capped and "Transpose" not in capped
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32) + 0.1
    folded = rectonnx.Explainer(model, "saliency", providers=["CPUExecutionProvider"]).explain(x)
    monkeypatch.setenv(MAX_FOLDED_ELEMENTS_VARIABLE, "2")
    graph = rectonnx.rewrite(model, "saliency")
    assert "ConstantOfShape" in {n.op_type for n in graph.graph.node}
    kept = rectonnx.Explainer(model, "saliency", providers=["CPUExecutionProvider"]).explain(x)
    np.testing.assert_allclose(kept.logits, folded.logits, rtol=1e-6)
    np.testing.assert_allclose(kept.attribution, folded.attribution, rtol=1e-6)
    monkeypatch.setenv(MAX_FOLDED_ELEMENTS_VARIABLE, "lots")
    with pytest.raises(ValueError, match=MAX_FOLDED_ELEMENTS_VARIABLE):
        rectonnx.rewrite(model, "saliency")
    monkeypatch.delenv(MAX_FOLDED_ELEMENTS_VARIABLE)
    for bad in (-1, 2.5, True, "10"):
        with pytest.raises(ValueError, match="max_folded_elements"):
            normalize(model, max_folded_elements=bad)


# -- 2. onnxruntime's errors, 0 classes, stray library errors -------------------------------------
@pytest.fixture(scope="module")
def fixed_reshape(tmp_path_factory):
    """A model with a symbolic batch whose Reshape to [1, 192] only takes one sample."""
    model = model_from("""g (float[N,3,8,8] x) => (float[N,5] y) {
        r = Relu(x)
        f = Reshape(r, shape)
        y = MatMul(f, w)
    }""", shape=np.array([1, 192], np.int64), w=dense(192, 5))
    root = tmp_path_factory.mktemp("reshape")
    onnx.save(model, root / "reshape.onnx")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_onnxruntime_errors_become_one_line_naming_the_model(fixed_reshape):
    root = fixed_reshape
    explainer = rectonnx.Explainer(root / "reshape.onnx", "saliency")
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with pytest.raises(ExecutionError, match="batch size of 1 is fixed inside"):
        explainer.explain(x)
    with pytest.raises(ExecutionError, match="batch size of 1 is fixed inside"):
        rectonnx.Explainer(root / "reshape.onnx", "saliency", batch_size=2,
                           io_binding=True).explain(np.concatenate([x, x]))  # chunked
    assert explainer.explain(x[:1]).attribution.shape == (1, 3, 8, 8)
    result = run("explain", root / "reshape.onnx", root / "0.png", root / "1.png", "--out",
                 root / "out", "--method", "saliency", "--no-progress")
    one_line_error(result, "reshape.onnx", "Reshape", "--batch-size 1")
    result = run("explain", root / "reshape.onnx", root / "0.png", root / "1.png", "--out",
                 root / "out1", "--method", "saliency", "--no-progress", "--batch-size", "1")
    assert result.exit_code == 0, result.output


def zero_class_model(dynamic: bool) -> onnx.ModelProto:
    if not dynamic:
        return model_from("g (float[N,4] x) => (float[N,0] y) { r = Relu(x)\n y = MatMul(r, w) }",
                          w=np.zeros((4, 0), np.float32))
    # the class count is N - N: shape inference cannot tell it is 0
    return model_from("""g (float[N,4] x) => (float[N,C] y) {
        r = Relu(x)
        h = MatMul(r, w)
        n = Shape <start = 0, end = 1> (x)
        e = Sub(n, n)
        y = Slice(h, starts, e, axes)
    }""", w=dense(4, 3), starts=np.array([0], np.int64), axes=np.array([1], np.int64))


def test_zero_class_models_are_refused(tmp_path):
    with pytest.raises(UnsupportedModelError, match="0 classes"):
        rectonnx.rewrite(zero_class_model(dynamic=False), "saliency")
    onnx.save(zero_class_model(dynamic=False), tmp_path / "none.onnx")
    one_line_error(run("rewrite", tmp_path / "none.onnx", "-o", tmp_path / "x.onnx"),
                   "0 classes")
    dynamic = zero_class_model(dynamic=True)
    explainer = rectonnx.Explainer(dynamic, "saliency")
    assert explainer.num_classes is None
    x = np.ones((2, 4), np.float32)
    with pytest.raises(InvalidModelError, match="0 classes"):
        explainer.explain(x)
    with pytest.raises(InvalidModelError, match="0 classes"):
        rectonnx.Explainer(dynamic, "saliency", batch_size=1).explain(np.ones((3, 4), np.float32))


@pytest.mark.parametrize("error", [
    json.JSONDecodeError("Expecting value", "{", 1),
    OSError("cannot identify image file 'x.png'"),  # what PIL.UnidentifiedImageError is
    MemoryError("Unable to allocate 7.54 GiB for an array with shape (45000, 45000)"),
    np.linalg.LinAlgError("Singular matrix"),
    "PIL.UnidentifiedImageError",
    "PIL.DecompressionBombError",
    "onnxruntime.Fail",
], ids=lambda e: e if isinstance(e, str) else type(e).__name__)
def test_stray_library_errors_reach_the_command_line_as_one_line(error, tmp_path):
    if error == "PIL.UnidentifiedImageError":
        from PIL import UnidentifiedImageError
        error = UnidentifiedImageError("cannot identify image file 'x.png'")
    elif error == "PIL.DecompressionBombError":
        error = Image.DecompressionBombError("Image size (400000000 pixels) exceeds limit")
    elif error == "onnxruntime.Fail":
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail
        error = Fail("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while "
                     "running Conv node. Name:'conv_1' Status Message: kernel too large")

    @click.command()
    @click.argument("model")
    @friendly_errors
    def command(model):
        raise error

    result = CliRunner().invoke(command, [str(tmp_path / "m.onnx")])
    line = one_line_error(result)
    if "ONNXRuntimeError" in str(error):
        assert "m.onnx" in line and "Conv node 'conv_1': kernel too large" in line
    if isinstance(error, MemoryError):
        assert "out of memory" in line and "--batch-size" in line


def test_bugs_still_show_a_traceback():
    @click.command()
    @friendly_errors
    def command():
        raise KeyError("a bug")

    result = CliRunner().invoke(command, [])
    assert isinstance(result.exception, KeyError)


# -- 3. batch size, memory budget, targets ---------------------------------------------------------
@pytest.mark.parametrize("setting, value", [
    ("batch_size", 2.5), ("batch_size", True), ("batch_size", 0), ("batch_size", "8"),
    ("batch_size", None), ("memory_budget_mb", float("nan")), ("memory_budget_mb", float("inf")),
    ("memory_budget_mb", 0), ("memory_budget_mb", -5), ("memory_budget_mb", "2GB"),
    ("memory_budget_mb", True),
])
def test_batch_size_and_memory_budget_are_validated(small, setting, value):
    path, graph = small
    with pytest.raises(ValueError, match=setting):
        rectonnx.Explainer.from_graph(graph, **{setting: value})
    if (setting, value) == ("batch_size", 2.5):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 2.5"):
            rectonnx.Explainer(path, "saliency", batch_size=2.5)


def test_good_batch_sizes_and_budgets_are_taken(small):
    _, graph = small
    explainer = rectonnx.Explainer.from_graph(graph, batch_size=np.int64(3),
                                              memory_budget_mb=np.float32(1.5))
    assert explainer.batch_size <= 3
    assert explainer.explain(np.ones((7, 4), np.float32)).attribution.shape == (7, 4)


@pytest.mark.parametrize("target, words", [
    (float("inf"), "NaN or infinite"), (float("-inf"), "NaN or infinite"),
    (float("nan"), "NaN or infinite"), (1e30, "int64"), (9.3e18, "int64"), (-9.3e18, "int64"),
    (2.5, "non-integral"), ([0, 1.5], "non-integral"), (np.uint64(2 ** 64 - 1), "int64"),
    (2 ** 70, "integer class indices"), (3, "out of range"), (3.0, "out of range"),
    ([0, 7], "out of range"), ("1", "integer class indices"), (True, "integer class"),
])
def test_targets_that_would_overflow_or_do_not_exist_are_refused(small, target, words):
    """inf, 1e30 and 9.3e18 used to overflow the int64 cast to a negative number, that is
    'explain the predicted class', silently."""
    explainer = rectonnx.Explainer.from_graph(small[1])
    with pytest.raises(InputError, match=words):
        explainer.explain(np.ones((2, 4), np.float32), target)


def test_targets_are_checked_against_a_class_count_known_only_when_run():
    """Classes [0, k) with k from the batch: a target >= k gave an all-zero map."""
    model = model_from("""g (float[N,4] x) => (float[N,C] y) {
        r = Relu(x)
        h = MatMul(r, w)
        n = Shape <start = 0, end = 1> (x)
        e = Sub(n, n)
        k = Add(e, three)
        y = Slice(h, starts, k, axes)
    }""", w=dense(4, 3), starts=np.array([0], np.int64), axes=np.array([1], np.int64),
        three=np.array([3], np.int64))
    explainer = rectonnx.Explainer(model, "saliency")
    assert explainer.num_classes is None
    x = np.ones((2, 4), np.float32)
    assert explainer.explain(x, [2, 0]).target.tolist() == [2, 0]
    with pytest.raises(InputError, match=r"target \[3\] out of range: the model has 3 classes"):
        explainer.explain(x, [0, 3])
    with pytest.raises(InputError, match="out of range"):
        rectonnx.Explainer(model, "saliency", batch_size=1).explain(x, 5)


# -- 4. files replaced atomically ------------------------------------------------------------------
def failing_write(after_bytes: int):
    """A ``fileio._write`` that writes ``after_bytes`` then fails as a full disk does."""
    original = fileio._write

    def write(fd, data):
        original(fd, memoryview(data).cast("B")[:after_bytes])
        raise OSError(28, "No space left on device")
    return write


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".rectonnx-"))


def test_atomic_write_keeps_the_old_file_and_its_mode_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "config.pbtxt"
    path.write_bytes(b"old content")
    path.chmod(0o640)
    fileio.atomic_write_bytes(path, "new content")
    assert path.read_text() == "new content" and (path.stat().st_mode & 0o777) == 0o640
    monkeypatch.setattr(fileio, "_write", failing_write(3))
    with pytest.raises(OSError, match="No space left"):
        fileio.atomic_write_bytes(path, b"x" * 1000)
    assert path.read_text() == "new content" and leftovers(tmp_path) == []


def test_atomic_write_takes_names_of_255_bytes(tmp_path):
    path = tmp_path / ("n" * 250 + ".onnx")  # ".{name}.tmp-PID" would be too long
    fileio.atomic_write_bytes(path, b"abc")
    fileio.atomic_write_bytes(path, b"abcd")
    assert path.read_bytes() == b"abcd" and leftovers(tmp_path) == []


def test_a_writer_killed_mid_save_leaves_the_old_file(tmp_path):
    path = tmp_path / "explainer.onnx"
    path.write_bytes(b"complete old graph")
    script = textwrap.dedent(f"""
        import os, signal
        from rectonnx import fileio
        original = fileio._write
        def write(fd, data):
            original(fd, memoryview(data).cast("B")[:10])
            os.kill(os.getpid(), signal.SIGKILL)
        fileio._write = write
        fileio.atomic_write_bytes({str(path)!r}, b"new" * 100000)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    assert path.read_bytes() == b"complete old graph"


def big_weights_model() -> onnx.ModelProto:
    return model_from("g (float[N,64] x) => (float[N,3] y) { h = MatMul(x, w)\n y = MatMul(h, v) }",
                      w=dense(64, 64), v=dense(64, 3, seed=1))


def test_external_data_is_replaced_not_appended(tmp_path):
    model = big_weights_model()
    before = model.SerializeToString()
    path = tmp_path / "m.onnx"
    for _ in range(3):
        written = fileio.save_model_atomic(model, path, external_data=True)
    assert written == [path, tmp_path / "m.onnx.data"]
    assert model.SerializeToString() == before  # the caller's model is left as it was
    assert (tmp_path / "m.onnx.data").stat().st_size == 64 * 64 * 4  # v: under 1 KB, inline
    loaded = onnx.load(str(path))
    for a, b in zip(loaded.graph.initializer, model.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    assert leftovers(tmp_path) == []


def test_save_model_atomic_keeps_the_old_model_and_data_on_failure(tmp_path, monkeypatch):
    model = big_weights_model()
    path = tmp_path / "m.onnx"
    fileio.save_model_atomic(model, path, external_data=True)
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(fileio, "_write", failing_write(100))
    with pytest.raises(OSError):
        fileio.save_model_atomic(big_weights_model(), path, external_data=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old


def test_rewrite_output_is_replaced_atomically(small, tmp_path, monkeypatch):
    """``rectonnx rewrite -o existing.onnx`` interrupted mid-save (a full disk here) keeps the
    complete graph that was there (it used to leave a 0-byte file when killed)."""
    path, _ = small
    out = tmp_path / "existing.onnx"
    assert run("rewrite", path, "-o", out, "--method", "saliency").exit_code == 0
    old = out.read_bytes()
    monkeypatch.setattr(fileio, "_write", failing_write(5))
    result = run("rewrite", path, "-o", out, "--method", "grad_input")
    one_line_error(result, "No space left")
    assert out.read_bytes() == old and leftovers(tmp_path) == []


# -- 5. Triton entries -----------------------------------------------------------------------------
def test_a_new_version_may_not_change_the_shared_config(small, tmp_path):
    from rectonnx.serve import ExportError, export_triton

    path, graph = small
    repo = tmp_path / "repo"
    export_triton(path, repo, graph=graph, name="m", max_batch_size=32)
    config = (repo / "m" / "config.pbtxt").read_text()
    with pytest.raises(ExportError, match=r"max_batch_size: 32 -> max_batch_size: 0.*--force"):
        export_triton(path, repo, graph=graph, name="m", version=2, max_batch_size=0)
    assert (repo / "m" / "config.pbtxt").read_text() == config
    assert not (repo / "m" / "2" / "model.onnx").exists()
    export_triton(path, repo, graph=graph, name="m", version=2, max_batch_size=32)  # same config
    assert (repo / "m" / "2" / "model.onnx").is_file()
    export_triton(path, repo, graph=graph, name="m", version=3, max_batch_size=0, overwrite=True)
    assert "max_batch_size: 0" in (repo / "m" / "config.pbtxt").read_text()
    result = run("export-triton", path, "--repo", repo, "--name", "m", "--version", "4",
                 "--method", "saliency", "--max-batch-size", "8")
    one_line_error(result, "config.pbtxt", "max_batch_size: 0 -> max_batch_size: 8", "--force")


@pytest.mark.parametrize("name, words", [
    ("", "empty"), ("   ", "empty"), ("a/b", "no '/'"), ("..", "'..'"), ("a b", "spaces"),
    ("../up", "no '/'"),
])
def test_bad_model_names_are_refused_not_replaced(small, tmp_path, name, words):
    from rectonnx.serve import export_triton

    path, graph = small
    with pytest.raises(ValueError, match=words):
        export_triton(path, tmp_path / "repo", graph=graph, name=name)
    one_line_error(run("export-triton", path, "--repo", tmp_path / "repo", "--name", name,
                       "--method", "saliency"), "model name", words)
    assert not (tmp_path / "repo").exists()


def test_external_data_of_a_triton_entry_is_replaced(small, tmp_path, monkeypatch):
    import onnxruntime as ort

    from rectonnx import serve

    monkeypatch.setattr(serve, "EXTERNAL_DATA_LIMIT", 0)  # every graph counts as large
    graph = rectonnx.rewrite(big_weights_model(), "saliency")
    before = graph.SerializeToString()
    repo = tmp_path / "repo"
    sizes = []
    for overwrite in (False, True, True):
        written = serve.export_triton("big.onnx", repo, graph=copy.deepcopy(graph), name="big",
                                      overwrite=overwrite)
        sizes.append((written.model_file.parent / "model.onnx.data").stat().st_size)
    assert sizes[0] == sizes[1] == sizes[2] >= 64 * 64 * 4  # not 2x, 3x
    serve.export_triton("big.onnx", repo, graph=graph, name="big", overwrite=True)
    assert graph.SerializeToString() == before  # the weights stay in the caller's graph
    session = ort.InferenceSession(str(written.model_file), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    logits, _ = session.run(None, {"x": x, "target": np.array([-1, 1], np.int64)})
    np.testing.assert_allclose(logits, x @ dense(64, 64) @ dense(64, 3, seed=1), rtol=1e-4)
    assert leftovers(written.model_file.parent) == []


# -- 6. diagnoses ---------------------------------------------------------------------------------
def if_model() -> onnx.ModelProto:
    """Scores from an If whose branches read the input from the outer scope."""
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["a"])], "then", [],
                             [helper.make_tensor_value_info("a", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["b"])], "else", [],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["h"], name="branch", then_branch=then,
                              else_branch=other),
             helper.make_node("MatMul", ["h", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.float32(0), "zero"), numpy_helper.from_array(dense(4, 3), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_control_flow_on_the_path_is_named_as_such():
    with pytest.raises(UnsupportedModelError, match=r"control-flow.*If \(node 'branch'\)") as info:
        rectonnx.rewrite(if_model(), "saliency")
    assert "do not depend" not in str(info.value)
    assert info.value.unsupported == [("If", "branch")]


def cycle_model() -> onnx.ModelProto:
    model = model_from("g (float[N,4] x) => (float[N,3] y) { a = Relu(x)\n y = MatMul(a, w) }",
                       w=dense(4, 3))
    model.graph.node[0].input[0] = "y2"  # Relu(y2), y2 = Relu(y): a cycle
    model.graph.node.append(helper.make_node("Relu", ["y"], ["y2"]))
    return model


def opset_30_model() -> onnx.ModelProto:
    model = model_from("g (float[N,4] x) => (float[N,3] y) { a = Relu(x)\n y = MatMul(a, w) }",
                       w=dense(4, 3))
    model.opset_import[0].version = 30
    return model


@pytest.mark.parametrize("make, words", [
    (cycle_model, "cannot be rewritten"), (opset_30_model, "cannot be rewritten"),
    (if_model, "control-flow"),
], ids=["cycle", "opset 30", "If"])
def test_info_says_why_a_model_cannot_be_rewritten(make, words, tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(make(), path)
    with pytest.raises(RectonnxError):
        rectonnx.rewrite(path, "saliency")
    result = run("info", path)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("model: ") and any(line == "inputs:" for line in lines)
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [lines[-1]] and words in lines[-1] and str(path) in lines[-1]


def test_info_of_a_good_model_and_of_an_explainer_graph_exits_0(small, tmp_path):
    path, graph = small
    assert run("info", path).exit_code == 0
    onnx.save(graph, tmp_path / "explainer.onnx")
    result = run("info", tmp_path / "explainer.onnx")
    assert result.exit_code == 0, result.output
