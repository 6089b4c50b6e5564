"""Attention implementations (importable without jax_spec): the Pallas kernels (flash attention
for GPU and TPU, decode attention), their plain-JAX blockwise twins and the materialized
reference, all on one geometry (`flash_attention_common`)."""
