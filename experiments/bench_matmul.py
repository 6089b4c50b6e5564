"""What a matmul of a few rows costs against one row: the verify step's floor on this backend.

  python -m experiments.bench_matmul --workdir=/tmp/bench_matmul
  XLA_FLAGS=--xla_cpu_use_onednn=true python -m experiments.bench_matmul --workdir=/tmp/mm_onednn

A T-token verify step multiplies T rows by every weight; a plain step multiplies one. This times
`x_TD @ W_DF` for each T, over `--weights` distinct weight matrices per iteration (so, like a
model's, they do not stay in the core's cache), as XLA's dot ('gemm'), through the decode path's
few-row kernel (`jax_spec.kernels.rows_matmul`, 'kernel') and as T one-row dots ('rows'), all
forms and T interleaved in every round. Prints microseconds per matmul and the
ratio to one row; writes results.json into --workdir. XLA flags come from `XLA_FLAGS` (the
experiments' `runtime.CPU_FLAGS` are added unless that flag is set there).
"""
from __future__ import annotations

import json
import os
import statistics

from absl import flags

from jax_spec import cli
from jax_spec import runtime

flags.DEFINE_string('workdir', None, 'Output directory.')
flags.DEFINE_list('rows', ['1', '2', '4', '7', '8', '16'], 'Row counts T.')
flags.DEFINE_list('forms', ['gemm', 'kernel', 'rows'], "'gemm': XLA's dot of [T, D] x [D, F]; "
                  "'kernel': jax_spec.kernels.rows_matmul (the decode path's, weights packed "
                  "outside the loop); 'rows': T one-row dots, concatenated; 'wx': the weight "
                  'stored transposed [F, D], as the left operand (W x^T).')
flags.DEFINE_integer('d_in', 256, 'D (the small preset: d_model).')
flags.DEFINE_integer('d_out', 768, 'F (the small preset: d_ff).')
flags.DEFINE_integer('weights', 16, 'Distinct weights per iteration (16 x 256 x 768 fp32: 12.6 MB, '
                     "the small trunk's bytes).")
flags.DEFINE_integer('iterations', 20, 'Iterations of the jitted loop per timed call.')
flags.DEFINE_integer('repeats', 9, 'Timed rounds (medians are reported).')
FLAGS = flags.FLAGS

FORMS = ('gemm', 'kernel', 'rows', 'wx')


def matmul_loop(weights_NDF, rows: int, form: str, iterations: int):
  """A jitted loop: each iteration multiplies a [rows, D] activation by every weight in turn."""
  import jax  # pylint: disable=g-import-not-at-top  (after runtime.configure_xla_cpu)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  d_in = weights_NDF.shape[1]

  # Arguments, one array per weight as a model's parameters are (closed-over constants get
  # re-laid out by XLA; slices of one stacked array get copied).
  def run(weights, x_TD):
    def body(_, x_TD):
      for w_DF in weights:
        if form == 'gemm':
          y_TF = x_TD @ w_DF
        elif form == 'kernel':   # w_DF holds the packed tiles here
          with rows_matmul.packed({0: w_DF}):
            y_TF = rows_matmul.matmul(x_TD, jnp.zeros((d_in, d_out), jnp.float32), key=0)
        elif form == 'wx':   # w_DF holds the transposed weight [F, D] here
          y_TF = jax.lax.dot_general(w_DF, x_TD, (((1,), (1,)), ((), ()))).T
        else:
          y_TF = jnp.concatenate([x_TD[t:t + 1] @ w_DF for t in range(rows)], axis=0)
        x_TD = x_TD + 1e-3 * y_TF[:, :d_in]   # a data dependence, so no matmul is skipped
      return x_TD
    return jax.lax.fori_loop(0, iterations, body, x_TD)

  fn = jax.jit(run)
  from jax_spec.kernels import rows_matmul  # pylint: disable=g-import-not-at-top
  d_out = weights_NDF.shape[2]
  prepare = {'wx': lambda w: w.T.copy(), 'kernel': rows_matmul.pack}.get(form, lambda w: w)
  weights = tuple(jax.block_until_ready(prepare(w)) for w in weights_NDF)
  x_TD = jnp.ones((rows, d_in), jnp.float32)
  jax.block_until_ready(fn(weights, x_TD))   # compile outside the timing
  return lambda: fn(weights, x_TD)


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise ValueError('--workdir is required')
  for form in FLAGS.forms:
    if form not in FORMS:
      raise ValueError(f'--forms must be a subset of {FORMS}, got {form!r}')
  rows = sorted({int(t) for t in FLAGS.rows} | {1})
  if rows[0] < 1:
    raise ValueError(f'--rows must be positive ints, got {FLAGS.rows}')
  if min(FLAGS.d_in, FLAGS.d_out, FLAGS.weights, FLAGS.iterations, FLAGS.repeats) < 1:
    raise ValueError('--d_in, --d_out, --weights, --iterations and --repeats must be positive')
  if FLAGS.d_out < FLAGS.d_in:
    raise ValueError(f'--d_out ({FLAGS.d_out}) must be >= --d_in ({FLAGS.d_in})')
  runtime.configure_xla_cpu()
  import jax  # pylint: disable=g-import-not-at-top
  weights_NDF = 0.05 * jax.random.normal(jax.random.key(0),
                                         (FLAGS.weights, FLAGS.d_in, FLAGS.d_out))
  from jax_spec.evaluation import cost_model  # pylint: disable=g-import-not-at-top
  fns = {(form, t): matmul_loop(weights_NDF, t, form, FLAGS.iterations)
         for form in FLAGS.forms for t in rows}
  times = cost_model.time_interleaved(fns, FLAGS.repeats, 'matmuls')
  per_matmul = FLAGS.iterations * FLAGS.weights
  one_row = statistics.median(times[(FLAGS.forms[0], 1)])
  table = []
  for (form, t), ts in times.items():
    med = statistics.median(ts)
    table.append({'form': form, 'rows': t, 'us_per_matmul': 1e6 * med / per_matmul,
                  'vs_one_row': med / one_row})
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, 'results.json'), 'w') as fh:
    json.dump({'xla_flags': os.environ.get('XLA_FLAGS', ''), 'd_in': FLAGS.d_in,
               'd_out': FLAGS.d_out, 'weights': FLAGS.weights, 'rows': table}, fh, indent=2)
  print(f'[T, {FLAGS.d_in}] x [{FLAGS.d_in}, {FLAGS.d_out}], XLA_FLAGS={os.environ["XLA_FLAGS"]!r}')
  print('| form | T | us / matmul | vs one row |\n|---|---|---|---|')
  for r in table:
    print(f"| {r['form']} | {r['rows']} | {r['us_per_matmul']:.1f} | {r['vs_one_row']:.2f} |")


if __name__ == '__main__':
  cli.run(main)
