"""Process-level settings and checks for the experiments.

`configure_xla_cpu` (call before JAX's first computation):
XLA:CPU (jaxlib 0.10) sends multi-row matmuls to its YNNPACK fusion, which on this repo's 2-core
benchmark machine is 1.3-1.6x slower than XLA's Eigen path for the few-row matmuls of
speculative verification (T = 4..16 query tokens), and no faster for training
(docs/benchmarks.md, "Speculative decoding"). The experiments opt out; library code does not
touch global flags. `count_compiles` guards timed loops against compiles; `StepProfiler` writes a
`jax.profiler` trace of a range of steps (`--profile_steps=A:B`).
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


def parse_profile_steps(spec: str | None) -> tuple[int, int] | None:
  """'A:B' -> (A, B) with 0 <= A < B; None -> None. Raises ValueError naming the option."""
  if spec is None or spec == '':
    return None
  try:
    start, stop = (int(x) for x in str(spec).split(':'))
  except ValueError:
    start, stop = -1, -1
  if not 0 <= start < stop:
    raise ValueError(f'profile_steps must be "A:B" with integers 0 <= A < B, got {spec!r}')
  return start, stop


class StepProfiler:
  """A `jax.profiler` trace of steps `A <= i < B` into `log_dir` (TensorBoard / Perfetto).

  Call `step(i)` before running step i; use as a context manager so that a loop that ends or
  breaks early still stops the trace. Inert when `spec` is None. Open the trace with
  `tensorboard --logdir=<log_dir>` (Profile tab) or load `<log_dir>/plugins/profile/*/
  *.trace.json.gz` in https://ui.perfetto.dev.
  """

  def __init__(self, spec: str | None, log_dir: str):
    self.window = parse_profile_steps(spec)
    self.log_dir = log_dir
    self.trace_dir: str | None = None  # set once a trace was written
    self._active = False

  def step(self, i: int, wait_for=None) -> None:
    """Before step `i`: starts or stops the trace (after `wait_for`, the previous step's output,
    is computed, so that the trace holds the whole of the last traced step)."""
    if self.window is None:
      return
    start, stop = self.window
    if i == start and not self._active:
      jax.profiler.start_trace(self.log_dir)
      self._active = True
    elif i == stop and self._active:
      jax.block_until_ready(wait_for)
      self._stop()

  def _stop(self) -> None:
    jax.profiler.stop_trace()
    self._active = False
    self.trace_dir = self.log_dir

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self._active:
      self._stop()
