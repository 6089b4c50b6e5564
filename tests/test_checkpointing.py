"""Checkpointer (orbax) save/restore/fall-back, metrics writer, preemption flag."""
import glob
import json
import logging
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_spec.io import checkpointing
from jax_spec.io.checkpointing import Checkpointer, CheckpointRestoreError
from jax_spec.training.workdir import truncate_metrics
from jax_spec.io.metrics import MetricsWriter, read_metrics


def _state(v):
  return {'w': jnp.arange(4.0) + v, 'step': jnp.int32(v),
          'nested': {'m': jnp.full((2, 3), float(v), jnp.float32)}}


def _corrupt(directory, step):
  files = [f for f in glob.glob(os.path.join(directory, str(step), 'state', '**'), recursive=True)
           if os.path.isfile(f)]
  assert files
  for f in files:
    with open(f, 'wb') as fh:
      fh.write(b'not a checkpoint')


def test_save_interval_keep_and_restore(tmp_path):
  ckpt = Checkpointer(str(tmp_path / 'c'), max_to_keep=2, save_interval_steps=2)
  written = [ckpt.save(s, _state(s)) for s in range(1, 6)]
  assert written == [False, True, False, True, False]
  assert ckpt.save(5, _state(5), force=True, metadata={'note': 'final'})
  assert ckpt.all_steps() == [4, 5]  # keep the last 2
  step, state = ckpt.restore_latest(jax.eval_shape(lambda: _state(0)))
  assert step == 5
  np.testing.assert_array_equal(state['w'], np.arange(4.0) + 5)
  assert int(state['step']) == 5
  assert ckpt.restore_metadata(5) == {'note': 'final'}
  ckpt.close()


def test_no_checkpoints_returns_none(tmp_path):
  ckpt = Checkpointer(str(tmp_path / 'c'))
  assert ckpt.restore_latest(_state(0)) is None
  ckpt.close()


def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog):
  d = str(tmp_path / 'c')
  ckpt = Checkpointer(d, max_to_keep=3)
  for s in (1, 2, 3):
    ckpt.save(s, _state(s))
  ckpt.close()
  _corrupt(d, 3)
  ckpt = Checkpointer(d, max_to_keep=3)
  with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
    step, state = ckpt.restore_latest(_state(0))
  assert step == 2
  np.testing.assert_array_equal(state['nested']['m'], np.full((2, 3), 2.0))
  assert any('step 3' in r.getMessage() for r in caplog.records)
  ckpt.close()


def test_all_corrupt_raises_instead_of_starting_over(tmp_path):
  d = str(tmp_path / 'c')
  ckpt = Checkpointer(d)
  for s in (1, 2):
    ckpt.save(s, _state(s))
  ckpt.close()
  _corrupt(d, 1)
  _corrupt(d, 2)
  ckpt = Checkpointer(d)
  with pytest.raises(CheckpointRestoreError, match='step 2.*step 1'):
    ckpt.restore_latest(_state(0))
  ckpt.close()


def test_incompatible_state_raises(tmp_path):
  d = str(tmp_path / 'c')
  ckpt = Checkpointer(d)
  ckpt.save(1, _state(1))
  other = {'w': jnp.zeros(5), 'step': jnp.int32(0), 'nested': {'m': jnp.zeros((2, 3))}}
  with pytest.raises(CheckpointRestoreError, match='could be restored'):
    ckpt.restore_latest(other)
  ckpt.close()


def test_leftover_without_complete_checkpoint_raises(tmp_path):
  d = tmp_path / 'c'
  (d / '7').mkdir(parents=True)  # a step directory orbax does not recognise as complete
  (d / '7' / 'junk').write_text('x')
  ckpt = Checkpointer(str(d))
  with pytest.raises(CheckpointRestoreError, match='refusing'):
    ckpt.restore_latest(_state(0))
  ckpt.close()


def test_interrupted_first_save_is_not_a_checkpoint(tmp_path):
  d = tmp_path / 'c'
  (d / '4.orbax-checkpoint-tmp-1700000000').mkdir(parents=True)  # killed during its first save
  ckpt = Checkpointer(str(d))
  assert ckpt.restore_latest(_state(0)) is None
  assert ckpt.save(1, _state(1))
  assert ckpt.all_steps() == [1]
  assert not (d / '4.orbax-checkpoint-tmp-1700000000').exists()  # orbax cleaned it up
  ckpt.close()


def test_checkpointer_validates_arguments(tmp_path):
  with pytest.raises(ValueError, match='max_to_keep'):
    Checkpointer(str(tmp_path), max_to_keep=0)
  with pytest.raises(ValueError, match='save_interval_steps'):
    Checkpointer(str(tmp_path), save_interval_steps=0)


def test_metrics_writer_and_truncate(tmp_path):
  w = MetricsWriter(str(tmp_path))
  for s in (1, 2, 3):
    rec = w.write(s, {'loss': jnp.float32(1.0 / s), 'n': np.int32(s), 'bad': float('nan')})
  assert rec == {'step': 3, 'loss': np.float32(1 / 3).item(), 'n': 3, 'bad': rec['bad']}
  w.close()
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(l)['step'] for l in lines] == [1, 2, 3]
  assert json.loads(lines[0])['bad'] == 'nan'  # strict JSON
  assert glob.glob(str(tmp_path / 'tensorboard' / 'events.out.tfevents.*'))
  with pytest.raises(ValueError, match='scalars'):
    MetricsWriter(str(tmp_path), tensorboard=False).write(4, {'x': np.zeros(2)})
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 4, "lo')  # a line cut by a kill
  truncate_metrics(str(tmp_path), 2)
  assert [r['step'] for r in read_metrics(str(tmp_path))] == [1, 2]


def test_preemption_handler_sets_flag_and_restores():
  before = signal.getsignal(signal.SIGTERM)
  with checkpointing.PreemptionHandler() as p:
    assert not p.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert p.requested and p.signal_name == 'SIGTERM'
  assert signal.getsignal(signal.SIGTERM) is before
