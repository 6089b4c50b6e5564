"""Process-level settings and checks for the experiments.

`configure_xla_cpu` (call before JAX's first computation): 
XLA:CPU (jaxlib 0.10) sends multi-row matmuls to its YNNPACK fusion, which on this repo's 2-core
benchmark machine is 1.3-1.6x slower than XLA's Eigen path for the few-row matmuls of
speculative verification (T = 4..16 query tokens), and no faster for training
(docs/benchmarks.md, "Speculative decoding"). The experiments opt out; library code does not
touch global flags. `decode_precision` resolves the decoding precision; `count_compiles` guards
timed loops against compiles.
"""
from __future__ import annotations

import contextlib
import os

import jax

CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=',)


def configure_xla_cpu(flags=CPU_FLAGS) -> str:
  """Appends `flags` to `XLA_FLAGS` (unless the user already set that flag); returns XLA_FLAGS.

  XLA parses the variable when JAX creates its CPU client, so this only has an effect before the
  first computation of the process.
  """
  current = os.environ.get('XLA_FLAGS', '')
  for flag in flags:
    name = flag.split('=', 1)[0]
    if name not in current:
      current = f'{current} {flag}'.strip()
  os.environ['XLA_FLAGS'] = current
  return current


def decode_precision(requested: str) -> str:
  """'auto' decodes in fp32 on every backend.

  On CPU for speed (XLA:CPU emulates bf16/fp16 matmuls: a one-token bf16 step of the small preset
  takes 2x the fp32 one). On GPUs for exactness: a T-token verify forward and a one-token decode
  step run differently shaped (differently tiled) bf16 matmuls whose bf16-rounded activations
  differ in the last bit, which flips greedy near-ties, so speculative greedy output can drift from
  plain decoding (measured on an H200: docs/benchmarks.md); fp32 keeps those differences at the
  level of fp32 accumulation order.
  """
  if requested != 'auto':
    return requested
  return 'fp32'


_BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


@contextlib.contextmanager
def count_compiles():
  """Counts XLA backend compilations inside the block (`with count_compiles() as n: ...; n[0]`).

  Benchmarks wrap their timed loops in it: a compile there (a retrace, or a cache miss on a new
  argument placement) would be timed as decoding; they report the count and warn.
  """
  count = [0]

  def listener(event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == _BACKEND_COMPILE_EVENT:
      count[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield count
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
