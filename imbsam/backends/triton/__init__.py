"""The Triton backend: kernels, their address tables, the ops, and the availability probe."""
