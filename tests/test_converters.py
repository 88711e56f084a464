"""Each converter against its framework's own gradient (issue #3): the ONNX model a converter
writes, rewritten by rectonnx, gives the saliency (the gradient of the target score) that the
framework computes on the same weights and inputs, to ``max|a - b| / max|b| <= 1e-4``.

* PyTorch: torch autograd in float64 (``helpers.torch_gradient``);
* Keras 3 (tf2onnx): ``tf.GradientTape``, float32, on an NHWC (channels_last) CNN; the
  attribution comes back NHWC. Guided backprop and RectGrad are checked against the same model
  with ``tf.custom_gradient`` ReLUs that implement the rules of docs/maths.md, 'The methods',
  literally;
* JAX / Flax NNX (jax2onnx): ``jax.grad``, float32, NHWC;
* scikit-learn ``MLPClassifier`` (skl2onnx): torch autograd (float64) of the MLP rebuilt from its
  ``coefs_`` / ``intercepts_``, whose softmax is checked against ``predict_proba`` first.

TensorFlow and JAX are heavy optional extras: their tests are marked ``converters`` and run only
with ``pytest --converters`` (CI installs them and passes the flag; without it they are
deselected, never skipped). Inputs are ``distinct_values`` (no max-pool ties, no ReLU kink at the
input).
"""

from __future__ import annotations

import re
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from helpers import assert_close, distinct_values, explain, torch_gradient
from rectonnx.converters import jax as jax_converter
from rectonnx.converters import keras as keras_converter
from rectonnx.converters import pytorch as pytorch_converter
from rectonnx.converters import sklearn as sklearn_converter
from rectonnx.threshold import percentile_rank

converters = pytest.mark.converters
TARGETS = [0, 1, 2, 3, -1]


def assert_dynamic_batch(model) -> None:
    for info in [*model.graph.input, *model.graph.output]:
        assert info.type.tensor_type.shape.dim[0].dim_param == "N", info.name


# -- PyTorch -----------------------------------------------------------------------------------
def test_pytorch_saliency_matches_autograd(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 2 * 2, 4))
    net[1].running_mean.uniform_(-0.2, 0.2)
    net[1].running_var.uniform_(0.5, 2.0)
    path = tmp_path / "net.onnx"
    assert_dynamic_batch(pytorch_converter.export(net, torch.randn(1, 3, 8, 8), path))
    x = distinct_values((5, 3, 8, 8), np.random.default_rng(0))
    logits, attribution = explain(str(path), x, TARGETS)
    expected_logits, expected = torch_gradient(net, x, TARGETS)
    assert_close(logits, expected_logits, "pytorch converter: logits vs torch")
    assert_close(attribution, expected, "pytorch converter vs torch autograd")


# -- Keras 3 / TensorFlow ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras_cnn():
    """An NHWC CNN as plain layers, a ``forward(x, relu)`` over them (the scores), and the
    keras.Model ``softmax(forward)`` with ``keras.ops.relu``: the same weights run with any ReLU,
    and rectonnx must strip the softmax."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    random = {"bias_initializer": "random_normal"}
    conv1, bn = layers.Conv2D(6, 3, padding="same", **random), layers.BatchNormalization()
    conv2, pool = layers.Conv2D(8, 3, padding="same", **random), layers.MaxPooling2D(2)
    flat_head, gap_head = layers.Dense(4, **random), layers.Dense(4, **random)

    def forward(x, relu):
        h = pool(relu(bn(conv1(x), training=False)))
        h = relu(conv2(h))
        return flat_head(layers.Flatten()(h)) + gap_head(layers.GlobalAveragePooling2D()(h))

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.ops.softmax(forward(inputs, keras.ops.relu)))
    bn.set_weights([rng.uniform(0.5, 2.0, 6), rng.uniform(-0.2, 0.2, 6),
                    rng.uniform(-0.2, 0.2, 6), rng.uniform(0.5, 2.0, 6)])
    return model, forward, keras_converter.export(model)


def tf_attribution(forward, x: np.ndarray, target, relu=None) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, d logits[n, target[n]] / d x)`` by ``tf.GradientTape`` (float32)."""
    import tensorflow as tf

    inputs = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        logits = forward(inputs, relu or tf.nn.relu)
        target = np.where(np.asarray(target) < 0, logits.numpy().argmax(1), target)
        score = tf.reduce_sum(tf.gather(logits, target, batch_dims=1))
    return logits.numpy(), tape.gradient(score, inputs).numpy()


