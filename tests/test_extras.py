"""Optional dependencies: whatever needs an extra that is not installed ends in one clear error
naming the extra (``MissingDependencyError``, one ``error:`` line and exit status 2 on the command
line), never a ModuleNotFoundError traceback. A package is hidden by putting None in
``sys.modules`` for it and its loaded submodules, which makes ``import`` raise ImportError.

Also here: ``export-triton``'s validation against Triton's schema, ``evaluate --quick`` and the
low-accuracy warning, and the completeness of the command line's help."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from rectonnx.cli import main
from rectonnx.errors import MissingDependencyError, RectonnxError, require


def hide(monkeypatch, *packages: str) -> None:
    """Make ``import package`` (and of any of its submodules) raise ImportError."""
    for package in packages:
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.setitem(sys.modules, package, None)


def invoke(*args, **extra):
    return CliRunner().invoke(main, [str(a) for a in args], **extra)


def one_error_line(result, *words):
    """The result is exit status 2 with exactly one line, ``error: ...`` containing ``words``."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny image classifier, [N, 3, 4, 4] -> [N, 3] scores (Flatten, MatMul, Add), no torch."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["mm"]),
         helper.make_node("Add", ["mm", "b"], ["scores"])], "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(rng.standard_normal((48, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")])
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), path)
    return path


# -- the helper --------------------------------------------------------------------------------
def test_require_returns_the_module_or_names_the_extra(monkeypatch):
    assert require("json", "serve", "anything") is json
    hide(monkeypatch, "json")
    with pytest.raises(MissingDependencyError) as caught:
        require("json", "serve", "rectonnx thing")
    assert str(caught.value) == "rectonnx thing needs json: pip install 'rectonnx[serve]'"
    assert isinstance(caught.value, RectonnxError) and isinstance(caught.value, ImportError)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    with pytest.raises(MissingDependencyError, match=r"needs json: pip install x==1$"):
        require("json", "serve", "it", install="pip install x==1")


def test_require_names_a_broken_dependency_of_the_package(monkeypatch, tmp_path):
    (tmp_path / "rectonnx_fake_package.py").write_text("import rectonnx_missing_inner\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingDependencyError, match=r"needs rectonnx_fake_package \(it cannot "
                       r"import rectonnx_missing_inner\): pip install 'rectonnx\[torch\]'"):
        require("rectonnx_fake_package", "torch", "this")


# -- converters --------------------------------------------------------------------------------
@pytest.mark.parametrize("converter, hidden, extra", [
    ("pytorch", ["torch"], "torch"),
    ("keras", ["keras", "tensorflow", "tf2onnx"], "keras"),
    ("jax", ["jax2onnx", "flax"], "jax"),
    ("sklearn", ["sklearn", "skl2onnx"], "sklearn"),
])
def test_converters_name_their_extra(monkeypatch, converter, hidden, extra):
    import importlib

    module = importlib.import_module(f"rectonnx.converters.{converter}")
    hide(monkeypatch, *hidden)
    arguments = {"pytorch": (object(), None), "jax": (object(), (3,))}.get(converter, (object(),))
    with pytest.raises(MissingDependencyError) as caught:
        module.export(*arguments)
    message = str(caught.value)
    assert message.startswith(f"rectonnx.converters.{converter} needs ")
    assert f"pip install 'rectonnx[{extra}]'" in message
    if converter == "jax":
        assert "pip install --no-deps jax2onnx==0.17.1" in message


# -- evaluate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden, named", [(["sklearn", "torch"], "torch"),
                                           (["sklearn"], "sklearn"), (["skimage"], "skimage")])
def test_evaluate_command_names_the_evaluate_extra(monkeypatch, tmp_path, hidden, named):
    hide(monkeypatch, *hidden)
    out = tmp_path / "report"
    result = invoke("evaluate", "--out", out, "--no-progress")
    line = one_error_line(result, "rectonnx[evaluate]", f"needs {named}")
    assert line == f"error: rectonnx evaluate needs {named}: pip install 'rectonnx[evaluate]'"
    assert not out.exists()  # nothing ran


