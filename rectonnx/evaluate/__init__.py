"""The paper's quantitative evidence, reproducible on your data: ``rectonnx evaluate``.

    from rectonnx.evaluate import EvalConfig, run
    results = run(EvalConfig(out="report"))   # the default: the shipped paper CNN, 3 repeats
    results = run(EvalConfig(out="paper", cifar10="~/cifar").paper())  # the paper's protocol

experiments.py runs the experiments (training-dataset occlusion, noise level, ROAR/KAR, class
sensitivity, effect of q, noise accumulation), training.py trains the paper's CNN in PyTorch,
metrics.py holds the numbers, stats.py the intervals and paired tests, checks.py the sanity
check and deletion/insertion, report.py and evidence.py write the report directory (summary.md,
report.html, CSV/JSON, figures). Needs torch and, for the
default data, scikit-learn and scikit-image: the ``evaluate`` extra
(``pip install 'rectonnx[evaluate]'``); ``EvalConfig().quick()`` is a one-minute smoke run.
"""

from .experiments import (DEFAULT_METHODS, EXPERIMENTS, LOW_ACCURACY, EvalConfig,
                          LowAccuracyWarning, configure, method_specs, run)

__all__ = ["EvalConfig", "configure", "run", "method_specs", "DEFAULT_METHODS", "EXPERIMENTS",
           "LOW_ACCURACY", "LowAccuracyWarning"]
