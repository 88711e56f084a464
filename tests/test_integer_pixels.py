"""Models that take integer pixels (uint8 images) and cast them to float themselves
(normalize.float_cast): the attribution is taken at the Cast's output, the pixel values as
floats, with the input's shape; the Explainer takes integer batches and ``rectonnx explain``
feeds the decoded images' 0..255 values.

Oracles: torch autograd (float64) of the same net on the float pixel values; Integrated
Gradients equal to that of the same net exported with a float input (the Cast left out)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from helpers import assert_close, export

import rectonnx
from rectonnx.cli import main
from rectonnx.errors import InputError
from rectonnx.info import coverage

TARGET = [1, 2, 0]


class Scaled(nn.Module):
    """``(x / 255 - 0.5) / 0.25``, a convolution, a ReLU and a linear head."""

    def __init__(self, cast: bool):
        super().__init__()
        self.cast = cast
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        x = x.float() if self.cast else x
        return self.fc(torch.relu(self.conv((x / 255.0 - 0.5) / 0.25)).flatten(1))


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    with_cast = Scaled(cast=True).eval()
    without = copy.deepcopy(with_cast)
    without.cast = False
    pixels = np.random.default_rng(0).integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    return (with_cast, export(with_cast, pixels[:1]), export(without, pixels[:1].astype(
        np.float32)), pixels)


def test_integer_pixels_are_attributed_as_their_float_values(nets):
    module, model, _, pixels = nets
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    double = copy.deepcopy(module).double()
    double.cast = False
    x = torch.tensor(pixels, dtype=torch.float64, requires_grad=True)
    double(x)[torch.arange(3), torch.as_tensor(TARGET)].sum().backward()
    for method, expected in (("saliency", x.grad), ("grad_input", x * x.grad)):
        result = rectonnx.Explainer(model, method).explain(pixels, TARGET)
        assert result.attribution.shape == pixels.shape
        assert_close(result.attribution, expected.detach().numpy(),
                     "torch autograd (integer pixels)", where=method)


def test_methods_with_copies_equal_the_float_input_model(nets):
    _, model, float_model, pixels = nets
    for method, options in (("integrated_gradients", {"steps": 8}), ("deeplift", {}),
                            ("rectgrad", {"q": 80.0})):
        got = rectonnx.Explainer(model, method, **options).explain(pixels, TARGET)
        want = rectonnx.Explainer(float_model, method, **options).explain(
            pixels.astype(np.float32), TARGET)
        assert_close(got.attribution, want.attribution, "the float-input model", where=method)


def test_integer_pixel_batches_are_checked(nets):
    _, model, _, pixels = nets
    explainer = rectonnx.Explainer(model, "saliency")
    assert explainer.integer_pixels and not explainer.token_input
    with pytest.raises(InputError, match=r"integer pixel values \(uint8, 0\.\.255\)"):
        explainer.explain(pixels.astype(np.float32))
    with pytest.raises(InputError, match="outside uint8's range"):
        explainer.explain(pixels.astype(np.int32) + 200)
    with pytest.raises(InputError, match="pass a batch"):
        explainer.explain(pixels[0])
    report, problem = coverage(model)
    assert problem is None and "integer pixels" in report


def test_explain_feeds_the_decoded_images_values(nets, tmp_path):
    _, model, _, pixels = nets
    onnx.save(model, tmp_path / "u8.onnx")
    (tmp_path / "images").mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(image.transpose(1, 2, 0)).save(tmp_path / "images" / f"p{i}.png")
    result = CliRunner().invoke(main, ["explain", str(tmp_path / "u8.onnx"),
                                       str(tmp_path / "images"), "--out", str(tmp_path / "out"),
                                       "--method", "grad_input", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    direct = rectonnx.Explainer(model, "grad_input").explain(pixels).attribution
    for i in range(len(pixels)):
        np.testing.assert_array_equal(np.load(tmp_path / "out" / f"p{i}.npy"), direct[i])


def test_an_integer_input_read_by_more_than_a_cast_is_refused():
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["f"], to=onnx.TensorProto.FLOAT),
         helper.make_node("Cast", ["x"], ["g"], to=onnx.TensorProto.FLOAT),
         helper.make_node("Add", ["f", "g"], ["y"])], "two_casts",
        [helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, ["N", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(ValueError, match="integer pixels that a Cast turns into floats"):
        rectonnx.rewrite(model, "saliency")
