"""Triton kernels for vorta_ops (imported lazily; triton is optional)."""
