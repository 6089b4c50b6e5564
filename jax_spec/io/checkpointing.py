"""Orbax checkpoints with an announced fall-back over corrupt ones, and a preemption flag.

Layout: `directory/<step>/{state, meta}`: `state` is any pytree of arrays (params, optimizer state,
loss scale, step, rng, ...) saved with `StandardSave`; `meta` is an optional JSON dict. Orbax
writes each step into a temporary directory and renames it when complete, so a process killed
mid-save leaves either the previous checkpoints or a complete new one, never a half-written step
that is listed as valid.

Restoring tries the newest step first. If it fails (files damaged, tree or shapes incompatible
with `abstract_state`), it logs a warning naming that step and tries the previous one. If every
step fails it raises `CheckpointRestoreError`: existing checkpoints are never silently ignored,
so a run never restarts from scratch over them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

_STATE = 'state'
_META = 'meta'


class CheckpointRestoreError(RuntimeError):
  """Checkpoints exist but none of them can be restored into the requested state."""


def _check_compatible(restored: Any, abstract_state: Any) -> None:
  """Raises ValueError when tree structure, shapes or dtypes differ from `abstract_state`."""
  r_leaves, r_tree = jax.tree_util.tree_flatten(restored)
  a_leaves, a_tree = jax.tree_util.tree_flatten(abstract_state)
  if r_tree != a_tree:
    raise ValueError(f'tree structure differs: checkpoint {r_tree} vs expected {a_tree}')
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract_state)[0]]
  for path, r, a in zip(paths, r_leaves, a_leaves):
    r_shape, a_shape = tuple(np.shape(r)), tuple(a.shape)
    if r_shape != a_shape:
      raise ValueError(f'{path}: checkpoint shape {r_shape} != expected {a_shape}')
    if np.dtype(r.dtype) != np.dtype(a.dtype):
      raise ValueError(f'{path}: checkpoint dtype {r.dtype} != expected {a.dtype}')


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (keeping shardings) for a pytree of arrays or of ShapeDtypeStructs."""
  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    sharding = getattr(x, 'sharding', None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
  return jax.tree.map(one, tree)


class _DropReadOnlyWarning(logging.Filter):
  def filter(self, record):
    return not record.getMessage().startswith('Given directory is read only')


@contextlib.contextmanager
def _without_read_only_warning():
  absl_logger = logging.getLogger('absl')
  drop = _DropReadOnlyWarning()
  absl_logger.addFilter(drop)
  try:
    yield
  finally:
    absl_logger.removeFilter(drop)


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with a safe `restore_latest`.

  Args:
    directory: where step directories live (created if needed).
    max_to_keep: keep the newest K checkpoints (older ones are deleted after a save).
    save_interval_steps: `save(step)` without `force` only writes when `step % N == 0`.
    async_save: let saves overlap training (call `wait()` or `close()` before exiting).
    read_only: only restore (never writes or deletes anything).
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
               async_save: bool = False, read_only: bool = False):
    if not isinstance(max_to_keep, int) or max_to_keep < 1:
      raise ValueError(f'max_to_keep must be an int >= 1, got {max_to_keep!r}')
    if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
      raise ValueError(f'save_interval_steps must be an int >= 1, got {save_interval_steps!r}')
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_interval_steps = save_interval_steps
    options = ocp.CheckpointManagerOptions(
        # Read-only: the values orbax would otherwise replace, each with a warning.
        max_to_keep=None if read_only else max_to_keep,
        # The interval is applied in save() so force/non-force is explicit.
        save_interval_steps=0 if read_only else 1,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save,
    )
    with _without_read_only_warning():  # reading a run's checkpoint is not worth a warning
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=(_STATE, _META))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, force: bool = False,
           metadata: dict[str, Any] | None = None) -> bool:
    """Saves `state` at `step` if `force` or `step` is a multiple of the interval.

    Returns whether a checkpoint was written. Saving a step that already exists is a no-op.
    """
    step = int(step)
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}')
    if not force and step % self.save_interval_steps:
      return False
    if step in self._manager.all_steps():
      return False
    items = {_STATE: ocp.args.StandardSave(state)}
    if metadata is not None:
      items[_META] = ocp.args.JsonSave(metadata)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    return bool(saved)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores one step into the structure/shapes/shardings of `abstract_state`."""
    abstract = _abstract(abstract_state)
    restored = self._manager.restore(
        int(step), args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)}))
    state = restored[_STATE]
    _check_compatible(state, abstract)
    return state

  def restore_partial(self, step: int | None, abstract_subtree: Any) -> tuple[int, Any]:
    """Restores only the leaves named by `abstract_subtree` (e.g. `{'params': ...}` of the
    saved state), reading nothing else; `step` None is the latest. Returns `(step, subtree)`."""
    if step is None:
      step = self.latest_step()
      if step is None:
        raise ValueError(f'{self.directory} has no checkpoint')
    abstract = _abstract(abstract_subtree)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    with ocp.PyTreeCheckpointer() as reader:
      subtree = reader.restore(
          os.path.join(self.directory, str(int(step)), _STATE),
          args=ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True))
    _check_compatible(subtree, abstract)
    return int(step), subtree

  def restore_metadata(self, step: int) -> dict[str, Any] | None:
    try:
      restored = self._manager.restore(
          int(step), args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
    except Exception:  # pylint: disable=broad-except
      return None
    return restored[_META]

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any] | None:
    """Restores the newest restorable checkpoint; None only if there are no checkpoints.

    A failing step is logged (warning naming the step and the error) and skipped; if all fail
    `CheckpointRestoreError` lists every step and why.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      if _has_step_like_entries(self.directory):
        raise CheckpointRestoreError(
            f'{self.directory} contains checkpoint-like entries but no complete checkpoint; '
            'refusing to start from scratch over them (delete the directory to start over).')
      return None
    errors = []
    for step in steps:
      try:
        state = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        msg = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
        log.warning('Checkpoint at step %d in %s cannot be restored (%s); trying an older one.',
                    step, self.directory, msg)
        errors.append((step, msg))
        continue
      if errors:
        log.warning('Restored step %d after skipping unreadable step(s) %s.',
                    step, [s for s, _ in errors])
      return step, state
    detail = '; '.join(f'step {s}: {m}' for s, m in errors)
    raise CheckpointRestoreError(
        f'None of the checkpoints in {self.directory} could be restored ({detail}). They may be '
        'corrupt or from a different configuration; refusing to start from scratch over them. '
        'Use a fresh --workdir or delete the checkpoints to start over.')

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _has_step_like_entries(directory: str) -> bool:
  """A step directory orbax does not list (temporary directories of an interrupted save,
  which orbax deletes on the next save, do not count)."""
  if not os.path.isdir(directory):
    return False
  for name in os.listdir(directory):
    if '.orbax-checkpoint-tmp' in name:
      continue
    if name.split('.')[0].isdigit():
      return True
  return False


class PreemptionHandler:
  """Turns SIGTERM / SIGINT into a flag the training loop polls to save and exit cleanly.

  Use as a context manager around the loop; it restores the previous handlers on exit. A second
  Ctrl-C while a request is pending raises KeyboardInterrupt right away (an escape hatch if the
  final save hangs). Handlers can only be installed from the main thread; elsewhere it is inert.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.signals = tuple(signals)
    self.requested = False
    self.signal_name: str | None = None
    self._previous = {}

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    self.signal_name = signal.Signals(signum).name
    log.warning('Received %s: will save a checkpoint and stop after the current step.',
                self.signal_name)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}
