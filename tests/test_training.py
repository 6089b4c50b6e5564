"""Training loop: precision parity, kill-and-resume equality, sharded run, flags, Medusa-1.

The subprocess tests share one tiny configuration and a persistent compilation cache, so only the
first run compiles; they are kept to a handful of steps on a tiny generated corpus.
"""
import dataclasses
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_spec import data as data_lib
from jax_spec.models import get_config
from jax_spec.training import loop, restore, sharding, steps, workdir as workdir_lib
from jax_spec.training import state as train_state
from jax_spec.training.config import TrainConfig, make_model_config
from jax_spec.io.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ('def return import class self for in if else while x y z ( ) : = + - 1 2 3 print '
         'None True False').split()


def _write_corpus(root, num_files=12, lines=40):
  rng = np.random.default_rng(0)
  os.makedirs(root, exist_ok=True)
  for i in range(num_files):
    text = '\n'.join(' '.join(rng.choice(WORDS, 8)) for _ in range(lines))
    with open(os.path.join(root, f'f{i:02d}.py'), 'w') as f:
      f.write(text + '\n')
  return root


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return _write_corpus(str(tmp_path_factory.mktemp('corpus')))


# ------------------------------------------------------------------------------------------------
# Flags / config validation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('override, match', [
    ({'config': 'huge'}, 'config must be one of'),
    ({'steps': 0}, 'steps'),
    ({'batch_size': -1}, 'batch_size'),
    ({'seq_len': 1}, 'seq_len'),
    ({'learning_rate': 0.0}, 'learning_rate'),
    ({'precision': 'fp8'}, 'precision'),
    ({'loss_scale': 'static'}, 'loss_scale'),
    ({'medusa_mode': 'both'}, 'medusa_mode'),
    ({'tokenizer': 'chars'}, 'tokenizer'),
    ({'tokenizer': 'bpe'}, 'vocab_size'),
    ({'mtp_depth': -1}, 'mtp_depth'),
    ({'mesh_data': 0}, 'mesh_data'),
    ({'num_processes': 2}, 'coordinator_address'),
    ({'process_id': 3}, 'process_id'),
    ({'minutes': -1.0}, 'minutes'),
    ({'data_path': '/no/such/path'}, 'data_path'),
])
def test_train_config_validation(tmp_path, override, match):
  with pytest.raises(ValueError, match=match):
    TrainConfig(workdir=str(tmp_path), **override)


