"""A tiny graph builder, so backward rules read like the maths: ``g.ConvTranspose(dy, w, strides=s)``.

Every emitted tensor gets a unique name under a readable prefix (``grad/conv3/x``), constants
become initializers via ``g.const(array)``, and ``g.op`` returns the output name(s).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphBuilder:
    """Collects nodes and initializers; guarantees fresh names against a set of taken ones."""

    def __init__(self, taken_names: set[str]):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._taken = set(taken_names)
        self._scope = "grad"
        self._counter = itertools.count()

    # -- naming -----------------------------------------------------------------------------
    def scope(self, name: str) -> "GraphBuilder":
        """Set the prefix of the names emitted next (e.g. the forward node being differentiated)."""
        self._scope = name
        return self

    def fresh(self, hint: str) -> str:
        base = f"{self._scope}/{hint}" if self._scope else hint
        name = base
        while name in self._taken:
            name = f"{base}_{next(self._counter)}"
        self._taken.add(name)
        return name

    # -- emitting -----------------------------------------------------------------------------
    def const(self, value, hint: str = "const", dtype=None) -> str:
        """Add a constant initializer and return its name."""
        array = np.asarray(value, dtype=dtype)
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, *inputs: str | None, outputs: int | Sequence[str] = 1,
           hint: str | None = None, **attrs) -> str | tuple[str, ...]:
        """Emit one node; ``None`` inputs become omitted optional inputs."""
        hint = hint or op_type.lower()
        if isinstance(outputs, int):
            out_names = [self.fresh(hint) for _ in range(outputs)]
        else:
            out_names = list(outputs)
            self._taken.update(out_names)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        node = helper.make_node(op_type, ["" if i is None else i for i in inputs], out_names,
                                name=self.fresh(f"{hint}_node"), **attrs)
        self.nodes.append(node)
        return out_names[0] if len(out_names) == 1 else tuple(out_names)

    def __getattr__(self, op_type: str):
        if not op_type[:1].isupper():
            raise AttributeError(op_type)
        return lambda *inputs, **attrs: self.op(op_type, *inputs, **attrs)

    # -- small idioms used by many rules ------------------------------------------------------
    def ints(self, values: Sequence[int], hint: str = "ints") -> str:
        return self.const(np.asarray(list(values), dtype=np.int64), hint)

    def scalar(self, value: float, dtype=np.float32, hint: str = "scalar") -> str:
        return self.const(np.asarray(value, dtype=dtype), hint)

    def reshape_like(self, tensor: str, like: str, hint: str = "reshape") -> str:
        """``tensor`` reshaped to the (runtime) shape of ``like``."""
        return self.Reshape(tensor, self.Shape(like, hint="shape"), hint=hint)

    def zeros_like(self, like: str, hint: str = "zeros") -> str:
        return self.Mul(like, self.scalar(0.0), hint=hint)
