"""Metrics writer: one JSON object per logged step plus TensorBoard scalars.

`metrics.jsonl` is the machine-readable record (plots, tests, resume-equality checks read it);
TensorBoard is for people. Only process 0 of a multi-host run writes.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np


def _to_python(value: Any) -> Any:
  """Converts scalars (jax/numpy arrays, numpy numbers) into plain JSON-able Python values."""
  if isinstance(value, (bool, int, str)) or value is None:
    return value
  if isinstance(value, float):
    return value
  arr = np.asarray(value)
  if arr.ndim != 0:
    raise ValueError(f'metrics values must be scalars, got shape {arr.shape}')
  if arr.dtype == np.bool_:
    return bool(arr)
  if np.issubdtype(arr.dtype, np.integer):
    return int(arr)
  if np.issubdtype(arr.dtype, np.floating):
    return float(arr)
  raise ValueError(f'metrics values must be numbers, got dtype {arr.dtype}')


def _json_safe(value: Any) -> Any:
  # JSON has no NaN/inf; write them as strings so the file stays strict JSON.
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricsWriter:
  """Appends `{"step": step, **metrics}` lines to `workdir/metrics.jsonl` and TB scalars.

  Args:
    workdir: directory (created if needed).
    tensorboard: also write TensorBoard events into `workdir/tensorboard`.
    enabled: set False on non-zero processes of a multi-host run (writes become no-ops).
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
    if not isinstance(workdir, (str, os.PathLike)) or not str(workdir):
      raise ValueError(f'workdir must be a non-empty path, got {workdir!r}')
    self.workdir = os.fspath(workdir)
    self.path = os.path.join(self.workdir, 'metrics.jsonl')
    self.enabled = enabled
    self._tb = None
    self._file = None
    if not enabled:
      return
    os.makedirs(self.workdir, exist_ok=True)
    self._file = open(self.path, 'a', encoding='utf-8')
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(self.workdir, 'tensorboard'))

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Writes one line; returns the record as written (plain Python values)."""
    if not isinstance(metrics, Mapping):
      raise ValueError(f'metrics must be a mapping, got {type(metrics).__name__}')
    step = int(step)
    record = {'step': step}
    for key, value in metrics.items():
      if key == 'step':
        continue
      record[str(key)] = _to_python(value)
    if not self.enabled:
      return record
    line = json.dumps({k: _json_safe(v) for k, v in record.items()}, allow_nan=False)
    self._file.write(line + '\n')
    self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != 'step' and isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(key, value, step)
      self._tb.flush()
    return record

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Reads a metrics.jsonl file (or a workdir containing one) into a list of dicts."""
  if os.path.isdir(path):
    path = os.path.join(path, 'metrics.jsonl')
  if not os.path.exists(path):
    raise ValueError(f'path {path!r} has no metrics.jsonl')
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def latest_values(records: list[dict[str, Any]]) -> dict[str, Any]:
  """{metric: its value in the last of `records` (`read_metrics`) that logged it}."""
  latest: dict[str, Any] = {}
  for record in records:
    latest.update(record)
  return latest
