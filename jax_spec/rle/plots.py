"""Plots for the RLE experiments (matplotlib, Agg backend)."""
from __future__ import annotations

import json
import os
import platform
import time

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position


def plot_loss_curve(workdir: str, out_png: str, title: str) -> str:
  """Training loss vs step from `workdir/metrics.jsonl`."""
  steps, losses = [], []
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      r = json.loads(line)
      if isinstance(r.get('loss'), (int, float)):
        steps.append(r['step'])
        losses.append(r['loss'])
  fig, ax = plt.subplots(figsize=(5, 3.2))
  ax.plot(steps, losses, marker='.')
  ax.set_xlabel('step')
  ax.set_ylabel('train loss')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
  return out_png


def plot_keypoints(images, gt_NK2, pred_NK2, vis_NK, out_png: str, title: str, num: int = 8) -> str:
  """Test images with ground truth (white) and predicted (yellow, line to the truth) keypoints."""
  num = min(num, len(images))
  fig, axes = plt.subplots(1, num, figsize=(1.6 * num, 1.9))
  for i, ax in enumerate(np.atleast_1d(axes)):
    img = images[i]
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap='gray', interpolation='nearest',
              extent=(0, img.shape[1], img.shape[0], 0))
    m = vis_NK[i] > 0
    g, p = gt_NK2[i][m], pred_NK2[i][m]
    for a, b in zip(g, p):
      ax.plot([a[0], b[0]], [a[1], b[1]], color='yellow', lw=0.6)
    ax.scatter(g[:, 0], g[:, 1], s=6, c='white')
    ax.scatter(p[:, 0], p[:, 1], s=6, c='yellow')
    ax.set_axis_off()
  fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
  return out_png


def plot_comparison(results: dict, metrics: list[tuple[str, str, bool]], out_png: str,
                    title: str) -> str:
  """Bar chart per metric; `metrics` = [(key, label, higher_is_better)]; results[loss][key]."""
  names = list(results)
  fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2))
  colors = plt.cm.tab10(np.arange(len(names)))
  for ax, (key, label, higher) in zip(np.atleast_1d(axes), metrics):
    vals = [results[n][key] for n in names]
    bars = ax.bar(names, vals, color=colors)
    for b, v in zip(bars, vals):
      ax.annotate(f'{v:.3g}', (b.get_x() + b.get_width() / 2, v), ha='center', va='bottom',
                  fontsize=8)
    ax.set_title(f'{label} ({"higher" if higher else "lower"} is better)', fontsize=9)
    ax.tick_params(axis='x', labelsize=8)
    ax.grid(axis='y', alpha=0.3)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
  return out_png


def comparison_table(results: dict, metrics: list[tuple[str, str, bool]]) -> str:
  """Markdown table: one row per loss."""
  head = '| loss | ' + ' | '.join(label for _, label, _ in metrics) + ' | train s |'
  sep = '|' + '---|' * (len(metrics) + 2)
  rows = [head, sep]
  for name, r in results.items():
    cells = ' | '.join(f'{r[k]:.4g}' for k, _, _ in metrics)
    rows.append(f'| {name} | {cells} | {r.get("train_seconds", float("nan")):.0f} |')
  return '\n'.join(rows) + '\n'


def write_comparison(workdir: str, results: dict, metric_spec, title: str) -> str:
  """Writes comparison.json, comparison.md (a table) and comparison.png; returns the table."""
  with open(os.path.join(workdir, 'comparison.json'), 'w', encoding='utf-8') as f:
    json.dump({'title': title, 'results': results, 'date': time.strftime('%Y-%m-%d'),
               'hardware': f'{platform.machine()}, {os.cpu_count()} CPUs'}, f, indent=2)
  table = comparison_table(results, metric_spec)
  with open(os.path.join(workdir, 'comparison.md'), 'w', encoding='utf-8') as f:
    f.write(f'{title}\n\n{table}')
  plot_comparison(results, metric_spec, os.path.join(workdir, 'comparison.png'), title)
  print(table)
  return table
