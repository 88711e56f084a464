"""rectonnx: any ONNX image classifier in, one ONNX graph out that returns the class scores and a
Rectified Gradient (or plain gradient-method) attribution map, computed by an explicit backward
subgraph in standard ONNX operators.

    >>> import rectonnx
    >>> spec = rectonnx.ExplanationSpec("rectgrad", q=98.0)     # padding trick on by default
    >>> explainer_graph = rectonnx.rewrite("model.onnx", spec)
    >>> explainer = rectonnx.Explainer("model.onnx", spec)
    >>> result = explainer.explain(batch)          # result.attribution, result.logits
"""

__version__ = "0.1.0"  # before the imports: artifact.py stamps it into every graph

from .errors import InputError, InvalidModelError, RectonnxError, UnsupportedModelError
from .gates import Method
from .methods import METHOD_NAMES, METHODS
from .options import OptionError
from .rewrite import VanishingMapWarning, rewrite
from .spec import ExplanationSpec, get_method

__all__ = ["rewrite", "Explainer", "Explanation", "ExplanationSpec", "METHOD_NAMES", "METHODS",
           "Method", "get_method", "RectonnxError", "InvalidModelError", "UnsupportedModelError",
           "InputError", "OptionError", "VanishingMapWarning"]


def __getattr__(name):  # the runtime (onnxruntime) is imported only when asked for
    if name in ("Explainer", "Explanation"):
        from . import runtime
        return getattr(runtime, name)
    raise AttributeError(name)