def test_evaluate_on_cifar10_needs_torch_only(monkeypatch):
    from rectonnx.evaluate import EvalConfig
    from rectonnx.evaluate.experiments import check_dependencies

    hide(monkeypatch, "sklearn", "skimage")
    check_dependencies(EvalConfig(cifar10="/somewhere"))
    with pytest.raises(MissingDependencyError, match="needs sklearn"):
        check_dependencies(EvalConfig())


def test_training_and_datasets_name_the_evaluate_extra(monkeypatch):
    from rectonnx import datasets
    from rectonnx.evaluate import training

    hide(monkeypatch, "torch", "sklearn", "skimage")
    with pytest.raises(MissingDependencyError, match=r"needs torch: .*rectonnx\[evaluate\]"):
        training.paper_cnn()
    # the uncached functions (the lru_cache keeps what an earlier test loaded)
    with pytest.raises(MissingDependencyError, match=r"digits_on_photos needs sklearn.datasets"
                                                     r": pip install 'rectonnx\[evaluate\]'"):
        datasets._digit_pool.__wrapped__("train")
    with pytest.raises(MissingDependencyError, match=r"needs skimage.data: .*rectonnx\[evaluate"):
        datasets._photo_bank.__wrapped__()


# -- Ray ---------------------------------------------------------------------------------------
def test_ray_names_the_ray_extra(monkeypatch, model_file, tmp_path):
    from rectonnx import distributed

    hide(monkeypatch, "ray")
    with pytest.raises(MissingDependencyError, match=r"needs ray: pip install 'rectonnx\[ray\]'"):
        distributed._ray()
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(images / "a.png")
    result = invoke("explain", model_file, images, "--out", tmp_path / "maps", "--ray",
                    "--method", "saliency", "--no-progress")
    one_error_line(result, "needs ray", "rectonnx[ray]")


# -- Triton ------------------------------------------------------------------------------------
def test_triton_schema_names_the_serve_extra(monkeypatch):
    from rectonnx.serve import model_config_schema, parse_config, validate_config

    hide(monkeypatch, "tritonclient")
    assert model_config_schema() is None
    for check in (parse_config, validate_config):
        with pytest.raises(MissingDependencyError, match=r"rectonnx\[serve\]"):
            check('name: "m"\n')


def test_export_triton_without_tritonclient_says_not_validated(monkeypatch, model_file,
                                                               tmp_path):
    hide(monkeypatch, "tritonclient")
    result = invoke("export-triton", model_file, "--repo", tmp_path / "repo", "--method",
                    "saliency")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == \
        "config.pbtxt not validated: pip install 'rectonnx[serve]'"
    assert (tmp_path / "repo" / "tiny_saliency" / "config.pbtxt").is_file()


def test_export_triton_validates_against_triton_schema(monkeypatch, model_file, tmp_path):
    pytest.importorskip("tritonclient", reason="the Triton schema needs pip install -e '.[serve]'")
    from rectonnx import serve

    if serve.model_config_schema() is None:
        pytest.skip("tritonclient ships no model_config_pb2")
    result = invoke("export-triton", model_file, "--repo", tmp_path / "repo", "--method",
                    "saliency")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == \
        "config.pbtxt validated against Triton's model config schema"
    config = serve.validate_config((tmp_path / "repo" / "tiny_saliency" /
                                    "config.pbtxt").read_text())
    assert config.name == "tiny_saliency" and config.platform == "onnxruntime_onnx"
    with pytest.raises(serve.ExportError, match=r"does not follow Triton's model config schema: "
                       r".*no field named \"max_batch\""):
        serve.validate_config('name: "m"\nmax_batch: 4\n')
    # a config that Triton would refuse ends the command in one error line
    original = serve.TritonConfig.pbtxt
    monkeypatch.setattr(serve.TritonConfig, "pbtxt",
                        lambda self: original(self) + "instance_group [ { kind: KIND_TPU } ]\n")
    bad = invoke("export-triton", model_file, "--repo", tmp_path / "other", "--method",
                 "saliency")
    assert bad.exit_code == 2
    assert bad.output.splitlines()[-1].startswith(
        "error: config.pbtxt does not follow Triton's model config schema: ")


