"""Pallas attention kernels (importable without jax_spec)."""
