"""rectonnx: any ONNX image classifier in, one ONNX graph out that returns the class scores and a
Rectified Gradient (or plain gradient-method) attribution map, computed by an explicit backward
subgraph in standard ONNX operators.

    >>> import rectonnx
    >>> explainer_graph = rectonnx.rewrite("model.onnx", method="rectgrad", q=98.0)
    >>> explainer = rectonnx.Explainer("model.onnx", method="rectgrad")
    >>> result = explainer.explain(batch)          # result.attribution, result.logits
"""

from .errors import InputError, InvalidModelError, RectonnxError, UnsupportedModelError
from .methods import METHOD_NAMES, Method, get_method
from .rewrite import rewrite

__version__ = "0.1.0"

__all__ = ["rewrite", "Explainer", "Explanation", "METHOD_NAMES", "Method", "get_method",
           "RectonnxError", "InvalidModelError", "UnsupportedModelError", "InputError"]


def __getattr__(name):  # the runtime (onnxruntime) is imported only when asked for
    if name in ("Explainer", "Explanation"):
        from . import runtime
        return getattr(runtime, name)
    raise AttributeError(name)
