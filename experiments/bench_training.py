"""Training throughput, side by side: precisions and the cost of MTP modules / Medusa heads.

  python -m experiments.bench_training --workdir=/tmp/bench_training --config=small

Every variant is compiled first; then the timed rounds interleave the variants (round r runs
`--steps_per_round` steps of each variant in turn), so slow drifts of a shared machine hit all
variants alike. Reported: the median over rounds of the seconds per step, tokens/s, and the step
time relative to the plain trunk of the same precision. Writes results.json and results.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time

import jax
import numpy as np
from absl import flags
from absl import logging

from jax_spec import cli
from jax_spec import data as data_lib
from jax_spec.training import state as train_state
from jax_spec.training.config import TrainConfig, make_model_config

flags.DEFINE_string('workdir', None, 'Output directory.')
flags.DEFINE_string('config', 'small', 'Model preset.')
flags.DEFINE_integer('batch_size', 8, 'Sequences per step.')
flags.DEFINE_integer('seq_len', 256, 'Tokens per sequence.')
flags.DEFINE_integer('rounds', 5, 'Timed rounds (the median is reported).')
flags.DEFINE_integer('steps_per_round', 3, 'Steps per variant per round.')
flags.DEFINE_list('precisions', ['fp32', 'bf16', 'fp16'], 'Precisions of the preset as is.')
flags.DEFINE_list('mtp_depths', ['1', '2', '3'], 'MTP depths compared with the plain trunk.')
flags.DEFINE_integer('medusa_heads', 4, 'Medusa heads compared with the plain trunk (0: skip).')
flags.DEFINE_string('head_precision', 'fp32', 'Precision of the head-overhead variants.')
flags.DEFINE_string('data_path', None, 'Corpus (default: the Python stdlib).')
FLAGS = flags.FLAGS


@dataclasses.dataclass
class Variant:
  name: str
  precision: str
  mtp_depth: int | None  # None: the preset's value
  medusa_heads: int | None
  group: str


def _variants():
  out = [Variant(f'{FLAGS.config} {p}', p, None, None, 'precision') for p in FLAGS.precisions]
  hp = FLAGS.head_precision
  out.append(Variant('trunk only', hp, 0, 0, 'heads'))
  for d in FLAGS.mtp_depths:
    out.append(Variant(f'MTP depth {int(d)}', hp, int(d), 0, 'heads'))
  if FLAGS.medusa_heads:
    out.append(Variant(f'{FLAGS.medusa_heads} Medusa heads', hp, 0, FLAGS.medusa_heads, 'heads'))
  return out


def _build(v: Variant, vocab_size: int, batch):
  cfg = TrainConfig(workdir=FLAGS.workdir, config=FLAGS.config, steps=1000,
                    batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len, precision=v.precision,
                    mtp_depth=v.mtp_depth, medusa_heads=v.medusa_heads)
  mc = make_model_config(cfg, vocab_size)
  setup = train_state.create_train_state(cfg, mc)
  state = setup.state
  step = jax.jit(train_state.make_step_fns(cfg, setup)[0], donate_argnums=0)
  t = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  state, m = compiled(state, batch)  # warm-up
  jax.block_until_ready(m)
  return {'state': state, 'step': compiled, 'compile_s': compile_s, 'config': mc}


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise ValueError('--workdir is required')
  os.makedirs(FLAGS.workdir, exist_ok=True)
  data = data_lib.load_data('byte', FLAGS.workdir, FLAGS.data_path)
  batches = [jax.device_put(data.get_batch(0, s, FLAGS.batch_size, FLAGS.seq_len))
             for s in range(FLAGS.steps_per_round)]
  variants = _variants()
  built = {}
  for v in variants:
    logging.info('compiling %s', v.name)
    built[v.name] = _build(v, data.vocab_size, batches[0])
    logging.info('%s compiled in %.1f s', v.name, built[v.name]['compile_s'])
  times = {v.name: [] for v in variants}
  for r in range(FLAGS.rounds):
    for v in variants:
      b = built[v.name]
      state = b['state']
      t = time.perf_counter()
      for batch in batches:
        state, m = b['step'](state, batch)
      jax.block_until_ready((state, m))
      times[v.name].append((time.perf_counter() - t) / len(batches))
      b['state'] = state
    logging.info('round %d/%d done', r + 1, FLAGS.rounds)

  tokens = FLAGS.batch_size * FLAGS.seq_len
  rows = []
  base = statistics.median(times['trunk only']) if 'trunk only' in times else None
  for v in variants:
    sec = statistics.median(times[v.name])
    row = {'variant': v.name, 'group': v.group, 'precision': v.precision,
           'mtp_depth': built[v.name]['config'].mtp_depth,
           'medusa_heads': built[v.name]['config'].medusa_heads,
           'step_ms': 1000 * sec, 'step_ms_min': 1000 * min(times[v.name]),
           'step_ms_max': 1000 * max(times[v.name]), 'tokens_per_sec': tokens / sec,
           'compile_s': built[v.name]['compile_s']}
    if v.group == 'heads' and base:
      row['overhead_pct'] = 100 * (sec / base - 1)
    rows.append(row)

  env = {'date': time.strftime('%Y-%m-%d'), 'backend': jax.default_backend(),
         'devices': [d.device_kind for d in jax.devices()], 'cpu_count': os.cpu_count(),
         'machine': platform.machine(), 'jax': jax.__version__,
         'load_avg_1m': os.getloadavg()[0] if hasattr(os, 'getloadavg') else None,
         'batch_size': FLAGS.batch_size, 'seq_len': FLAGS.seq_len, 'config': FLAGS.config,
         'rounds': FLAGS.rounds, 'steps_per_round': FLAGS.steps_per_round}
  with open(os.path.join(FLAGS.workdir, 'results.json'), 'w') as f:
    json.dump({'env': env, 'rows': rows, 'raw_step_s': times}, f, indent=2)
  lines = ['| variant | precision | MTP D | Medusa K | step (ms, median [min, max]) | tokens/s | '
           'overhead vs trunk |', '|---|---|---|---|---|---|---|']
  for row in rows:
    over = f"{row['overhead_pct']:+.1f}%" if 'overhead_pct' in row else ''
    lines.append(f"| {row['variant']} | {row['precision']} | {row['mtp_depth']} | "
                 f"{row['medusa_heads']} | {row['step_ms']:.0f} [{row['step_ms_min']:.0f}, "
                 f"{row['step_ms_max']:.0f}] | {row['tokens_per_sec']:.0f} | {over} |")
  table = '\n'.join(lines)
  with open(os.path.join(FLAGS.workdir, 'results.md'), 'w') as f:
    f.write(table + '\n')
  print(json.dumps(env))
  print(table)


if __name__ == '__main__':
  cli.run(main)
