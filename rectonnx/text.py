"""Token models on text: tokenise, explain, and write per-token scores (``rectonnx explain
MODEL texts.txt --tokenizer tokenizer.json --out DIR``).

A token model takes integer ids; rewrite attributes at the output of its embedding Gather
and reduces the ``[N, T, D]`` attribution over ``D`` to one score per token (option
``token_reduction``; docs/maths.md, 'Token models'). This module reads one text per line,
encodes them with a ``tokenizers`` file (``Tokenizer.from_file``), feeds the model's other
inputs by their names (an input named like ``*mask*`` gets the attention mask, ``*type*`` or
``*segment*`` the token type ids, ``*position*`` the positions), and writes:

* ``manifest.jsonl``: per text, its line, tokens, per-token scores (padding dropped),
  target, predicted class and probabilities;
* ``tokens.html``: every text's tokens coloured by score (red positive, blue negative, white
  0; each text scaled by its largest ``|score|``), self-contained;
* ``run.json``: the explanation spec.

With ``token_reduction="none"`` the manifest's scores are the per-token sums over ``D`` and
``text_<i>.npy`` holds each text's ``[T, D]`` attribution.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError


@dataclass
class TextSummary:
    explained: int
    out_dir: Path

    def text(self) -> str:
        return (f"explained {self.explained} text(s): {self.out_dir / 'manifest.jsonl'}, "
                f"{self.out_dir / 'tokens.html'}")


def read_texts(paths: Sequence) -> list[str]:
    """One text per non-empty line of each file."""
    texts = []
    for path in paths:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read texts from {path}: {exc}") from None
        texts += [line for line in lines if line.strip()]
    if not texts:
        raise InputError("no texts: the files hold no non-empty lines")
    return texts


def load_tokenizer(path):
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover
        raise InputError("--tokenizer needs the tokenizers package (pip install tokenizers)") \
            from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise InputError(f"cannot load tokenizer {path}: {exc}") from None


def encode(tokenizer, texts: Sequence[str], input_name: str, other_inputs: Sequence[str],
           length: int | None = None) -> tuple[dict[str, np.ndarray], list[list[str]]]:
    """The feeds of ``texts`` (ids padded to the longest, or cut/padded to a fixed
    ``length``) and each text's tokens (no padding)."""
    encodings = tokenizer.encode_batch(list(texts))
    longest = max(len(e.ids) for e in encodings)
    width = length or max(longest, 1)
    padding = tokenizer.padding or {}
    pad_id = int(padding.get("pad_id", 0))
    ids = np.full((len(texts), width), pad_id, np.int64)
    mask = np.zeros((len(texts), width), np.int64)
    types = np.zeros((len(texts), width), np.int64)
    tokens = []
    for i, e in enumerate(encodings):
        n = min(len(e.ids), width)
        ids[i, :n], mask[i, :n], types[i, :n] = e.ids[:n], 1, e.type_ids[:n]
        tokens.append(list(e.tokens[:n]))
    feeds = {input_name: ids}
    for name in other_inputs:
        low = name.lower()
        if "mask" in low:
            feeds[name] = mask
        elif "type" in low or "segment" in low:
            feeds[name] = types
        elif "position" in low:
            feeds[name] = np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape).copy()
        else:
            raise InputError(f"the model has an input {name!r} that the text path cannot fill "
                             "(it knows *mask*, *type*/*segment* and *position* inputs)")
    return feeds, tokens


def colour(score: float, scale: float) -> str:
    """Red for positive, blue for negative, white for 0 (``|score| / scale`` the strength)."""
    a = 0.0 if scale <= 0 else min(abs(score) / scale, 1.0)
    fade = round(255 * (1 - a))
    return f"rgb(255,{fade},{fade})" if score > 0 else f"rgb({fade},{fade},255)" \
        if score < 0 else "rgb(255,255,255)"


def tokens_html(records: Sequence[dict], title: str = "rectonnx token attributions") -> str:
    """A self-contained page: one line of coloured tokens per record (``tokens``,
    ``scores``, ``target``)."""
    rows = []
    for record in records:
        scores = record["scores"]
        scale = max((abs(s) for s in scores), default=0.0)
        spans = "".join(
            f'<span class="t" style="background:{colour(s, scale)}" '
            f'title="{s:.4g}">{html.escape(t)}</span>' for t, s in zip(record["tokens"], scores))
        rows.append(f'<div class="text"><div class="meta">#{record["index"]} target '
                    f'{record["target"]}</div>{spans}</div>')
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em}"
            ".text{margin:0.6em 0;line-height:2}"
            ".meta{font-size:0.8em;color:#555}"
            ".t{padding:0.15em 0.2em;margin:0 0.1em;border:1px solid #ddd;border-radius:3px}"
            "</style></head><body>"
            f"<h1>{html.escape(title)}</h1>\n" + "\n".join(rows) + "\n</body></html>\n")


def explain_texts(model, sources: Sequence, out_dir, *, tokenizer, method=None,
                  input_name: str | None = None, output_name: str | None = None,
                  target: int = -1, batch_size: int = 16, providers=None,
                  **options) -> TextSummary:
    """Explain every line of the text files ``sources`` with the token model ``model``."""
    from .runtime import Explainer

    texts = read_texts(sources)
    tok = load_tokenizer(tokenizer)
    explainer = Explainer(model, method, input_name=input_name, output_name=output_name,
                          providers=providers, batch_size=batch_size, **options)
    if not explainer.token_input:
        raise InputError(f"{model} does not take token ids (its input "
                         f"{explainer.input_name!r} is not integer): --tokenizer is for token "
                         "models")
    fixed = explainer.input_shape[1] if len(explainer.input_shape) == 2 else None
    feeds, tokens = encode(tok, texts, explainer.input_name, list(explainer.other_inputs),
                           fixed)
    result = explainer.explain(feeds, target)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    probabilities = result.probabilities
    for i, text in enumerate(texts):
        n = len(tokens[i])
        attribution = result.attribution[i, :n]
        if attribution.ndim == 2:  # token_reduction="none": [T, D]
            np.save(out / f"text_{i}.npy", attribution)
            attribution = attribution.sum(axis=-1)
        records.append({"index": i, "text": text, "tokens": tokens[i],
                        "scores": [float(s) for s in attribution],
                        "target": int(result.target[i]),
                        "predicted": int(result.predicted[i]),
                        "probabilities": [float(p) for p in probabilities[i]]})
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    (out / "tokens.html").write_text(tokens_html(records), encoding="utf-8")
    spec = explainer.spec.to_dict() if explainer.spec is not None else {}
    (out / "run.json").write_text(json.dumps({**spec, "model": str(model),
                                              "tokenizer": str(tokenizer)}, indent=1))
    return TextSummary(len(records), out)
