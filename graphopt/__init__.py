"""graphopt: ONNX graph rewriting whose every rewrite is validated with onnxruntime."""

from graphopt.api import OptimizeResult, accuracy, optimize
from graphopt.errors import PassError, UserError
from graphopt.model import load, save
from graphopt.validate import Budget

__all__ = ["Budget", "OptimizeResult", "PassError", "UserError", "accuracy", "load", "optimize", "save"]
__version__ = "0.1.0"
