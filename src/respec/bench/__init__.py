"""Benchmarks (``respec bench``), the speculation headroom bound and the exactness audit."""
