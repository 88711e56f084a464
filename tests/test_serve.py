"""Triton export: the repository layout, the config against Triton's own schema (the protobuf
``model_config_pb2`` that ``tritonclient`` ships), and Triton's batching rules replayed on the
exported file with onnxruntime: requests of several sizes, each input given the shape the config
promises, reshaped and concatenated as the dynamic batcher does, must give every request the
maps it gets alone (the RectGrad percentile is per sample, so batching cannot change a map).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import rectonnx
from rectonnx.cli import main
from rectonnx.serve import ExportError, export_triton, parse_config, triton_config

from helpers import export

pytest.importorskip("tritonclient", reason="the Triton schema needs pip install -e '.[serve]'")

NUMPY = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64, "TYPE_FP64": np.float64}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.MaxPool2d(2), torch.nn.Conv2d(4, 4, 3, padding=1),
                               torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 4 * 4, 5), torch.nn.Softmax(dim=1)).eval()


@pytest.fixture(scope="module")
def model_file(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "net.onnx"
    onnx.save(export(net, torch.randn(1, 3, 8, 8), input_name="image"), path)
    return path


def read_config(path):
    config = parse_config(path.read_text())
    assert config.platform == "onnxruntime_onnx"
    return config


def test_repository_layout_and_config_match_triton_schema(model_file, tmp_path):
    written = export_triton(model_file, tmp_path / "repo", method="rectgrad", q=95,
                            max_batch_size=16, max_queue_delay_us=500,
                            preferred_batch_sizes=[4, 8, 64], instance_kind="cpu",
                            instance_count=2)
    assert written.model_file == tmp_path / "repo" / "net_rectgrad" / "1" / "model.onnx"
    assert written.config_file == tmp_path / "repo" / "net_rectgrad" / "config.pbtxt"
    onnx.checker.check_model(onnx.load(written.model_file), full_check=True)
    config = read_config(written.config_file)
    assert config.name == "net_rectgrad" and config.max_batch_size == 16
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]  # 64 > 16 dropped
    assert [(g.kind, g.count) for g in config.instance_group] == [(2, 2)]  # KIND_CPU
    schema = {t.name: t for t in list(config.input) + list(config.output)}
    types = type(config).DESCRIPTOR.fields_by_name["input"].message_type \
        .fields_by_name["data_type"].enum_type.values_by_number
    described = {name: (types[t.data_type].name, list(t.dims), t.HasField("reshape"))
                 for name, t in schema.items()}
    assert described == {
        "image": ("TYPE_FP32", [3, 8, 8], False),
        "target": ("TYPE_INT64", [1], True),  # [N] in the graph: dims [1], reshape []
        "logits": ("TYPE_FP32", [5], False),
        "attribution": ("TYPE_FP32", [3, 8, 8], False),
    }
    assert list(schema["target"].reshape.shape) == []
    assert not any(t.optional for t in config.input)


def triton_batch(config, requests: list[dict]) -> dict:
    """What Triton's dynamic batcher hands the backend: per input, the requests' tensors
    (shape [b] + dims, as clients send them) reshaped per item and concatenated."""
    batched = {}
    for spec in config.input:
        parts = []
        for request in requests:
            value = request[spec.name]
            assert value.shape[1:] == tuple(spec.dims)  # the shape the config promises
            if spec.HasField("reshape"):
                value = value.reshape((len(value),) + tuple(spec.reshape.shape))
            parts.append(value)
        batched[spec.name] = np.concatenate(parts)
    return batched


def test_dynamic_batching_gives_each_request_its_own_maps(model_file, tmp_path):
    written = export_triton(model_file, tmp_path / "repo", method="rectgrad", q=90)
    config = read_config(written.config_file)
    rng = np.random.default_rng(0)
    requests = []
    for size in (1, 3, 2):
        requests.append({"image": rng.standard_normal((size, 3, 8, 8)).astype(np.float32),
                         "target": rng.integers(-1, 5, (size, 1)).astype(np.int64)})
    session = ort.InferenceSession(str(written.model_file), providers=["CPUExecutionProvider"])
    names = [o.name for o in config.output]
    together = dict(zip(names, session.run(names, triton_batch(config, requests))))
    assert together["logits"].shape == (6, 5) and together["attribution"].shape == (6, 3, 8, 8)
    start = 0
    for request in requests:
        alone = dict(zip(names, session.run(names, triton_batch(config, [request]))))
        size = len(request["image"])
        for name in names:
            np.testing.assert_array_equal(together[name][start:start + size], alone[name])
        start += size
    explainer = rectonnx.Explainer(model_file, "rectgrad", q=90)
    everything = triton_batch(config, requests)
    direct = explainer.explain(everything["image"], everything["target"])
    np.testing.assert_allclose(together["attribution"], direct.attribution, rtol=0, atol=1e-6)


def test_fixed_batch_graph_is_exported_without_batching(model_file, tmp_path):
    """rewrite() makes a fixed batch symbolic where it safely can; where a graph keeps a fixed
    batch (here set by hand), Triton cannot batch it: max_batch_size 0 and full dims."""
    graph = rectonnx.rewrite(model_file, "saliency")
    for info in list(graph.graph.input) + list(graph.graph.output):
        info.type.tensor_type.shape.dim[0].dim_value = 2
    written = export_triton(model_file, tmp_path / "repo", name="fixed", graph=graph)
    config = read_config(written.config_file)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    dims = {t.name: list(t.dims) for t in list(config.input) + list(config.output)}
    assert dims == {"image": [2, 3, 8, 8], "target": [2], "logits": [2, 5],
                    "attribution": [2, 3, 8, 8]}
    assert "fixed batch size of 2" in written.summary()


def test_inputs_with_defaults_are_optional(model_file):
    """A graph input with an initializer of the same name (IR >= 4) is an input with a default:
    Triton lists it optional. Per-sample settings ([Q], default [1]) batch like ``target``."""
    graph = rectonnx.rewrite(model_file, "saliency")
    scale = helper.make_tensor_value_info("scale", TensorProto.DOUBLE, ["Q"])
    graph.graph.input.append(scale)
    graph.graph.initializer.append(numpy_helper.from_array(np.array([1.0]), "scale"))
    config = parse_config(triton_config(graph, "with_default").pbtxt())
    optional = {t.name: (t.optional, list(t.dims)) for t in config.input}
    assert optional == {"image": (False, [3, 8, 8]), "target": (False, [1]),
                        "scale": (True, [1])}


def test_existing_version_is_kept_unless_forced(model_file, tmp_path):
    export_triton(model_file, tmp_path / "repo", method="saliency")
    with pytest.raises(ExportError, match="exists; pick another --version"):
        export_triton(model_file, tmp_path / "repo", method="saliency")
    export_triton(model_file, tmp_path / "repo", method="saliency", version=2)
    export_triton(model_file, tmp_path / "repo", method="saliency", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "repo" / "net_saliency").iterdir()) == \
        ["1", "2", "config.pbtxt"]


def test_an_explainer_graph_is_exported_as_it_is(model_file, tmp_path):
    graph = rectonnx.rewrite(model_file, "rectgrad", q=70, padding_trick=True)
    onnx.save(graph, tmp_path / "explainer.onnx")
    result = CliRunner().invoke(main, ["export-triton", str(tmp_path / "explainer.onnx"),
                                       "--repo", str(tmp_path / "repo"), "--name", "ready"])
    assert result.exit_code == 0, result.output
    exported = onnx.load(tmp_path / "repo" / "ready" / "1" / "model.onnx")
    assert exported.SerializeToString() == graph.SerializeToString()


def test_cli_export_triton(model_file, tmp_path):
    result = CliRunner().invoke(main, ["export-triton", str(model_file), "--repo",
                                       str(tmp_path / "repo"), "--name", "explained",
                                       "--method", "guided_backprop", "--max-batch-size", "8",
                                       "--instance", "gpu"])
    assert result.exit_code == 0, result.output
    safe = CliRunner().invoke(main, ["export-triton", str(model_file), "--repo",
                                     str(tmp_path / "repo"), "--name", "tensorrt_safe",
                                     "--threshold", "bisect"])
    assert safe.exit_code == 0, safe.output
    graph = onnx.load(tmp_path / "repo" / "tensorrt_safe" / "1" / "model.onnx")
    assert "TopK" not in {n.op_type for n in graph.graph.node}
    assert "explained" in result.output and "dynamic batching" in result.output
    config = read_config(tmp_path / "repo" / "explained" / "config.pbtxt")
    assert config.max_batch_size == 8 and config.instance_group[0].kind == 1  # KIND_GPU
    again = CliRunner().invoke(main, ["export-triton", str(model_file), "--repo",
                                      str(tmp_path / "repo"), "--name", "explained"])
    assert again.exit_code == 2 and again.output.startswith("error: ")
    bad = CliRunner().invoke(main, ["export-triton", str(model_file), "--repo",
                                    str(tmp_path / "repo"), "--name", "no/slashes"])
    assert bad.exit_code == 2 and "use letters, digits" in bad.output
