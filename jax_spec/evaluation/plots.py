"""Plots of training runs and of the speculative benchmark (matplotlib, Agg backend).

`plot_training_curves(workdir_or_jsonl, out_png)` draws one panel per metric group: the losses
(total, main and every head), head accuracies, validation bits per token/byte, learning rate,
gradient norm, loss scale and throughput; panels with no data are left out.
`plot_acceptance(stats, out_dir, title)`: accepted-length histogram and per-depth acceptance of a
speculative run; `plot_speedups(rows, out_png)`: speedup and tau per drafter.
"""
from __future__ import annotations

import os
import re
from typing import Any, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

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
                         title: str | None = None) -> str:
  """Plots `source` (a metrics.jsonl or a workdir containing one) into `out_png`; returns path."""
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


def plot_acceptance(stats: dict[str, Any], out_dir: str, title: str) -> list[str]:
  """`accepted_length_hist.png` and `acceptance_per_depth.png` of `decoding.summarize` stats."""
  hist = np.asarray(stats['accepted_length_hist'], np.float64)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.bar(np.arange(len(hist)) + 1, hist / max(hist.sum(), 1))
  ax.set_xlabel('tokens emitted per verify step (accepted drafts + 1)')
  ax.set_ylabel('fraction of verify steps')
  ax.set_title(f'{title}\ntau = {stats["mean_accepted_length"]:.2f}', fontsize=9)
  fig.tight_layout()
  paths = [os.path.join(out_dir, 'accepted_length_hist.png'),
           os.path.join(out_dir, 'acceptance_per_depth.png')]
  fig.savefig(paths[0], dpi=120)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  depths = np.arange(1, len(hist))
  ax.plot(depths, stats['acceptance_rate_per_depth'], 'o-', label='P(accept d | accepted d-1)')
  ax.plot(depths, stats['acceptance_per_depth'], 's--', label='P(accept d)')
  ax.set_xlabel('draft depth d')
  ax.set_ylim(0, 1.05)
  ax.set_xticks(depths)
  ax.legend(fontsize=8)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(paths[1], dpi=120)
  plt.close(fig)
  return paths


def plot_speedups(rows: Sequence[dict[str, Any]], out_png: str) -> str:
  """Speedup over plain decoding and tau per drafter (rows: 'drafter', 'speedup', 'tau')."""
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  names = [r['drafter'] for r in rows]
  axes[0].bar(names, [r['speedup'] for r in rows], color='tab:blue')
  axes[0].axhline(1.0, color='k', lw=0.8)
  axes[0].set_ylabel('speedup over jitted greedy decoding')
  axes[1].bar(names, [r['tau'] for r in rows], color='tab:orange')
  axes[1].set_ylabel('tau (tokens per trunk forward)')
  for ax in axes:
    ax.tick_params(axis='x', labelrotation=20, labelsize=8)
  fig.tight_layout()
  fig.savefig(out_png, dpi=120)
  plt.close(fig)
  return out_png
