"""Triton kernels of infoscale-triton (installed as ``infoscale_triton.kernels``)."""
