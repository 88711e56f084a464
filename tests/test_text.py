"""Token-input classifiers (issue 15): attribution at the embedding output, reduced per token.

Two models with random weights, exported with ``torch.onnx.export(dynamo=False)``, opset 17:
an ``nn.TransformerEncoder`` classifier (token and position embeddings, two GELU encoder
layers, mean pool, linear; the tracer fixes its sequence length, so only the batch is dynamic)
and ``transformers``' ``BertForSequenceClassification`` (dynamic batch and sequence, with an
attention mask). Oracles: torch autograd in float64 at the embedding output (a forward hook)
and Captum's ``LayerGradientXActivation`` on BERT's word embeddings.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import rectonnx  # noqa: E402
from rectonnx.errors import InputError  # noqa: E402
from rectonnx.options import OptionError  # noqa: E402

from helpers import assert_close  # noqa: E402

CPU = ["CPUExecutionProvider"]
T = 7


class TextClassifier(torch.nn.Module):
    def __init__(self, vocab=50, d=16, classes=3, max_len=32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(max_len, d)
        layer = torch.nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, activation="gelu",
                                                 batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, classes)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.head(self.encoder(self.embed(ids) + self.pos(positions)).mean(1))


class BertLogits(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).logits


def _export(module, args, path, names, dynamic):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17,
                          input_names=names, output_names=["logits"], dynamic_axes=dynamic)
    return path


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    torch.manual_seed(0)
    module = TextClassifier().eval()
    ids = torch.randint(0, 50, (2, T))
    path = _export(module, (ids,), tmp_path_factory.mktemp("enc") / "encoder.onnx", ["ids"],
                   {"ids": {0: "N"}, "logits": {0: "N"}})
    return module, path


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    module = BertLogits(BertForSequenceClassification(config).eval()).eval()
    ids = torch.randint(0, 100, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    axes = {0: "N", 1: "T"}
    path = _export(module, (ids, mask), tmp_path_factory.mktemp("bert") / "bert.onnx",
                   ["input_ids", "attention_mask"],
                   {"input_ids": axes, "attention_mask": axes, "logits": {0: "N"}})
    return module, path


def embedding_gradient(module, embedding, target, *args):
    """Float64 ``(e, dS/de)`` at the output of module ``embedding`` (a path in ``module``)."""
    double = copy.deepcopy(module).double()
    layer = double.get_submodule(embedding)
    seen = {}

    def hook(_, __, output):
        output.retain_grad()
        seen["e"] = output

    handle = layer.register_forward_hook(hook)
    try:
        logits = double(*[torch.as_tensor(a) for a in args])
        logits[torch.arange(len(target)), torch.as_tensor(target)].sum().backward()
    finally:
        handle.remove()
    return seen["e"].detach().numpy(), seen["e"].grad.numpy()


def run(path, method, ids, target, **options):
    others = options.pop("inputs", {})
    explainer = rectonnx.Explainer(path, method, providers=CPU, **options)
    return explainer.explain(ids, target, **others).attribution


def test_encoder_gradients_at_the_embedding_match_torch(encoder):
    module, path = encoder
    rng = np.random.default_rng(0)
    ids, target = rng.integers(0, 50, (3, T)), np.array([0, 2, 1])
    e, grad = embedding_gradient(module, "embed", target, ids)
    full = run(path, "saliency", ids, target, token_reduction="none")
    assert full.shape == (3, T, 16)
    assert_close(full, grad, "torch autograd (token embedding)", where="encoder saliency")
    assert_close(run(path, "saliency", ids, target), np.linalg.norm(grad, axis=-1),
                 "torch autograd (token embedding)", where="encoder saliency norm")
    assert_close(run(path, "grad_input", ids, target), (e * grad).sum(-1),
                 "torch autograd (token embedding)", where="encoder grad_input sum")
    assert_close(run(path, "grad_input", ids, target, token_reduction="norm"),
                 np.linalg.norm(e * grad, axis=-1), "torch autograd (token embedding)",
                 where="encoder grad_input norm")


def test_bert_matches_captum_on_the_word_embeddings(bert):
    from captum.attr import LayerGradientXActivation

    module, path = bert
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 100, (3, 9))           # another length than the export's
    mask = np.ones((3, 9), np.int64)
    mask[0, 6:] = 0                              # padding
    target = np.array([1, 0, 1])
    double = copy.deepcopy(module).double()
    layer = double.bert.bert.embeddings.word_embeddings
    tensors = (torch.as_tensor(ids), torch.as_tensor(mask))
    expected = LayerGradientXActivation(double, layer).attribute(
        tensors[0], target=target.tolist(), additional_forward_args=(tensors[1],)).detach().numpy()
    gradient = LayerGradientXActivation(double, layer, multiply_by_inputs=False).attribute(
        tensors[0], target=target.tolist(), additional_forward_args=(tensors[1],)).detach().numpy()
    got = run(path, "grad_input", ids, target, token_reduction="none",
              inputs={"attention_mask": mask})
    assert_close(got, expected, "Captum LayerGradientXActivation (BERT)", where="grad_input")
    assert_close(run(path, "grad_input", ids, target, inputs={"attention_mask": mask}),
                 expected.sum(-1), "Captum LayerGradientXActivation (BERT)", where="sum")
    assert_close(run(path, "saliency", ids, target, inputs={"attention_mask": mask}),
                 np.linalg.norm(gradient, axis=-1), "Captum LayerGradientXActivation (BERT)",
                 where="saliency norm")
    # RectGrad with a threshold nothing falls under: relu(e dS/de) summed per token
    assert_close(run(path, "rectgrad", ids, target, tau=-1e30, inputs={"attention_mask": mask}),
                 np.maximum(expected, 0).sum(-1), "Captum LayerGradientXActivation (BERT)",
                 where="rectgrad tau=-inf")
    # the same through a tokenizer-style dict
    explainer = rectonnx.Explainer(path, "grad_input", providers=CPU)
    result = explainer.explain({"input_ids": ids, "attention_mask": mask}, target)
    assert_close(result.attribution, expected.sum(-1), "Captum LayerGradientXActivation (BERT)",
                 where="dict batch")


def test_rectgrad_runs_and_reduces_to_rectified_gradient_times_input(encoder, bert):
    module, path = encoder
    rng = np.random.default_rng(2)
    ids, target = rng.integers(0, 50, (3, T)), np.array([1, 1, 0])
    maps = run(path, "rectgrad", ids, target)
    assert maps.shape == (3, T) and np.isfinite(maps).all() and (maps >= 0).all()
    assert maps.max() > 0
    # a threshold nothing falls under: every gate passes, so the map is relu(e dS/de) summed
    e, grad = embedding_gradient(module, "embed", target, ids)
    assert_close(run(path, "rectgrad", ids, target, tau=-1e30),
                 np.maximum(e * grad, 0).sum(-1), "torch autograd (token embedding)",
                 where="rectgrad tau=-inf")
    bert_module, bert_path = bert
    mask = np.ones((2, 5), np.int64)
    maps = run(bert_path, "rectgrad", rng.integers(0, 100, (2, 5)), None,
               inputs={"attention_mask": mask})
    assert maps.shape == (2, 5) and np.isfinite(maps).all() and (maps >= 0).all()


def test_the_token_input_is_found_and_other_inputs_stay_inputs(bert, tmp_path):
    module, _ = bert
    ids = torch.randint(0, 100, (2, T))
    ones = torch.ones(2, T, dtype=torch.long)
    axes = {0: "N", 1: "T"}
    path = _export(module, (ids, ones, torch.zeros_like(ids)), tmp_path / "three.onnx",
                   ["input_ids", "attention_mask", "token_type_ids"],
                   {"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                    "logits": {0: "N"}})
    graph = rectonnx.rewrite(path, "saliency")
    names = [i.name for i in graph.graph.input]
    assert names[:2] == ["input_ids", "target"]
    assert set(names[2:]) == {"attention_mask", "token_type_ids"}
    explainer = rectonnx.Explainer.from_graph(graph, providers=CPU)
    assert explainer.token_input and set(explainer.other_inputs) == set(names[2:])
    with pytest.raises(InputError, match="token_type_ids"):
        explainer.explain(ids.numpy(), attention_mask=ones.numpy())
    with pytest.raises(InputError, match="integer token ids"):
        explainer.explain(ids.numpy().astype(np.float32), attention_mask=ones.numpy(),
                          token_type_ids=ones.numpy())
    # token type ids are attributed when named (their own 2-row table)
    other = rectonnx.rewrite(path, "saliency", input_name="token_type_ids")
    assert [i.name for i in other.graph.input][:2] == ["token_type_ids", "target"]
    from rectonnx.info import coverage

    report, problem = coverage(path)
    assert problem is None
    assert "input_ids: tokens" in report and "word_embeddings/Gather" in report
    assert "attention_mask: not attributed" in report


def test_wrt_names_the_embedding_or_a_later_tensor(encoder):
    module, path = encoder
    from rectonnx.normalize import normalize

    norm = normalize(str(path))
    rng = np.random.default_rng(3)
    ids, target = rng.integers(0, 50, (2, T)), np.array([0, 1])
    default = run(path, "saliency", ids, target)
    assert_close(run(path, "saliency", ids, target, wrt=norm.embedding), default,
                 "same graph", tol=0)
    # the sum of token and position embeddings: the same gradient (d(e + p)/de = 1)
    summed = next(n.output[0] for n in norm.path_nodes if n.op_type == "Add"
                  and norm.embedding in n.input)
    assert_close(run(path, "saliency", ids, target, wrt=summed), default, "same graph",
                 tol=1e-6)


def test_integrated_gradients_matches_captum_on_the_embeddings(encoder, bert):
    """Captum's LayerIntegratedGradients on the embedding layer, baseline ids all 0: rectonnx
    with the baseline embedding ``table[0]`` at every position (the attention mask is repeated
    per copy)."""
    from captum.attr import LayerIntegratedGradients

    rng = np.random.default_rng(4)
    module, path = bert
    ids = rng.integers(1, 100, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, 5:] = 0
    target = np.array([1, 0, 1])
    double = copy.deepcopy(module).double()
    layer = double.bert.bert.embeddings.word_embeddings
    expected = LayerIntegratedGradients(double, layer).attribute(
        torch.as_tensor(ids), baselines=torch.zeros_like(torch.as_tensor(ids)),
        target=target.tolist(), additional_forward_args=(torch.as_tensor(mask),),
        n_steps=12, method="riemann_right").detach().numpy()
    baseline = layer.weight[0].detach().numpy().astype(np.float32)  # broadcasts to [T, D]
    got = run(path, "integrated_gradients", ids, target, steps=12, baseline=baseline,
              token_reduction="none", inputs={"attention_mask": mask})
    assert_close(got, expected, "Captum LayerIntegratedGradients (BERT)", where="[N, T, D]")
    assert_close(run(path, "integrated_gradients", ids, target, steps=12, baseline=baseline,
                     inputs={"attention_mask": mask}), expected.sum(-1),
                 "Captum LayerIntegratedGradients (BERT)", where="per token sum")
    # the encoder (positions from Shape(ids), fixed length), baseline embedding 0 (default)
    module, path = encoder
    ids, target = rng.integers(0, 50, (2, T)), np.array([2, 0])
    double = copy.deepcopy(module).double()
    zero_row = torch.nn.Embedding(51, 16).double()  # Captum needs baseline ids: a row of 0s
    with torch.no_grad():
        zero_row.weight[:50] = double.embed.weight
        zero_row.weight[50] = 0
    double.embed = zero_row
    expected = LayerIntegratedGradients(double, double.embed).attribute(
        torch.as_tensor(ids), baselines=torch.full((2, T), 50), target=target.tolist(),
        n_steps=12, method="gausslegendre").detach().numpy()
    got = run(path, "integrated_gradients", ids, target, steps=12,
              integration="gausslegendre")
    assert_close(got, expected.sum(-1), "Captum LayerIntegratedGradients (encoder)",
                 where="per token sum")


def test_deeplift_and_smoothgrad_run_on_token_ids(encoder, bert):
    """DeepLIFT's per-token map at the embeddings; SmoothGrad with sigma 0 is saliency."""
    module, path = encoder
    rng = np.random.default_rng(5)
    ids, target = rng.integers(0, 50, (3, T)), np.array([0, 1, 2])
    maps = run(path, "deeplift", ids, target)
    assert maps.shape == (3, T) and np.isfinite(maps).all() and np.abs(maps).max() > 0
    assert_close(run(path, "smoothgrad", ids, target, samples=3, sigma=0.0),
                 run(path, "saliency", ids, target), "saliency (sigma 0)", tol=1e-6)
    noisy = run(path, "smoothgrad", ids, target, samples=3, sigma=0.3)
    assert noisy.shape == (3, T) and not np.allclose(noisy, run(path, "saliency", ids, target))
    # BERT's length is symbolic: the noise has no shape to take
    with pytest.raises(ValueError, match="fixed sample shape"):
        rectonnx.rewrite(bert[1], "smoothgrad", samples=2)
    mask = np.ones((2, 6), np.int64)
    maps = run(bert[1], "deeplift", rng.integers(0, 100, (2, 6)), None,
               inputs={"attention_mask": mask})
    assert maps.shape == (2, 6) and np.isfinite(maps).all()