def _usage_error(args):
  """(exit status, stderr lines) of experiments.train with `args`."""
  proc = subprocess.run([sys.executable, '-m', 'experiments.train', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  return proc.returncode, proc.stderr.strip().splitlines()


@pytest.mark.parametrize('args, message', [
    # A flag that does not parse (an enum).
    (['--precision=fp8'], 'flag --precision=fp8: value should be one of <bf16|fp16|fp32>'),
    # Values found invalid after parsing: the config's own message naming the field.
    (['--model.d_model=30'], 'd_model (30) must be divisible by num_heads'),
])
def test_cli_bad_value_is_a_one_line_usage_error(tmp_path, args, message):
  code, lines = _usage_error([f'--workdir={tmp_path}/w', *args])
  assert code == 2
  assert len(lines) == 1 and lines[0].startswith('experiments.train: error: '), lines
  assert message in lines[0]
  assert not os.path.exists(tmp_path / 'w')


# ------------------------------------------------------------------------------------------------
# In-process steps: precision parity and Medusa-1
# ------------------------------------------------------------------------------------------------

def _batch(batch_size, seq_len, vocab_size=259):
  tokens = np.random.default_rng(0).integers(0, vocab_size, (batch_size, seq_len)).astype(np.int32)
  return {'tokens': tokens, 'segment_ids': np.ones_like(tokens),
          'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape).copy()}


def _setup(precision_name, model_config, cfg, batch=None):
  cfg = dataclasses.replace(cfg, precision=precision_name)
  setup = train_state.create_train_state(cfg, model_config)
  step = jax.jit(train_state.make_step_fns(cfg, setup)[0])
  # Unoptimised XLA code compiles ~2x faster; these tests check logic and precision, not speed.
  return setup.state, train_state.compile_fast(step, setup.state,
                                               _batch(2, 16) if batch is None else batch)


def test_bf16_and_fp16_match_fp32_loss(corpus, tmp_path):
  n_steps, batch_size, seq_len = 40, 8, 32
  data = data_lib.load_data('byte', str(tmp_path), corpus)
  cfg = TrainConfig(workdir=str(tmp_path), config='tiny', steps=n_steps, warmup_steps=5,
                         learning_rate=3e-3, precision='fp32')
  mc = get_config('tiny', num_layers=1, mtp_depth=0, medusa_heads=0)
  batches = [data.get_batch(0, s, batch_size, seq_len) for s in range(n_steps)]
  final = {}
  for name in ('fp32', 'bf16', 'fp16'):
    state, step = _setup(name, mc, cfg, batches[0])
    losses = []
    for b in batches:
      state, m = step(state, b)
      losses.append(float(m['loss']))
    assert int(state['skipped_steps']) == 0, name
    final[name] = float(np.mean(losses[-5:]))
    first = losses[0]
  assert final['fp32'] < 0.8 * first  # it actually learned something
  for name in ('bf16', 'fp16'):
    assert abs(final[name] - final['fp32']) <= 0.02 * final['fp32'], final


def test_frozen_trunk_trains_only_the_heads(tmp_path):
  cfg = TrainConfig(workdir=str(tmp_path), config='tiny', steps=10, warmup_steps=0,
                         medusa_mode='frozen_trunk')
  mc = make_model_config(cfg, 259).replace(num_layers=1, mtp_depth=1, medusa_heads=1)
  assert mc.medusa_frozen_trunk
  state, step = _setup('fp32', mc, cfg)
  batch = _batch(2, 16)
  new, _ = step(state, batch)
  new, _ = step(new, batch)
  flat_old = dict(jax.tree_util.tree_flatten_with_path(state['params'])[0])
  changed = {sharding.path_to_str(p): not np.array_equal(x, flat_old[p])
             for p, x in jax.tree_util.tree_flatten_with_path(new['params'])[0]}
  heads = ('medusa/', 'mtp/')
  assert any(changed[k] for k in changed if k.startswith('medusa/'))
  assert any(changed[k] for k in changed if k.startswith('mtp/'))
  assert not any(changed[k] for k in changed if not k.startswith(heads)), changed


# ------------------------------------------------------------------------------------------------
# Subprocess runs: kill-and-resume, sharded
# ------------------------------------------------------------------------------------------------

# The runs start from a config file; flags given on the command line override it (steps) and a
# dotted flag overrides a TransformerConfig field (model.num_layers).
CONFIG_FILE_TEXT = """
def get_config():
  return {'config': 'tiny', 'mtp_depth': 0, 'medusa_heads': 1, 'steps': 100, 'batch_size': 8,
          'seq_len': 32, 'warmup_steps': 4, 'learning_rate': 3e-3, 'model': {'d_ff': 96}}
"""


@pytest.fixture(scope='module')
def config_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('configs') / 'run.py'
  path.write_text(CONFIG_FILE_TEXT)
  return str(path)


def _command(workdir, corpus, config_file, extra=()):
  return [sys.executable, '-m', 'experiments.train', f'--workdir={workdir}',
          f'--config={config_file}', '--steps=16', '--model.num_layers=1', '--log_every=1',
          '--eval_every=8', '--eval_batches=1', '--checkpoint_every=4', f'--data_path={corpus}',
          '--noprogress', *extra]


def _env(cache_dir, devices=None):
  env = dict(os.environ)
  env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['JAX_PLATFORMS'] = 'cpu'
  if devices:
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                        f' --xla_force_host_platform_device_count={devices}').strip()
  return env


def _deterministic(records):
  return [{k: v for k, v in r.items() if k not in loop.TIMING_KEYS} for r in records]


@pytest.fixture(scope='module')
def reference_run(corpus, config_file, tmp_path_factory):
  """An uninterrupted single-device run (also the baseline of the sharded test)."""
  root = tmp_path_factory.mktemp('runs')
  cache = str(root / 'jax_cache')
  workdir = str(root / 'reference')
  proc = subprocess.run(_command(workdir, corpus, config_file), cwd=REPO, env=_env(cache),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {'workdir': workdir, 'cache': cache, 'root': root, 'config_file': config_file,
          'summary': json.loads(proc.stdout.strip().splitlines()[-1])}


def test_reference_run_outputs(reference_run):
  workdir = reference_run['workdir']
  records = read_metrics(workdir)
  assert [r['step'] for r in records] == list(range(1, 17))
  last = records[-1]
  for key in ('loss', 'main_loss', 'main_acc', 'medusa_loss_1', 'medusa_acc_1', 'grad_norm', 'learning_rate', 'loss_scale', 'skipped_steps',
              'tokens_per_sec', 'val_bits_per_token', 'val_bits_per_byte'):
    assert key in last, key
  assert records[-1]['loss'] < records[0]['loss']
  # The first step compiles: its time is reported apart, never as throughput.
  assert records[0]['first_step_s'] > 0 and 'tokens_per_sec' not in records[0]
  assert all('first_step_s' not in r and r['tokens_per_sec'] > 0 for r in records[1:])
  assert 'val_bits_per_token' in records[7] and 'val_bits_per_token' not in records[6]
  for name in ('training_curves.png', 'results.json', 'train_config.json'):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert reference_run['summary']['step'] == 16


def test_load_model_from_workdir_reproduces_validation(reference_run, corpus, caplog):
  workdir = reference_run['workdir']
  with caplog.at_level(logging.INFO):
    model, tokenizer, config = restore.load_model_from_workdir(workdir)
  # Quiet by default: no orbax read-only warnings (orbax INFO lines only at INFO verbosity).
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
  assert tokenizer.kind == 'byte' and config.vocab_size == tokenizer.vocab_size
  assert config.mtp_depth == 0 and config.medusa_heads == 1
  # The config file's model override and the dotted flag reached the model that was trained.
  assert config.d_ff == 96 and config.num_layers == 1
  assert len(model.layers) == 1
  info = workdir_lib.read_run_info(workdir)
  assert info['train']['steps'] == 16  # the flag overrode the file's 100
  assert info['train']['model'] == {'d_ff': 96, 'num_layers': 1}
  assert info['model']['d_ff'] == 96 and info['model']['num_layers'] == 1
  data = data_lib.load_data('byte', workdir, corpus)
  batch = data.validation_batches(8, 32, num_batches=1)[0]
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  eval_step = jax.jit(steps.make_eval_step(graphdef, rest, config))
  sums, means = eval_step(params, batch)
  bits = float(sums['nll_sum']) / int(sums['count']) / np.log(2)
  last = read_metrics(workdir)[-1]
  np.testing.assert_allclose(bits, last['val_bits_per_token'], rtol=1e-6)
  np.testing.assert_allclose(float(means['main_loss']), last['val_main_loss'], rtol=1e-6)


def test_load_model_from_a_mismatched_checkpoint_is_a_value_error(reference_run, tmp_path):
  workdir = tmp_path / 'copy'
  shutil.copytree(reference_run['workdir'], workdir)
  info = json.loads((workdir / 'train_config.json').read_text())
  info['model']['d_ff'] = 64   # the checkpoint holds d_ff = 96
  (workdir / 'train_config.json').write_text(json.dumps(info))
  with pytest.raises(ValueError, match="checkpoint cannot be restored into the run's model"):
    restore.load_model_from_workdir(str(workdir))


def test_kill_and_resume_is_bitwise_identical(reference_run, corpus):
  workdir = str(reference_run['root'] / 'killed')
  env = _env(reference_run['cache'])
  cmd = _command(workdir, corpus, reference_run['config_file'])
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  first_ckpt = os.path.join(workdir, 'checkpoints', '4', 'commit_success.txt')
  deadline = time.time() + 300
  while not os.path.exists(first_ckpt) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  _, stderr = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
  steps_saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))
                       if s.isdigit())
  assert steps_saved and steps_saved[-1] < 16, steps_saved  # killed mid-run

  resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  summary = json.loads(resumed.stdout.strip().splitlines()[-1])
  assert summary['start_step'] > 0 and summary['step'] == 16
  assert 'Resumed from the checkpoint at step' in resumed.stderr

  ref = read_metrics(reference_run['workdir'])
  got = read_metrics(workdir)
  assert _deterministic(got) == _deterministic(ref)  # exact float equality, every key
  assert all(set(r) - set(loop.TIMING_KEYS) for r in got)


