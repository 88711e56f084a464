"""scikit-learn ``MLPClassifier`` -> ONNX for ``rectonnx.rewrite``: skl2onnx, dynamic batch.

    from rectonnx.converters.sklearn import export
    export(classifier, "model.onnx")     # a fitted MLPClassifier with 3 or more classes

skl2onnx writes two outputs, ``label`` and ``probabilities`` (a ZipMap of them unless disabled,
as here); only ``probabilities`` (``Softmax`` of the last layer) is kept, so ``rectonnx`` strips
the Softmax and its ``logits`` are the MLP's pre-softmax scores. The input is ``float32
[N, n_features_in_]`` and the attribution has the same shape (one value per feature). Any hidden
activation works (relu, tanh, logistic, identity). Binary classifiers (one logistic output unit)
are refused: their probabilities are ``[1 - p, p]``, not a Softmax of scores.
Needs skl2onnx (the ``sklearn`` extra: ``pip install 'rectonnx[sklearn]'``).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx.utils

from ._common import finish, name_batch_axis, require

DEFAULT_OPSET = 17
WHAT = "rectonnx.converters.sklearn"
SCORES = "probabilities"


def export(classifier, path: str | Path | None = None, *, input_name: str = "input",
           opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export ``classifier`` (a fitted ``MLPClassifier``) and return the ONNX model; save it if
    ``path``. The one output is ``probabilities``, ``[N, n_classes]``."""
    neural_network = require("sklearn.neural_network", "sklearn", WHAT)
    skl2onnx = require("skl2onnx", "sklearn", WHAT)
    data_types = require("skl2onnx.common.data_types", "sklearn", WHAT)
    if not isinstance(classifier, neural_network.MLPClassifier):
        raise TypeError(f"expected a sklearn.neural_network.MLPClassifier, got "
                        f"{type(classifier).__name__}")
    if not hasattr(classifier, "coefs_"):
        raise ValueError("the MLPClassifier is not fitted yet: call fit() first")
    if classifier.out_activation_ != "softmax":
        raise ValueError(f"only multi-class MLPClassifiers (softmax output) are supported; this "
                         f"one ends in {classifier.out_activation_!r} "
                         f"({len(classifier.classes_)} classes)")
    types = [(input_name, data_types.FloatTensorType([None, classifier.n_features_in_]))]
    proto = skl2onnx.to_onnx(classifier, initial_types=types, target_opset=opset,
                             options={id(classifier): {"zipmap": False}})
    proto = onnx.utils.Extractor(proto).extract_model([input_name], [SCORES])
    name_batch_axis(proto)
    return finish(proto, path)