def test_maps_at_the_input_size_are_refused_for_token_ids(encoder):
    with pytest.raises(OptionError, match="spatial size"):
        rectonnx.rewrite(encoder[1], "gradcam")


def test_integer_inputs_without_an_embedding_are_their_values():
    """An integer input that only a Cast to float reads (no embedding table) is attributed at
    the Cast's output, as numbers (tests/test_integer_pixels.py); read otherwise, refused."""
    from onnx import parser

    model = parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N,4] x) => (float[N,3] y) {
            f = Cast<to = 1>(x)
            w = Constant<value = float[4,3] {1,2,3,4,5,6,7,8,9,10,11,12}>()
            y = MatMul(f, w)
        }""")
    saliency = run(model, "saliency", np.array([[1, 2, 3, 4]]), np.array([2]))
    np.testing.assert_array_equal(saliency, [[3, 6, 9, 12]])  # column 2 of w
    mixed = parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N,4] x) => (float[N,4] y) {
            s = Mul(x, x)
            y = Cast<to = 1>(s)
        }""")
    with pytest.raises(rectonnx.InvalidModelError, match="INT64; rectonnx explains float32"):
        rectonnx.rewrite(mixed, "saliency")


def _tokenizer(tmp_path, sentences):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(sentences, trainers.WordPieceTrainer(
        vocab_size=100, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                                                 ("[SEP]", tok.token_to_id("[SEP]"))])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return Tokenizer.from_file(str(path)), path


