"""Keypoint metrics (numpy): mean pixel error, PCK, and COCO-style OKS AP.

Only labelled keypoints (visibility > 0) count, as in COCO.

- pixel error: mean Euclidean distance in input-image pixels.
- PCK@a: fraction of keypoints within a * `norm` pixels; the experiments use the side of the input
  image as `norm` (the person crop for COCO, so this is box-normalized there; for the synthetic
  64x64 figures, a = 0.05 is 3.2 px, about 5-7% of the figure's larger side).
- OKS (COCO): sum_i exp(-d_i^2 / (2 s^2 k_i^2)) / #labelled, with s^2 the object area and
  k_i = 2 sigma_i. COCO uses its per-keypoint sigmas (`coco.COCO_SIGMAS`); the synthetic skeleton
  has no human-annotation statistics, so it uses a uniform sigma (`UNIFORM_SIGMA`, about the mean
  of COCO's sigmas) and the tight keypoint box area as s^2.
- AP: one prediction per ground-truth person (top-down), ranked by its score; for each OKS
  threshold 0.50:0.05:0.95, precision/recall along the ranking with COCO's 101-point interpolated
  precision; the mean over thresholds. Ties keep input order (COCO's stable sort), so a constant
  score gives the unranked AP.
"""
from __future__ import annotations

import numpy as np

UNIFORM_SIGMA = 0.07
OKS_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def _labelled(pred_NK2, gt_NK2, vis_NK):
  pred, gt = np.asarray(pred_NK2, np.float64), np.asarray(gt_NK2, np.float64)
  if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 2:
    raise ValueError(f'pred and gt must both be [N, K, 2], got {pred.shape} and {gt.shape}')
  vis = np.asarray(vis_NK)
  if vis.shape != pred.shape[:2]:
    raise ValueError(f'visibility must be [N, K] = {pred.shape[:2]}, got {vis.shape}')
  return np.linalg.norm(pred - gt, axis=-1), vis > 0


def pixel_error(pred_NK2, gt_NK2, vis_NK) -> float:
  d, m = _labelled(pred_NK2, gt_NK2, vis_NK)
  return float(np.sum(d * m) / max(np.sum(m), 1))


def pck(pred_NK2, gt_NK2, vis_NK, norm, alpha: float = 0.05) -> float:
  """Fraction of labelled keypoints within alpha * norm (norm: scalar or [N])."""
  d, m = _labelled(pred_NK2, gt_NK2, vis_NK)
  norm = np.broadcast_to(np.asarray(norm, np.float64), d.shape[:1])[:, None]
  return float(np.sum((d <= alpha * norm) & m) / max(np.sum(m), 1))


def oks(pred_NK2, gt_NK2, vis_NK, areas_N, sigmas_K):
  """Object keypoint similarity [N] (NaN for an instance without labelled keypoints)."""
  d, m = _labelled(pred_NK2, gt_NK2, vis_NK)
  sigmas = np.broadcast_to(np.asarray(sigmas_K, np.float64), d.shape[1:])
  areas = np.asarray(areas_N, np.float64)
  if areas.shape != d.shape[:1]:
    raise ValueError(f'areas must be [N] = {d.shape[:1]}, got {areas.shape}')
  e = d**2 / ((2 * sigmas[None]) ** 2 * (areas[:, None] + np.spacing(1)) * 2)
  num = np.sum(np.exp(-e) * m, -1)
  cnt = np.sum(m, -1)
  return np.where(cnt > 0, num / np.maximum(cnt, 1), np.nan)


def average_precision(oks_N, scores_N, thresholds=OKS_THRESHOLDS) -> float:
  """COCO-style AP over OKS thresholds (one prediction per ground truth)."""
  oks_N = np.asarray(oks_N, np.float64)
  scores_N = np.asarray(scores_N, np.float64)
  if oks_N.shape != scores_N.shape or oks_N.ndim != 1:
    raise ValueError(f'oks and scores must be [N] of the same length, got {oks_N.shape}, '
                     f'{scores_N.shape}')
  keep = ~np.isnan(oks_N)
  oks_N, scores_N = oks_N[keep], scores_N[keep]
  n = len(oks_N)
  if n == 0:
    raise ValueError('no instance with labelled keypoints to evaluate')
  order = np.argsort(-scores_N, kind='mergesort')
  recall_points = np.linspace(0, 1, 101)
  aps = []
  for t in thresholds:
    tp = np.cumsum(oks_N[order] >= t)
    fp = np.cumsum(oks_N[order] < t)
    recall = tp / n
    precision = tp / np.maximum(tp + fp, 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]   # monotone envelope
    idx = np.searchsorted(recall, recall_points, side='left')
    aps.append(np.mean(np.where(idx < n, precision[np.minimum(idx, n - 1)], 0.0)))
  return float(np.mean(aps))


def keypoint_metrics(pred_NK2, gt_NK2, vis_NK, *, image_size, areas_N, sigmas_K, scores_N):
  """The experiments' results: pixel_error, pck (@0.05 of image_size), ap, ap50, ap75."""
  o = oks(pred_NK2, gt_NK2, vis_NK, areas_N, sigmas_K)
  return {
      'pixel_error': pixel_error(pred_NK2, gt_NK2, vis_NK),
      'pck': pck(pred_NK2, gt_NK2, vis_NK, image_size, 0.05),
      'ap': average_precision(o, scores_N),
      'ap50': average_precision(o, scores_N, [0.5]),
      'ap75': average_precision(o, scores_N, [0.75]),
      'mean_oks': float(np.nanmean(o)),
  }
