"""The table of backward rules: one function per ONNX op type, registered with ``@rule``.

A rule receives the context, the forward node, the gradients of the node's outputs (None where an
output has no gradient) and the node's attributes by their ONNX names with the schema's defaults
filled in. It returns one gradient tensor name per node input, None where there is none.
Importing this package registers every rule.
"""

from .base import RULES, Activation, RuleContext, node_attributes, rule
from . import activation, linear, pool, shape  # noqa: F401  (registers the rules)
from . import (conv_transpose, elementwise, nonlinear, normalization, quantize,  # noqa: F401
               reduce, resize, slicing)

__all__ = ["RULES", "Activation", "RuleContext", "node_attributes", "rule"]