def test_cli_explains_texts_with_a_tokenizer(bert, tmp_path):
    from click.testing import CliRunner

    from rectonnx.cli import main

    sentences = ["the film was great fun", "a dull and boring plot", "great acting, weak end",
                 "I loved it", "not good <b>at all</b> & slow"]
    tok, tok_path = _tokenizer(tmp_path, sentences)
    assert tok.get_vocab_size() <= 100
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(sentences) + "\n\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["explain", str(bert[1]), str(texts), "--tokenizer",
                                       str(tok_path), "--out", str(out), "--method",
                                       "grad_input", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == sentences
    encodings = tok.encode_batch(sentences)
    for record, encoding in zip(records, encodings):
        assert record["tokens"] == encoding.tokens
        assert len(record["scores"]) == len(encoding.tokens)
    # the same scores as the Explainer on each text alone (no padding)
    explainer = rectonnx.Explainer(bert[1], "grad_input", providers=CPU)
    for record, encoding in zip(records, encodings):
        ids = np.array([encoding.ids])
        alone = explainer.explain(ids, attention_mask=np.ones_like(ids)).attribution[0]
        assert_close(record["scores"], alone, "batch vs alone (text)", tol=1e-4)
    page = (out / "tokens.html").read_text()
    assert page.count('class="text"') == len(sentences)
    assert "&lt;" in page and "&amp;" in page and "<b>" not in page     # escaped
    assert "http" not in page and "<script" not in page and "<link" not in page
    assert "rgb(255," in page and ",255)" in page
    # a method with copies (the path at the embeddings, the mask repeated) through the CLI
    result = CliRunner().invoke(main, ["explain", str(bert[1]), str(texts), "--tokenizer",
                                       str(tok_path), "--out", str(tmp_path / "ig"), "--method",
                                       "integrated_gradients", "--steps", "4", "--device",
                                       "cpu"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line)
               for line in (tmp_path / "ig" / "manifest.jsonl").read_text().splitlines()]
    explainer = rectonnx.Explainer(bert[1], "integrated_gradients", steps=4, providers=CPU)
    for record, encoding in zip(records, encodings):
        ids = np.array([encoding.ids])
        alone = explainer.explain(ids, attention_mask=np.ones_like(ids)).attribution[0]
        assert_close(record["scores"], alone, "batch vs alone (text, IG)", tol=1e-4)


def test_token_colours():
    from rectonnx.text import colour

    assert colour(0.0, 1.0) == "rgb(255,255,255)"
    assert colour(1.0, 1.0) == "rgb(255,0,0)"
    assert colour(-1.0, 1.0) == "rgb(0,0,255)"
    assert colour(0.5, 1.0) == "rgb(255,128,128)"
