"""Shampoo, SOAP and NG+ second-order optimizers for PyTorch, with inverse roots on CPU threads."""

from .ngplus import NGPlus
from .shampoo import Shampoo
from .soap import SOAP

__all__ = ["SOAP", "NGPlus", "Shampoo", "__version__"]

__version__ = "0.1.0"
