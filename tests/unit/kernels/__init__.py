"""Kernel tests: Triton kernels against their PyTorch references (CPU: TRITON_INTERPRET=1)."""
