"""benchmarks/mobile_profile.py: node categories and a profile of a small explainer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import rectonnx

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def mobile_profile():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import mobile_profile
        yield mobile_profile
    finally:
        while str(BENCHMARKS) in sys.path:
            sys.path.remove(str(BENCHMARKS))


def test_categories_follow_the_builder_scopes(mobile_profile):
    forward = {"/blocks/blocks.1/expand/expand.2/Clip"}
    cases = {
        ("/blocks/blocks.1/expand/expand.2/Clip", "Clip"): "forward",
        ("/blocks/blocks.1/expand/expand.2/Clip_output_0_nchwc", "Conv"): "forward",
        ("grad//blocks/blocks.1/expand/expand.2/Clip/top_node", "TopK"): "threshold",
        ("grad//blocks/blocks.1/expand/expand.2/Clip/chosen_blocks_node", "TopK"): "threshold",
        ("grad//blocks/blocks.1/expand/expand.2/Clip/candidates_node_41", "Reshape"):
            "threshold",
        ("grad//blocks/blocks.1/expand/expand.2/Clip/importance_node", "Mul"): "threshold",
        ("grad//blocks/blocks.1/expand/expand.2/Clip/greater_node_45", "Greater"): "gate",
        ("grad//blocks/blocks.1/expand/expand.2/Clip/rectgrad_node", "Mul"): "gate",
        ("grad//blocks/blocks.1/depthwise/depthwise.0/Conv/keep_inside_node", "And"): "gate",
        ("grad//blocks/blocks.1/depthwise/depthwise.1/Conv/dx_node", "ConvTranspose"):
            "backward",
        ("grad//blocks/blocks.1/project/project.0/Conv/dx_nchwc", "Conv"): "backward",
        ("ReorderOutput_token_12", "ReorderOutput"): "layout",
        ("Cast_709", "Cast"): "gate",
    }
    for (name, op), expected in cases.items():
        assert mobile_profile.category(name, op, forward) == expected, name


def test_profile_of_the_paper_cnn_explainer(mobile_profile):
    from rectonnx import models

    model = onnx.load(str(models.path(models.PAPER_CNN)))
    graph = rectonnx.rewrite(model, "rectgrad")
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    feeds = mobile_profile.feeds_for(graph, x)
    result = mobile_profile.profile(graph, feeds, runs=2, warmup=1,
                                    forward_names={n.name for n in model.graph.node})
    summary = mobile_profile.summarise(result)
    assert summary["categories"].get("threshold", 0) > 0
    assert summary["categories"].get("forward", 0) > 0
    assert summary["categories"].get("backward", 0) > 0
    assert "TopK" in summary["ops"]
    report = {"when": "now", "onnxruntime": "x", "runs": 2, "load_before": 0.0,
              "load_after": 0.0, "batches": {2: {"rectgrad": {**result, "summary": summary}}}}
    table = mobile_profile.markdown(report, top=5)
    assert "## Batch 2" in table and "threshold/TopK" in table
