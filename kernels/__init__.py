"""Fused kernels (Triton, optional CUDA), each beside a plain-PyTorch reference.

Installed as ``megapt.kernels``.
"""