# -- evaluate --quick and the low-accuracy warning ----------------------------------------------
def test_quick_configuration():
    from rectonnx.evaluate import EXPERIMENTS, EvalConfig, configure

    quick = configure(quick=True, out="q")
    assert quick == EvalConfig(out="q").quick()
    assert quick.experiments == tuple(e for e in EXPERIMENTS if e != "occlusion")
    assert (quick.train_size, quick.test_size, quick.epochs, quick.width) == (3000, 500, 5, 0.5)
    assert quick.methods == ("random", "saliency", "rectgrad")
    assert quick.fractions == (0.5,) and quick.repeats == 1
    assert quick.workers == 1  # six short trainings: worker processes would cost more
    assert (quick.retrain, quick.retrain_epochs) == ("finetune", 1)
    assert quick.threads == 1  # several torch threads crawl on a loaded two-core machine
    # smaller than the default everywhere that costs time
    default = EvalConfig()
    for key in ("epochs", "retrain_epochs", "occlusion_images", "noise_images",
                "sensitivity_images", "q_images"):
        assert getattr(quick, key) <= getattr(default, key), key
    assert len(quick.methods) * len(quick.fractions) < \
        len(default.methods) * len(default.fractions)
    # the options still override it
    assert configure(quick=True, epochs=2, methods="saliency").epochs == 2
    assert configure(quick=True, experiments="occlusion,noise").experiments == ("occlusion",
                                                                                 "noise")
    with pytest.raises(ValueError, match="--paper and --quick"):
        configure(quick=True, paper=True)
    result = invoke("evaluate", "--quick", "--paper")
    one_error_line(result, "--paper and --quick exclude each other")


def test_accuracy_warning_threshold():
    from rectonnx.evaluate import LOW_ACCURACY
    from rectonnx.evaluate.experiments import accuracy_warning

    assert LOW_ACCURACY == 0.85
    assert accuracy_warning(0.85, 10) is None and accuracy_warning(0.93, 10) is None
    assert accuracy_warning(float("nan"), 10) is None
    message = accuracy_warning(0.23, 10)
    assert "test accuracy is 0.230, below 0.85 (chance: 0.10)" in message
    assert "too little for these tables to mean anything" in message
    assert "--epochs" in message


TINY = ["--train-size", "30", "--test-size", "20", "--epochs", "1", "--width", "0.25",
        "--experiments", "layers", "--methods", "saliency", "--threads", "1", "--no-progress"]


def test_evaluate_warns_when_the_network_is_too_weak(tmp_path):
    """One epoch on 30 images: the console and summary.md both say the tables mean nothing."""
    out = tmp_path / "report"
    result = invoke("evaluate", "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "below 0.85" in warnings[0], result.output
    assert "it repeats the warning above" in result.output.splitlines()[-1]
    saved = json.loads((out / "results.json").read_text())
    assert saved["accuracy"] < 0.85 and len(saved["warnings"]) == 1
    assert warnings[0] == f"warning: {saved['warnings'][0]}"
    summary = (out / "summary.md").read_text()
    assert f"> **Warning:** {saved['warnings'][0]}." in summary


def test_report_without_warnings_has_none(tmp_path):
    from rectonnx.evaluate import LowAccuracyWarning, report

    results = {"config": {"width": 0.5, "epochs": 5}, "data": "d", "accuracy": 0.9,
               "timings_s": {"total": 1.0}, "methods": [], "warnings": []}
    assert "Warning" not in report.markdown(results, [], [])
    assert issubclass(LowAccuracyWarning, UserWarning)
    results["warnings"] = ["weak"]
    assert "> **Warning:** weak." in report.markdown(results, [], [])


# -- the command line's help ---------------------------------------------------------------------
def test_every_option_has_help_and_the_command_list_is_complete():
    missing = []
    for name, command in main.commands.items():
        for param in command.params:
            if param.param_type_name == "option" and "--help" not in param.opts:
                if not (param.help or "").strip():
                    missing.append(f"{name} {'/'.join(param.opts)}")
    assert not missing, f"options without help: {missing}"
    for width in (80, 120):
        listing = invoke("--help", terminal_width=width)
        assert listing.exit_code == 0
        commands = listing.output.split("Commands:")[1]
        assert "..." not in commands, commands
        for name, command in main.commands.items():
            short = command.get_short_help_str(limit=1000)
            line = next(line for line in commands.splitlines() if line.split()[:1] == [name])
            assert short and line.split(None, 1)[1] == short, (name, short, line)
    assert main.context_settings["max_content_width"] >= 100
