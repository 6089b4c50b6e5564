"""COCO keypoints loader: person boxes -> square crops with keypoints in crop pixels.

Reads the standard `person_keypoints_*.json` layout: `images` (id, file_name), `annotations`
(image_id, bbox [x, y, w, h], keypoints [x1, y1, v1, ...] with v 0 = unlabelled, 1 = labelled but
not visible, 2 = visible, num_keypoints, area, iscrowd) and optionally `categories[0].keypoints`
(the joint names; 17 for COCO). Crowd annotations and those with fewer than `min_keypoints`
labelled joints are skipped, as in top-down COCO training.

Each person is cropped to a square of side max(w, h) * `padding` centred on its box (pixels outside
the image are black) and resized to `image_size`; keypoints, box and area are mapped into the crop.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

COCO_KEYPOINTS = ('nose', 'left_eye', 'right_eye', 'left_ear', 'right_ear', 'left_shoulder',
                  'right_shoulder', 'left_elbow', 'right_elbow', 'left_wrist', 'right_wrist',
                  'left_hip', 'right_hip', 'left_knee', 'right_knee', 'left_ankle', 'right_ankle')
# Per-keypoint OKS sigmas from the COCO evaluation code (cocoeval.py).
COCO_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87,
                        .87, .89, .89], np.float32) / 10.0


def _fail(path, msg):
  raise ValueError(f'annotation file {path}: {msg}')


def _number(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_coco_keypoints(annotation_file: str, image_dir: str, *, image_size: int = 64,
                        padding: float = 1.25, min_keypoints: int = 1, max_people: int | None = None):
  """Loads person crops. Returns dict of numpy arrays:

  images [N, S, S, 3] uint8, keypoints [N, K, 2] float32 (crop pixels), visibility [N, K] int32,
  boxes [N, 4] float32 (crop pixels), areas [N] float32 (crop pixels^2, for OKS),
  image_ids [N], annotation_ids [N].
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if image_size < 8:
    raise ValueError(f'image_size must be >= 8, got {image_size}')
  if padding < 1:
    raise ValueError(f'padding must be >= 1, got {padding}')
  if not os.path.isfile(annotation_file):
    raise ValueError(f'annotation_file {annotation_file!r} does not exist')
  if not os.path.isdir(image_dir):
    raise ValueError(f'image_dir {image_dir!r} is not a directory')
  try:
    with open(annotation_file, encoding='utf-8') as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    _fail(annotation_file, f'not valid JSON ({e})')
  if not isinstance(data, dict):
    _fail(annotation_file, 'top level must be an object with "images" and "annotations"')
  for key in ('images', 'annotations'):
    if not isinstance(data.get(key), list):
      _fail(annotation_file, f'"{key}" must be a list')
  num_k = len(COCO_KEYPOINTS)
  cats = data.get('categories')
  if isinstance(cats, list) and cats and isinstance(cats[0], dict) and 'keypoints' in cats[0]:
    num_k = len(cats[0]['keypoints'])
    if num_k < 1:
      _fail(annotation_file, 'categories[0].keypoints is empty')
  files = {}
  for i, im in enumerate(data['images']):
    if not isinstance(im, dict) or 'id' not in im or not isinstance(im.get('file_name'), str):
      _fail(annotation_file, f'images[{i}] needs "id" and a string "file_name"')
    files[im['id']] = im['file_name']

  out = {k: [] for k in ('images', 'keypoints', 'visibility', 'boxes', 'areas', 'image_ids',
                         'annotation_ids')}
  cache = {}
  for i, ann in enumerate(data['annotations']):
    where = f'annotations[{i}]'
    if not isinstance(ann, dict):
      _fail(annotation_file, f'{where} must be an object')
    if ann.get('image_id') not in files:
      _fail(annotation_file, f'{where}: image_id {ann.get("image_id")!r} is not in "images"')
    bbox, kps = ann.get('bbox'), ann.get('keypoints')
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(b) for b in bbox)):
      _fail(annotation_file, f'{where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}')
    if not (isinstance(kps, list) and len(kps) == 3 * num_k and all(_number(v) for v in kps)):
      _fail(annotation_file, f'{where}: keypoints must be {3 * num_k} numbers (x, y, v per '
            f'keypoint), got {len(kps) if isinstance(kps, list) else type(kps).__name__}')
    kp = np.asarray(kps, np.float32).reshape(num_k, 3)
    if not np.all(np.isin(kp[:, 2], (0, 1, 2))):
      _fail(annotation_file, f'{where}: visibility flags must be 0, 1 or 2, got {kp[:, 2].tolist()}')
    if ann.get('iscrowd', 0) or int(np.sum(kp[:, 2] > 0)) < min_keypoints:
      continue
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
      _fail(annotation_file, f'{where}: bbox width and height must be > 0, got {bbox}')
    name = files[ann['image_id']]
    if name not in cache:
      path = os.path.join(image_dir, name)
      if not os.path.isfile(path):
        raise ValueError(f'image file {path!r} (image_id {ann["image_id"]}) does not exist')
      try:
        with Image.open(path) as im:
          cache = {name: im.convert('RGB')}   # keep one decoded image (annotations are grouped)
      except (OSError, SyntaxError) as e:
        raise ValueError(f'cannot read image {path!r}: {e}') from None
    side = max(w, h) * padding
    left, top = x + w / 2 - side / 2, y + h / 2 - side / 2
    crop = cache[name].transform((image_size, image_size), Image.EXTENT,
                                 (left, top, left + side, top + side), Image.BILINEAR)
    s = image_size / side
    xy = (kp[:, :2] - np.array([left, top], np.float32)) * s
    vis = kp[:, 2].astype(np.int32)
    out['images'].append(np.asarray(crop, np.uint8))
    out['keypoints'].append(np.where(vis[:, None] > 0, xy, 0.0))
    out['visibility'].append(vis)
    out['boxes'].append(np.array([(x - left) * s, (y - top) * s, w * s, h * s], np.float32))
    area = ann.get('area', w * h)
    out['areas'].append(float(area if _number(area) and area > 0 else w * h) * s * s)
    out['image_ids'].append(ann['image_id'])
    out['annotation_ids'].append(ann.get('id', i))
    if max_people is not None and len(out['images']) >= max_people:
      break
  if not out['images']:
    _fail(annotation_file, f'no person annotations with >= {min_keypoints} labelled keypoints')
  return {
      'images': np.stack(out['images']),
      'keypoints': np.stack(out['keypoints']).astype(np.float32),
      'visibility': np.stack(out['visibility']),
      'boxes': np.stack(out['boxes']),
      'areas': np.asarray(out['areas'], np.float32),
      'image_ids': np.asarray(out['image_ids']),
      'annotation_ids': np.asarray(out['annotation_ids']),
  }
