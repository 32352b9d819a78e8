"""zsharp: ZSharp and the SAM family for PyTorch, and a pipeline that reproduces the paper."""

__version__ = "0.1.0"
