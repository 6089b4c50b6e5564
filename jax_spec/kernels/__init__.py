"""Host (CPU) kernels called from JAX through XLA's FFI: `rows_matmul` (few-row fp32 matmuls)."""
