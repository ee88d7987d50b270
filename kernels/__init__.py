"""Compute only, no I/O: transformer blocks with KV cache, client-side parts, 8-bit weights, weight loading."""
