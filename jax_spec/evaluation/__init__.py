"""Measuring trained runs: draft-head accuracies, the speculative decoding benchmark, plots."""