def gated_relu(rule):
    """A ReLU whose backward is ``rule(y, R, z)`` instead of ``I(z > 0) R``."""
    import tensorflow as tf

    @tf.custom_gradient
    def relu(z):
        y = tf.nn.relu(z)
        return y, lambda upstream: rule(y, upstream, z)
    return relu


def guided_rule(y, upstream, z):
    """docs/maths.md, 'The methods': ``R_z = I(z > 0) I(R > 0) R``."""
    import tensorflow as tf

    return upstream * tf.cast((z > 0) & (upstream > 0), upstream.dtype)


def rectgrad_rule(q: float):
    """docs/maths.md, 'The RectGrad gate': ``R_z = I(y R > tau) R``, ``tau`` the k-th largest
    score of the sample."""
    import tensorflow as tf

    def rule(y, upstream, z):
        scores = tf.reshape(y * upstream, [len(y), -1])
        tau = tf.math.top_k(scores, percentile_rank(scores.shape[1], q)).values[:, -1:]
        return upstream * tf.cast(tf.reshape(scores > tau, upstream.shape), upstream.dtype)
    return rule


@converters
def test_keras_nhwc_saliency_matches_gradient_tape(keras_cnn):
    _, forward, proto = keras_cnn
    assert_dynamic_batch(proto)
    x = distinct_values((5, 8, 8, 3), np.random.default_rng(0))
    logits, attribution = explain(proto, x, TARGETS)
    expected_logits, expected = tf_attribution(forward, x, TARGETS)
    assert attribution.shape == x.shape  # NHWC in, NHWC out
    assert_close(logits, expected_logits, "keras converter: logits vs keras")
    assert_close(attribution, expected, "keras converter vs tf.GradientTape")


@converters
@pytest.mark.parametrize("method", ["guided_backprop", "rectgrad"])
def test_keras_guided_backprop_and_rectgrad_match_tf_custom_gradients(keras_cnn, method):
    _, forward, proto = keras_cnn
    x = distinct_values((5, 8, 8, 3), np.random.default_rng(1))
    _, attribution = explain(proto, x, TARGETS, method,
                             **({"q": 90.0, "padding_trick": False} if method == "rectgrad"
                                else {}))
    rule = guided_rule if method == "guided_backprop" else rectgrad_rule(90.0)
    _, expected = tf_attribution(forward, x, TARGETS, gated_relu(rule))
    if method == "rectgrad":
        expected = np.maximum(x * expected, 0.0)  # x R_x I(x R_x > 0)
    assert np.abs(expected).max() > 0
    assert_close(attribution, expected, f"keras {method} vs tf.custom_gradient")


@converters
def test_keras_subclassed_model_needs_input_shape():
    import keras

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden, self.head = keras.layers.Dense(6, activation="relu"), keras.layers.Dense(3)

        def call(self, x):
            return self.head(self.hidden(x))

    net = Net()
    with pytest.raises(ValueError, match="input_shape"):
        keras_converter.export(net)
    x = distinct_values((4, 5), np.random.default_rng(0))
    logits, _ = explain(keras_converter.export(net, input_shape=(5,)), x, [0, 1, 2, -1])
    assert_close(logits, net(x).numpy(), "keras converter: logits vs keras")


