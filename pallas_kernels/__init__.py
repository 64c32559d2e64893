"""Pallas kernels for structured (butterfly and unitary) matmuls, each beside its pure-JAX reference."""
