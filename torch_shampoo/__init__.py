"""Shampoo and NG+ second-order optimizers for PyTorch."""

__version__ = "0.1.0"
