"""Shampoo and NG+ second-order optimizers for PyTorch."""

from .optimizer import Shampoo

__all__ = ["Shampoo", "__version__"]

__version__ = "0.1.0"
