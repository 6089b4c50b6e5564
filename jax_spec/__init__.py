"""jax-spec: MTP transformers, speculative decoding and RLE regression in JAX."""