# -- JAX / Flax ----------------------------------------------------------------------------------
@converters
def test_flax_nnx_saliency_matches_jax_grad(tmp_path):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(3, 6, (3, 3), padding="SAME", rngs=rngs)
            self.bn = nnx.BatchNorm(6, rngs=rngs)
            self.conv2 = nnx.Conv(6, 8, (3, 3), padding="VALID", rngs=rngs)
            self.dense = nnx.Linear(8 * 2 * 2, 4, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn(self.conv1(x)))
            x = nnx.relu(self.conv2(nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))))
            return self.dense(x.reshape(x.shape[0], -1))

    model = CNN(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for stat, low, high in [("mean", -0.2, 0.2), ("var", 0.5, 2), ("scale", 0.5, 2),
                            ("bias", -0.2, 0.2)]:
        getattr(model.bn, stat).value = jnp.asarray(rng.uniform(low, high, 6), jnp.float32)
    assert_dynamic_batch(jax_converter.export(model, (8, 8, 3), tmp_path / "cnn.onnx"))
    assert not model.bn.use_running_average  # the converter exported an eval-mode clone
    model.eval()

    x = distinct_values((5, 8, 8, 3), rng)
    logits, attribution = explain(str(tmp_path / "cnn.onnx"), x, TARGETS)
    target = np.where(np.array(TARGETS) < 0, logits.argmax(1), TARGETS)
    expected = jax.grad(lambda v: model(v)[jnp.arange(len(v)), target].sum())(jnp.asarray(x))
    assert attribution.shape == x.shape
    assert_close(logits, np.asarray(model(jnp.asarray(x))), "jax converter: logits vs flax")
    assert_close(attribution, np.asarray(expected), "jax converter vs jax.grad")


# -- scikit-learn --------------------------------------------------------------------------------
def fit_quietly(classifier, x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: a few iterations do for a test
        return classifier.fit(x, y)


def mlp(activation: str = "relu"):
    from sklearn.datasets import make_classification
    from sklearn.neural_network import MLPClassifier

    x, y = make_classification(300, 6, n_informative=5, n_redundant=0, n_classes=4,
                               random_state=0)
    classifier = MLPClassifier((16, 8), activation=activation, max_iter=50, random_state=0)
    return fit_quietly(classifier, x, y), x[:20].astype(np.float32)


def mlp_scores(classifier, x: torch.Tensor) -> torch.Tensor:
    """The MLP's pre-softmax scores, from its own weights and activation."""
    activation = {"relu": torch.relu, "tanh": torch.tanh, "logistic": torch.sigmoid,
                  "identity": lambda v: v}[classifier.activation]
    weights = [(torch.from_numpy(w), torch.from_numpy(b))
               for w, b in zip(classifier.coefs_, classifier.intercepts_)]
    for w, b in weights[:-1]:
        x = activation(x @ w + b)
    return x @ weights[-1][0] + weights[-1][1]


@pytest.mark.parametrize("activation", ["relu", "tanh", "logistic"])
def test_sklearn_mlp_saliency_matches_autograd_of_its_scores(activation, tmp_path):
    classifier, x = mlp(activation)
    assert_dynamic_batch(sklearn_converter.export(classifier, tmp_path / "mlp.onnx"))
    inputs = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    scores = mlp_scores(classifier, inputs)
    assert_close(torch.softmax(scores, 1).detach(), classifier.predict_proba(x),
                 "sklearn: rebuilt MLP vs predict_proba", where=activation)
    target = np.arange(len(x)) % 4
    logits, attribution = explain(str(tmp_path / "mlp.onnx"), x, target)
    scores[torch.arange(len(x)), torch.from_numpy(target)].sum().backward()
    assert attribution.shape == x.shape  # one value per feature
    assert_close(logits, scores.detach(), "sklearn converter: logits vs MLP scores",
                 where=activation)
    assert_close(attribution, inputs.grad, "sklearn converter vs torch autograd (MLP)",
                 where=activation)


def test_sklearn_refuses_binary_and_unfitted_classifiers():
    from sklearn.neural_network import MLPClassifier

    with pytest.raises(ValueError, match="not fitted"):
        sklearn_converter.export(MLPClassifier())
    binary = fit_quietly(MLPClassifier((4,), max_iter=5), np.eye(4), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="multi-class"):
        sklearn_converter.export(binary)


# -- errors --------------------------------------------------------------------------------------
def test_wrong_objects_are_type_errors():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        pytorch_converter.export(np.zeros(3), None)
    with pytest.raises(TypeError, match="MLPClassifier"):
        sklearn_converter.export(nn.Linear(2, 2))


@converters
def test_wrong_objects_are_type_errors_keras_and_jax():
    with pytest.raises(TypeError, match="keras.Model"):
        keras_converter.export(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="JAX function"):
        jax_converter.export(np.zeros(3), (3,))


@pytest.mark.parametrize("convert, missing, install", [
    (lambda: pytorch_converter.export(object(), None), "torch", "pip install 'rectonnx[torch]'"),
    (lambda: keras_converter.export(object()), "keras", "pip install 'rectonnx[keras]'"),
    (lambda: jax_converter.export(object(), (3,)), "jax2onnx", "--no-deps jax2onnx==0.17.1"),
    (lambda: sklearn_converter.export(object()), "skl2onnx", "pip install 'rectonnx[sklearn]'"),
])
def test_missing_framework_says_what_to_install(monkeypatch, convert, missing, install):
    monkeypatch.setitem(sys.modules, missing, None)  # ``import missing`` now fails
    with pytest.raises(ImportError, match=re.escape(install)):
        convert()
