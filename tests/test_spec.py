"""One explanation spec through every surface (``ExplanationSpec``, methods.py, artifact.py).

* Validation: every invalid value (type, range, NaN, an option the method lacks, q with tau) is
  one clear ValueError naming the option, in Python and as one ``error:`` line on the CLI.
* Parity, per option: for each case, the attribution of the Python ``rewrite`` equals that of
  the ``Explainer``, of ``rectonnx rewrite``, of ``rectonnx explain`` (the ``.npy`` files), of
  ``rectonnx export-triton`` (the written model), and of the graph the Ray path builds
  (``distributed._explainer_graph``, which its actors run); every surface records the same spec.
  Every declared option appears in some case, and every command has a flag for every option.
* The artifact says what it is: the spec round-trips through ``metadata_props``; an explainer
  file given to ``Explainer`` / ``export-triton`` is used as it is, and contradicting options
  are refused.
* Paper defaults (RectGrad: q = 98 with the padding trick) and the vanishing-map warning.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from helpers import make_model, run_explainer
from rectonnx.artifact import read_stamp
from rectonnx.batch import preprocess_for
from rectonnx.cli import main
from rectonnx.images import load_image
from rectonnx.methods import METHODS, all_options

import rectonnx
from rectonnx import ExplanationSpec

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "paper_cnn_digits.onnx"
IMAGES = sorted((ROOT / "models" / "images").glob("digits_*.png"))[:3]

CASES = [
    ("rectgrad", {}),
    ("rectgrad", {"q": 90.0}),
    ("rectgrad", {"tau": 0.001}),
    ("rectgrad", {"q_input": True}),
    ("rectgrad", {"padding_trick": "border"}),
    ("rectgrad", {"padding_trick": False}),
    ("rectgrad", {"prr": True}),
    ("rectgrad", {"threshold": "bisect", "q": 95.0}),
    ("rectgrad", {"threshold": "approx", "q": 95.0}),  # subsamples the 32 x 32 x 32 layer
    ("saliency", {"threshold": "approx", "recall": 0.9, "final_percentile": 95.0}),
    ("rectgrad", {"layer_outputs": True}),
    ("rectgrad", {"runtime": "onnxruntime-cpu"}),
    ("saliency", {"final_percentile": 90.0}),
    ("guided_backprop", {"padding_trick": "exact"}),
    ("smoothgrad", {"samples": 3, "sigma": 0.2, "seed": 5}),
    ("integrated_gradients", {"steps": 4, "baseline": 0.5, "integration": "riemann_middle"}),
    ("deeplift", {"baseline": 0.25}),
    ("epsilon_lrp", {"epsilon": 0.01}),
    ("saliency", {"wrt": "/6/Relu_output_0"}),
    ("grad_input", {"token_reduction": "none"}),  # token models only: ignored here (test_text)
    # float16 models only: ignored by this float32 model (float16 graphs: test_precision.py)
    ("saliency", {"precision": "fp32"}),
    ("gradcam", {}),
    ("gradcam", {"layer": "/8/Relu_output_0"}),
    ("gradcam++", {}),
    ("layercam", {"layer": "/6/Relu_output_0"}),
]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'defaults'}" for m, o in CASES]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def flags(method: str, options: dict) -> list[str]:
    """The command-line flags of ``method`` and ``options``."""
    out = ["--method", method]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            out += [flag, "off"] if name == "padding_trick" else [f"--no-{flag[2:]}"]
        else:
            out += [flag, str(value)]
    return out


@pytest.fixture(scope="module")
def batch():
    preprocess = preprocess_for(MODEL)
    return np.stack([load_image(path, preprocess)[0] for path in IMAGES])


def attribution_of(graph: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return run_explainer(graph, x, [-1] * len(x))[1]


def assert_same(actual, expected, where: str):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7 * np.abs(expected).max(),
                               err_msg=where)


# -- validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("method,options,words", [
    ("rectgrad", {"q": float("nan")}, "option q"),
    ("rectgrad", {"q": 100.5}, "option q"),
    ("rectgrad", {"tau": float("nan")}, "option tau"),
    ("rectgrad", {"tau": float("inf")}, "option tau"),
    ("rectgrad", {"padding_trick": "yes"}, "option padding_trick"),
    ("rectgrad", {"padding_trick": 1}, "option padding_trick"),
    ("rectgrad", {"prr": "true"}, "option prr"),
    ("rectgrad", {"q": True}, "option q"),
    ("rectgrad", {"q": 90.0, "tau": 0.1}, "either q"),
    ("rectgrad", {"tau": 0.1, "q_input": True}, "q_input"),
    ("rectgrad", {"threshold": "sort"}, "option threshold"),
    ("rectgrad", {"samples": 4}, "rectgrad has no option samples"),
    ("saliency", {"q": 90.0}, "saliency has no option q"),
    ("smoothgrad", {"sigma": float("nan")}, "option sigma"),
    ("smoothgrad", {"sigma": -0.1}, "option sigma"),
    ("smoothgrad", {"samples": 2.5}, "option samples"),
    ("smoothgrad", {"samples": 0}, "option samples"),
    ("integrated_gradients", {"steps": 1}, "steps"),
    ("integrated_gradients", {"baseline": float("nan")}, "option baseline"),
    ("epsilon_lrp", {"epsilon": 0.0}, "option epsilon"),
    ("saliency", {"final_percentile": -1}, "option final_percentile"),
    ("saliency", {"runtime": "tensorrt"}, "option runtime"),
    ("nonsense", {}, "unknown method"),
])
def test_invalid_values_are_one_clear_error(method, options, words):
    with pytest.raises(ValueError, match=words) as caught:
        rectonnx.rewrite(MODEL, method, **options)
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match=words):
        rectonnx.Explainer(MODEL, method, **options)


@pytest.mark.parametrize("args,words", [
    (["--tau", "nan"], "option tau"),
    (["--q", "nan"], "option q"),
    (["--method", "smoothgrad", "--sigma", "nan"], "option sigma"),
    (["--method", "saliency", "--q", "90"], "saliency has no option q"),
    (["--method", "smoothgrad", "--samples", "0"], "option samples"),
])
def test_invalid_values_on_the_command_line(tmp_path, args, words):
    for command in (["rewrite", MODEL, "-o", tmp_path / "g.onnx"],
                    ["export-triton", MODEL, "--repo", tmp_path / "repo"],
                    ["explain", MODEL, IMAGES[0], "--out", tmp_path / "maps"]):
        result = cli(*command, *args)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert lines == [lines[-1]] and lines[-1].startswith("error:") and words in lines[-1], \
            result.output
    assert not (tmp_path / "g.onnx").exists() and not (tmp_path / "repo").exists()


def test_every_option_has_a_flag_on_every_command():
    for command in ("rewrite", "explain", "export-triton"):
        params = {p.name for p in main.commands[command].params}
        assert {"method", *all_options()} <= params, command
        assert all(p.help for p in main.commands[command].params if p.name in all_options())


def test_the_cases_cover_every_declared_option():
    covered = {name for _, options in CASES for name in options}
    assert set(all_options()) == covered
    assert {method for method, _ in CASES} >= set(METHODS) - {"grad_input", "deconvnet"}


# -- parity through every surface ----------------------------------------------------------------
@pytest.mark.parametrize("method,options", CASES, ids=IDS)
def test_every_surface_gives_the_same_attribution(method, options, batch, tmp_path):
    spec = ExplanationSpec(method, **options)
    graph = rectonnx.rewrite(MODEL, method, **options)
    assert read_stamp(graph).spec == spec
    expected = attribution_of(graph, batch)
    assert np.abs(expected).max() > 0, "a case whose map is all zero tests nothing"

    # the same spec as an object
    assert_same(attribution_of(rectonnx.rewrite(MODEL, spec), batch), expected, "spec object")

    # Explainer (which may pick the CPU-tuned runtime: the same attribution)
    explainer = rectonnx.Explainer(MODEL, method, providers=["CPUExecutionProvider"], **options)
    result = explainer.explain(batch, [-1] * len(batch))
    assert_same(result.attribution, expected, "Explainer")
    assert explainer.spec.replace(runtime=spec.runtime) == spec
    if options.get("layer_outputs"):
        assert result.layers and all(len(v) == len(batch) for v in result.layers.values())

    # rectonnx rewrite
    written = tmp_path / "explainer.onnx"
    run = cli("rewrite", MODEL, "-o", written, *flags(method, options))
    assert run.exit_code == 0, run.output
    saved = onnx.load(str(written))
    assert read_stamp(saved).spec == spec
    assert_same(attribution_of(saved, batch), expected, "CLI rewrite")

    # rectonnx export-triton
    run = cli("export-triton", MODEL, "--repo", tmp_path / "repo", "--name", "m",
              *flags(method, options))
    assert run.exit_code == 0, run.output
    exported = onnx.load(str(tmp_path / "repo" / "m" / "1" / "model.onnx"))
    assert read_stamp(exported).spec == spec
    assert_same(attribution_of(exported, batch), expected, "export-triton")

    # the graph the Ray path sends to its actors
    from rectonnx.distributed import _explainer_graph

    ray_graph = onnx.load_from_string(_explainer_graph(MODEL, method, options))
    assert read_stamp(ray_graph).spec == spec
    assert_same(attribution_of(ray_graph, batch), expected, "Ray path")

    # rectonnx explain: one .npy per image, the spec in run.json
    out = tmp_path / "maps"
    run = cli("explain", MODEL, *IMAGES, "--out", out, "--no-png", "--no-progress",
              *flags(method, options))
    assert run.exit_code == 0, run.output
    maps = np.stack([np.load(out / f"{path.stem}.npy") for path in IMAGES])
    assert_same(maps, expected, "CLI explain")
    if options.get("layer_outputs"):  # the maps at every activation, per image
        for i, path in enumerate(IMAGES):
            with np.load(out / f"{path.stem}_layers.npz") as layers:
                assert set(layers.files) == set(result.layers)
                for name in layers.files:
                    assert_same(layers[name], result.layers[name][i], f"layer {name}")
    settings = json.loads((out / "run.json").read_text())
    recorded = {k: v for k, v in spec.to_dict().items() if k != "runtime"}
    assert {k: settings[k] for k in recorded} == recorded


# -- the artifact -------------------------------------------------------------------------------
def test_spec_round_trips_through_json_and_the_artifact():
    for method, options in CASES:
        spec = ExplanationSpec(method, **options)
        assert ExplanationSpec.from_json(spec.to_json()) == spec
        assert ExplanationSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    graph = rectonnx.rewrite(MODEL, "smoothgrad", samples=2)
    stamp = read_stamp(graph)
    assert stamp.spec == ExplanationSpec("smoothgrad", samples=2)
    assert stamp.version == rectonnx.__version__ and len(stamp.source_sha256) == 64
    assert stamp.input_name == "input"


def test_an_explainer_file_is_used_as_it_is_and_contradictions_are_refused(tmp_path, batch):
    path = tmp_path / "rg.onnx"
    assert cli("rewrite", MODEL, "-o", path, "--q", "90").exit_code == 0
    expected = attribution_of(onnx.load(str(path)), batch)
    agreeing = rectonnx.Explainer(path, "rectgrad", q=90, padding_trick=True)
    assert_same(agreeing.explain(batch).attribution, expected, "explainer file")
    for method, options in (("saliency", {}), (None, {"q": 95.0}), (None, {"prr": True})):
        with pytest.raises(rectonnx.InputError, match="contradict"):
            rectonnx.Explainer(path, method, **options)
    result = cli("export-triton", path, "--repo", tmp_path / "repo", "--method", "saliency",
                 "--q-input")
    assert result.exit_code == 2 and "contradict" in result.output
    assert not (tmp_path / "repo").exists()
    result = cli("export-triton", path, "--repo", tmp_path / "repo")
    assert result.exit_code == 0, result.output
    with pytest.raises(rectonnx.UnsupportedModelError, match="already an explainer graph"):
        rectonnx.rewrite(path)
    info = cli("info", path)
    assert info.exit_code == 0 and "rectgrad (q=90, padding_trick=exact)" in info.output


# -- defaults and warnings ---------------------------------------------------------------------
def test_rectgrad_defaults_to_the_papers_settings(batch, tmp_path):
    spec = ExplanationSpec("rectgrad")
    assert spec.q == 98.0 and spec.padding_trick == "exact" and spec.tau is None
    assert ExplanationSpec("saliency").padding_trick is False
    assert cli("rewrite", MODEL, "-o", tmp_path / "a.onnx").exit_code == 0
    assert read_stamp(onnx.load(str(tmp_path / "a.onnx"))).spec == spec
    off = attribution_of(rectonnx.rewrite(MODEL, padding_trick=False), batch)
    assert not np.allclose(off, attribution_of(rectonnx.rewrite(MODEL), batch))


def small_dense_model(units: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, units)).astype(np.float32)
    w2 = rng.normal(size=(units, 3)).astype(np.float32)
    nodes = [onnx.helper.make_node("MatMul", ["x", "w1"], ["h"]),
             onnx.helper.make_node("Relu", ["h"], ["hidden"]),
             onnx.helper.make_node("MatMul", ["hidden", "w2"], ["logits"])]
    return make_model(nodes, [onnx.helper.make_tensor_value_info("x", 1, ["N", 8])],
                      [onnx.helper.make_tensor_value_info("logits", 1, ["N", 3])],
                      [onnx.numpy_helper.from_array(w1, "w1"),
                       onnx.numpy_helper.from_array(w2, "w2")])


def test_a_layer_too_small_for_q_warns_and_names_it(tmp_path):
    model = small_dense_model(16)  # at q = 98, k = round(15 * 0.02) + 1 = 1
    with pytest.warns(rectonnx.VanishingMapWarning, match="'hidden' has 16 units"):
        graph = rectonnx.rewrite(model, "rectgrad", q=98)
    x = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    assert not attribution_of(graph, x).any()  # what the warning says
    with pytest.warns(rectonnx.VanishingMapWarning, match="use q <= 96.5"):
        rectonnx.rewrite(model, "rectgrad", q=97)
    k = round((16 - 1) * (1 - 96.5 / 100)) + 1
    assert k == 2 and attribution_of(rectonnx.rewrite(model, "rectgrad", q=96.5), x).any()
    path = tmp_path / "small.onnx"
    onnx.save(model, str(path))
    result = cli("rewrite", path, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0 and "warning: RectGrad layer 'hidden'" in result.output


def test_the_warning_starts_at_25_units_for_q_98(recwarn):
    """k = round((M - 1)(1 - q/100)) + 1 in float64: M = 25 gives 0.48 -> k = 1 (warned);
    M = 26 gives 0.5000000000000004 (1 - 0.98 is not exact) -> k = 2 (no warning)."""
    rectonnx.rewrite(small_dense_model(25), "rectgrad", q=98)
    assert any(issubclass(w.category, rectonnx.VanishingMapWarning) for w in recwarn)
    recwarn.clear()
    rectonnx.rewrite(small_dense_model(26), "rectgrad", q=98)
    assert not any(issubclass(w.category, rectonnx.VanishingMapWarning) for w in recwarn)


def test_options_that_replace_the_sidecar_preprocessing_warn(tmp_path):
    model = ROOT / "models" / "efficientnet_lite0.onnx"
    with pytest.warns(rectonnx.batch.PreprocessOverrideWarning, match="mean .*127.0.* -> "):
        preprocess_for(model, preset="imagenet")
    result = cli("explain", model, ROOT / "models" / "images" / "chelsea.jpg", "--out",
                 tmp_path / "maps", "--preset", "imagenet", "--no-png", "--no-progress")
    assert result.exit_code == 0 and "warning: the options replace the preprocessing of" in \
        result.output
    import warnings as _warnings
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")
        preprocess_for(model)  # the sidecar alone, or the same values: no warning
        preprocess_for(model, size=224)


def test_options_of_an_explainer_file_are_read_in_its_context(tmp_path):
    """``recall`` alone is refused (it needs threshold=approx), but agrees with an approx file."""
    path = tmp_path / "approx.onnx"
    onnx.save(rectonnx.rewrite(MODEL, "rectgrad", threshold="approx", q=95.0), str(path))
    rectonnx.Explainer(path, recall=0.95)
    with pytest.raises(rectonnx.InputError, match="recall"):
        rectonnx.Explainer(path, recall=0.5)
