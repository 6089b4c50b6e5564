"""Training-curve plots from `metrics.jsonl` (matplotlib, Agg backend), reusable by experiments.

`plot_training_curves(workdir_or_jsonl, out_png)` draws one panel per metric group: the losses
(total, main and every head), head accuracies, validation bits per token/byte, learning rate,
gradient norm, loss scale and throughput; panels with no data are left out.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from jax_spec.io.metrics import read_metrics  # pylint: disable=wrong-import-position

# (title, regex over metric names, log-scale y)
DEFAULT_PANELS = (
    ('train loss', r'^(loss|main_loss|mtp_loss_\d+|medusa_loss_\d+)$', False),
    ('train top-1 accuracy', r'^(main_acc|mtp_acc_\d+|medusa_acc_\d+)$', False),
    ('validation bits', r'^val_bits_per_(token|byte)$', False),
    ('validation head accuracy', r'^val_(main_acc|mtp_acc_\d+|medusa_acc_\d+)$', False),
    ('learning rate', r'^learning_rate$', False),
    ('grad norm', r'^grad_norm$', True),
    ('loss scale', r'^loss_scale$', True),
    ('tokens / s', r'^tokens_per_sec$', False),
)


def _series(records, key):
  xs, ys = [], []
  for r in records:
    v = r.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      xs.append(r['step'])
      ys.append(v)
  return xs, ys


def plot_training_curves(source: str, out_png: str, *, panels: Sequence = DEFAULT_PANELS,
                         title: str | None = None, skip_first_throughput: bool = True) -> str:
  """Plots `source` (a metrics.jsonl or a workdir containing one) into `out_png`; returns path.

  The first tokens/s point includes compilation, so it is left out by default.
  """
  records = read_metrics(source)
  if not records:
    raise ValueError(f'source {source!r} has no metrics records')
  keys = sorted({k for r in records for k in r if k != 'step'})
  chosen = []
  for name, pattern, logy in panels:
    names = [k for k in keys if re.search(pattern, k)]
    if names and any(_series(records, k)[0] for k in names):
      chosen.append((name, names, logy))
  if not chosen:
    raise ValueError(f'source {source!r} has none of the plotted metrics; keys: {keys}')
  cols = min(3, len(chosen))
  rows = (len(chosen) + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
  for ax, (name, names, logy) in zip(axes.flat, chosen):
    for k in names:
      xs, ys = _series(records, k)
      if k == 'tokens_per_sec' and skip_first_throughput and len(xs) > 1:
        xs, ys = xs[1:], ys[1:]
      ax.plot(xs, ys, label=k, marker='.' if len(xs) < 30 else None)
    ax.set_title(name)
    ax.set_xlabel('step')
    if logy:
      ax.set_yscale('log')
    ax.grid(alpha=0.3)
    if len(names) > 1:
      ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(chosen):]:
    ax.axis('off')
  if title:
    fig.suptitle(title)
  # Fixed spacing: tight_layout measures every text box and costs seconds with many panels.
  fig.subplots_adjust(left=0.07, right=0.98, bottom=0.08, top=0.9 if title else 0.95,
                      hspace=0.45, wspace=0.28)
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
  return out_png


def plot_compare(sources: dict[str, str], key: str, out_png: str, *, title: str | None = None,
                 logy: bool = False) -> str:
  """One metric (e.g. 'loss') from several runs on one axis: {label: workdir_or_jsonl}."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, src in sources.items():
    xs, ys = _series(read_metrics(src), key)
    ax.plot(xs, ys, label=label)
  ax.set_xlabel('step')
  ax.set_ylabel(key)
  if logy:
    ax.set_yscale('log')
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title(title or key)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
  return out_png
