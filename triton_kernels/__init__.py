"""Triton kernels, installed as slimrate.triton_kernels; each launcher is named <op>_triton."""