def test_sigterm_saves_and_stops(reference_run, corpus):
  """SIGTERM: the run finishes its step, saves (asynchronously) and exits cleanly. Validation
  after every step (the compiled programs of the reference run, a cache hit) slows the run down
  so that the signal surely arrives before the end."""
  workdir = str(reference_run['root'] / 'sigterm')
  proc = subprocess.Popen(_command(workdir, corpus, reference_run['config_file'],
                                   ['--eval_every=1', '--eval_batches=1000']),
                          cwd=REPO, env=_env(reference_run['cache']), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  first_ckpt = os.path.join(workdir, 'checkpoints', '4', 'commit_success.txt')
  deadline = time.time() + 300
  while not os.path.exists(first_ckpt) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert summary['stopped'] == 'preempted' and 4 <= summary['step'] < 16, summary
  assert 'Received SIGTERM' in stderr
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  assert saved[-1] == summary['step']   # the stopped step's state, completely written
  assert os.path.exists(os.path.join(workdir, 'checkpoints', str(saved[-1]), 'commit_success.txt'))


def test_resuming_a_finished_run_reports_its_final_metrics(reference_run):
  """Rerunning a finished command trains nothing and reports the run's last logged loss and
  validation (the quickstart prints them), not NaN."""
  info = workdir_lib.read_run_info(reference_run['workdir'])
  summary = loop.train(TrainConfig(**{**info['train'], 'progress': False}))
  assert summary['start_step'] == summary['step'] == 16
  records = read_metrics(reference_run['workdir'])
  last_val = [r for r in records if 'val_bits_per_byte' in r][-1]
  assert summary['val_bits_per_byte'] == last_val['val_bits_per_byte']
  assert summary['loss'] == [r for r in records if 'loss' in r][-1]['loss']
  assert len(read_metrics(reference_run['workdir'])) == len(records)   # nothing appended


def test_resume_with_different_config_is_refused(reference_run, corpus):
  info = workdir_lib.read_run_info(reference_run['workdir'])
  cfg = TrainConfig(**{**info['train'], 'learning_rate': 1e-2, 'progress': False})
  with pytest.raises(ValueError, match='different configuration.*learning_rate'):
    loop.train(cfg)
  # From the command line: one line naming the differing fields, exit status 2.
  code, lines = _usage_error(_command(reference_run['workdir'], corpus,
                                      reference_run['config_file'],
                                      ['--learning_rate=0.01', '--model.d_ff=64'])[3:])
  assert code == 2 and len(lines) == 1, lines
  assert 'train.learning_rate: saved 0.003, now 0.01' in lines[0]
  assert 'model.d_ff: saved 96, now 64' in lines[0]


def test_sharded_run_matches_single_device(reference_run, corpus):
  workdir = str(reference_run['root'] / 'sharded')
  cmd = _command(workdir, corpus, reference_run['config_file'],
                 ['--mesh_data=2', '--mesh_fsdp=2', '--mesh_tensor=2', '--checkpoint_every=16',
                  '--profile_steps=2:3'])
  proc = subprocess.run(cmd, cwd=REPO, env=_env(reference_run['cache'], devices=8),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ref = read_metrics(reference_run['workdir'])
  got = read_metrics(workdir)
  assert [r['step'] for r in got] == [r['step'] for r in ref]
  for key in ('loss', 'main_loss', 'medusa_loss_1', 'grad_norm'):
    np.testing.assert_allclose([r[key] for r in got], [r[key] for r in ref], rtol=2e-4,
                               err_msg=key)
  np.testing.assert_allclose(got[-1]['val_bits_per_token'], ref[-1]['val_bits_per_token'],
                             rtol=2e-4)
  # --profile_steps wrote a jax.profiler trace.
  assert glob.glob(os.path.join(workdir, 'profile', 'plugins', 'profile', '*', '*.xplane.pb'))


def test_time_budget_saves_and_stops(reference_run, corpus):
  """--minutes stops after the current step with a checkpoint (same program: cache hit)."""
  workdir = str(reference_run['root'] / 'budget')
  # Synchronous checkpoints here (the other runs save asynchronously, the default).
  proc = subprocess.run(_command(workdir, corpus, reference_run['config_file'],
                                 ['--minutes=1e-6', '--noasync_checkpoint']), cwd=REPO,
                        env=_env(reference_run['cache']), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary['stopped'] == 'time_budget' and summary['step'] == 1
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))
                if s.isdigit()) == [1]
  # The step's training record, then the stopped model's validation (it is what was saved).
  records = read_metrics(workdir)
  assert [r['step'] for r in records] == [1, 1]
  assert 'loss' in records[0] and records[1]['val_bits_per_byte'] > 0
  assert summary['val_bits_per_byte'] == records[1]['val_bits_per_byte']


def test_resume_check_defaults_fields_an_older_workdir_lacks():
  """A field added to TrainConfig / TransformerConfig later does not make old runs unresumable,
  but a saved value that differs from the current one is still a named error."""
  train = TrainConfig(workdir='run', config='tiny').to_json()
  model = dataclasses.asdict(get_config('tiny'))
  current = {'train': train, 'model': model, 'tokenizer': {'kind': 'bytes'}}
  older = {'train': {k: v for k, v in train.items() if k != 'head_targets'},
           'model': {k: v for k, v in model.items() if k != 'eagle_layers'},
           'tokenizer': {'kind': 'bytes'}}
  workdir_lib.check_resume_config('run', older, current)     # both missing fields at default
  with pytest.raises(ValueError, match='model.eagle_layers: saved 0, now 2'):
    workdir_lib.check_resume_config('run', older, {**current, 'model': {**model, 'eagle_layers': 2}})
