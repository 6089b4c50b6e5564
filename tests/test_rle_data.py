"""Pose / gaze generators (determinism, labels match pixels) and the on-disk loaders."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from jax_spec.rle import coco, gaze_data, metrics, pose_data


# ---- stick figures --------------------------------------------------------------------------

def test_stick_figures_deterministic_and_shaped():
  a = pose_data.render_stick_figures(6, seed=3)
  b = pose_data.render_stick_figures(6, seed=3)
  c = pose_data.render_stick_figures(6, seed=4)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a['images'], c['images'])
  assert a['images'].shape == (6, 64, 64, 3) and a['images'].dtype == np.uint8
  assert a['keypoints'].shape == (6, pose_data.NUM_JOINTS, 2) and pose_data.NUM_JOINTS >= 12
  assert np.all((a['keypoints'] >= 0) & (a['keypoints'] < 64))
  assert set(np.unique(a['visibility'])) <= {1, 2}


@pytest.mark.parametrize('config', [
    pose_data.StickFigureConfig(occlusion_prob=0.0, max_clutter=0, noise_std=0.0),
    pose_data.StickFigureConfig(),  # with clutter, occluders and noise
])
def test_keypoints_lie_on_drawn_limbs(config):
  n = 24
  with_fig = pose_data.render_stick_figures(n, 7, config)
  without = pose_data.render_stick_figures(
      n, 7, pose_data.StickFigureConfig(**{**config.__dict__, 'draw_figure': False}))
  img = with_fig['images'].astype(np.float32) / 255
  bg = without['images'].astype(np.float32) / 255
  kp = with_fig['keypoints']
  xi, yi = kp[..., 0].astype(int), kp[..., 1].astype(int)
  rows = np.arange(n)[:, None]
  diff = np.abs(img[rows, yi, xi] - bg[rows, yi, xi]).max(-1)        # [N, K]
  visible = with_fig['visibility'] == 2
  # every visible keypoint's pixel is painted by the figure (a limb colour, not the background)
  assert np.all(diff[visible] > 0.1), diff[visible].min()
  # and occluded keypoints are hidden under the occluder: the figure does not show there
  if np.any(~visible):
    assert np.all(diff[~visible] < 1e-6)
  # sanity: the figure covers a minority of pixels, so the check above is not vacuous
  covered = np.abs(img - bg).max(-1) > 0.1
  assert covered.mean() < 0.3


def test_corrupt_labels_heavy_tailed_and_deterministic():
  kp = np.full((500, 14, 2), 5000.0, np.float32)   # a huge image: no clipping of the tails
  a = pose_data.corrupt_labels(kp, 0, fraction=0.2, scale=2.0, image_size=10000)
  np.testing.assert_array_equal(a, pose_data.corrupt_labels(kp, 0, 0.2, 2.0, 10000))
  moved = np.any(a != kp, -1)
  assert abs(moved.mean() - 0.2) < 0.02
  d = np.linalg.norm(a - kp, axis=-1)[moved]
  assert np.percentile(d, 99) > 10 * np.median(d)      # heavy tail
  clipped = pose_data.corrupt_labels(kp * 0 + 32, 0, 0.2, 2.0, 64)
  assert np.all((clipped >= 0) & (clipped < 64))
  with pytest.raises(ValueError, match='fraction'):
    pose_data.corrupt_labels(kp, 0, 1.5, 2.0, 64)


# ---- gaze ---------------------------------------------------------------------------------

def test_eyes_deterministic_and_follow_gaze():
  cfg = gaze_data.EyeConfig(noise_std=0.0)
  a = gaze_data.render_eyes(64, 1, cfg)
  np.testing.assert_array_equal(a['images'], gaze_data.render_eyes(64, 1, cfg)['images'])
  assert a['images'].shape == (64, 32, 48, 1)
  # the darkest blob (pupil) moves left as yaw grows and up as pitch grows
  img = a['images'][..., 0].astype(np.float32)
  xs = np.arange(48)[None, None, :]
  ys = np.arange(32)[None, :, None]
  dark = (img < np.percentile(img.reshape(64, -1), 3, axis=1)[:, None, None]).astype(np.float32)
  cx = (dark * xs).sum((1, 2)) / dark.sum((1, 2))
  cy = (dark * ys).sum((1, 2)) / dark.sum((1, 2))
  pitch, yaw = a['gaze'][:, 0], a['gaze'][:, 1]
  assert np.corrcoef(cx, yaw)[0, 1] < -0.8
  assert np.corrcoef(cy, pitch)[0, 1] < -0.6


def test_angular_error():
  py = np.array([[0.0, 0.0], [0.1, -0.2]])
  np.testing.assert_allclose(gaze_data.angular_error_deg(py, py), 0.0, atol=1e-5)
  np.testing.assert_allclose(gaze_data.angular_error_deg([[0.0, 0.0]], [[0.0, np.radians(10)]]),
                             [10.0], atol=1e-6)
  np.testing.assert_allclose(gaze_data.angular_error_deg([[np.radians(7), 0]], [[0.0, 0.0]]),
                             [7.0], atol=1e-6)
  v = gaze_data.pitchyaw_to_vector(np.random.default_rng(0).uniform(-1, 1, (5, 2)))
  np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0)


def _write_gaze_dir(root, rows, header='filename,pitch,yaw', make_images=True):
  os.makedirs(root, exist_ok=True)
  if make_images:
    rng = np.random.default_rng(0)
    for r in rows:
      Image.fromarray(rng.integers(0, 255, (36, 60), dtype=np.uint8)).save(root / r.split(',')[0])
  (root / 'labels.csv').write_text('\n'.join([header] + rows) + '\n')
  return str(root)


def test_gaze_loader_reads_fixture(tmp_path):
  path = _write_gaze_dir(tmp_path / 'ok', ['a.png,0.1,-0.2', 'b.png,-0.05,0.3'])
  d = gaze_data.load_gaze_directory(path, (32, 48))
  assert d['images'].shape == (2, 32, 48, 1) and d['images'].dtype == np.uint8
  np.testing.assert_allclose(d['gaze'], [[0.1, -0.2], [-0.05, 0.3]])
  assert d['filenames'] == ['a.png', 'b.png']


@pytest.mark.parametrize('name,rows,header,match', [
    ('hdr', ['a.png,0.1,0.2'], 'file,pitch,yaw', 'header'),
    ('cols', ['a.png,0.1'], 'filename,pitch,yaw', '3 columns'),
    ('num', ['a.png,up,0.2'], 'filename,pitch,yaw', 'numbers'),
    ('range', ['a.png,3.0,0.2'], 'filename,pitch,yaw', 'radians'),
])
def test_gaze_loader_rejects_malformed(tmp_path, name, rows, header, match):
  root = tmp_path / name
  os.makedirs(root)
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / 'a.png')
  (root / 'labels.csv').write_text('\n'.join([header] + rows) + '\n')
  with pytest.raises(ValueError, match=match):
    gaze_data.load_gaze_directory(str(root))


def test_gaze_loader_missing_and_corrupt_files(tmp_path):
  with pytest.raises(ValueError, match='labels.csv'):
    os.makedirs(tmp_path / 'empty')
    gaze_data.load_gaze_directory(str(tmp_path / 'empty'))
  root = tmp_path / 'missing'
  _write_gaze_dir(root, ['nope.png,0,0'], make_images=False)
  with pytest.raises(ValueError, match='not found'):
    gaze_data.load_gaze_directory(str(root))
  (root / 'nope.png').write_bytes(b'not an image')
  with pytest.raises(ValueError, match='cannot read image'):
    gaze_data.load_gaze_directory(str(root))


# ---- COCO ---------------------------------------------------------------------------------

def _coco_fixture(tmp_path, annotations=None, images=None):
  img_dir = tmp_path / 'images'
  os.makedirs(img_dir, exist_ok=True)
  arr = np.zeros((100, 120, 3), np.uint8)
  arr[40:50, 60:70] = 255                         # a white square where keypoint 0 will be
  Image.fromarray(arr).save(img_dir / '1.png')
  Image.fromarray(np.full((80, 80, 3), 128, np.uint8)).save(img_dir / '2.png')
  kps = [0.0] * 51
  kps[0:3] = [65.0, 45.0, 2]                      # nose on the white square
  kps[15:18] = [50.0, 60.0, 1]                    # left shoulder, labelled but occluded
  anns = annotations if annotations is not None else [
      {'id': 10, 'image_id': 1, 'bbox': [40.0, 30.0, 40.0, 60.0], 'keypoints': kps,
       'num_keypoints': 2, 'area': 1500.0, 'iscrowd': 0, 'category_id': 1},
      {'id': 11, 'image_id': 2, 'bbox': [10.0, 10.0, 20.0, 20.0], 'keypoints': [0.0] * 51,
       'num_keypoints': 0, 'iscrowd': 0, 'category_id': 1},     # no keypoints: skipped
      {'id': 12, 'image_id': 2, 'bbox': [0.0, 0.0, 30.0, 30.0], 'keypoints': kps,
       'num_keypoints': 2, 'iscrowd': 1, 'category_id': 1},     # crowd: skipped
  ]
  data = {'images': images if images is not None else [{'id': 1, 'file_name': '1.png'},
                                                       {'id': 2, 'file_name': '2.png'}],
          'annotations': anns,
          'categories': [{'id': 1, 'name': 'person', 'keypoints': list(coco.COCO_KEYPOINTS)}]}
  path = tmp_path / 'ann.json'
  path.write_text(json.dumps(data))
  return str(path), str(img_dir)


def test_coco_loader_crops_and_maps_keypoints(tmp_path):
  ann, img_dir = _coco_fixture(tmp_path)
  d = coco.load_coco_keypoints(ann, img_dir, image_size=64, padding=1.25)
  assert d['images'].shape == (1, 64, 64, 3)
  assert d['keypoints'].shape == (1, 17, 2) and d['visibility'].shape == (1, 17)
  assert d['visibility'][0, 0] == 2 and d['visibility'][0, 5] == 1 and d['visibility'][0, 1] == 0
  # box centre (60, 60), side 75 -> crop origin (22.5, 22.5), scale 64 / 75
  s = 64 / 75
  np.testing.assert_allclose(d['keypoints'][0, 0], [(65 - 22.5) * s, (45 - 22.5) * s], atol=1e-4)
  np.testing.assert_allclose(d['areas'][0], 1500 * s * s, rtol=1e-5)
  x, y = d['keypoints'][0, 0].astype(int)
  assert d['images'][0, y, x].min() > 200          # the keypoint's pixel is the white square
  assert metrics.oks(d['keypoints'], d['keypoints'], d['visibility'], d['areas'],
                     coco.COCO_SIGMAS)[0] == pytest.approx(1.0)


@pytest.mark.parametrize('mutate,match', [
    (lambda a: a[0].update(keypoints=[0.0] * 50), 'keypoints must be 51'),
    (lambda a: a[0].update(bbox=[1, 2, 3]), 'bbox'),
    (lambda a: a[0].update(image_id=99), 'image_id'),
    (lambda a: a[0].update(keypoints=[1.0, 1.0, 5.0] + [0.0] * 48), 'visibility'),
    (lambda a: a[0].update(bbox=[1.0, 1.0, 0.0, 5.0]), 'width and height'),
])
def test_coco_loader_rejects_malformed(tmp_path, mutate, match):
  ann, img_dir = _coco_fixture(tmp_path)
  data = json.loads(open(ann).read())
  mutate(data['annotations'])
  open(ann, 'w').write(json.dumps(data))
  with pytest.raises(ValueError, match=match):
    coco.load_coco_keypoints(ann, img_dir)


def test_coco_loader_rejects_bad_files(tmp_path):
  ann, img_dir = _coco_fixture(tmp_path)
  with pytest.raises(ValueError, match='does not exist'):
    coco.load_coco_keypoints(str(tmp_path / 'missing.json'), img_dir)
  bad = tmp_path / 'bad.json'
  bad.write_text('{"images": [')
  with pytest.raises(ValueError, match='not valid JSON'):
    coco.load_coco_keypoints(str(bad), img_dir)
  bad.write_text('{"images": []}')
  with pytest.raises(ValueError, match='annotations'):
    coco.load_coco_keypoints(str(bad), img_dir)
  os.remove(os.path.join(img_dir, '1.png'))
  with pytest.raises(ValueError, match='does not exist'):
    coco.load_coco_keypoints(ann, img_dir)


# ---- metrics -------------------------------------------------------------------------------

def test_keypoint_metrics_hand_values():
  gt = np.zeros((2, 2, 2))
  pred = np.array([[[3.0, 4.0], [0.0, 0.0]], [[0.0, 1.0], [10.0, 0.0]]])
  vis = np.array([[2, 2], [2, 0]])
  assert metrics.pixel_error(pred, gt, vis) == pytest.approx((5 + 0 + 1) / 3)
  assert metrics.pck(pred, gt, vis, norm=40, alpha=0.05) == pytest.approx(2 / 3)  # <= 2 px
  o = metrics.oks(pred, gt, vis, areas_N=np.array([100.0, 100.0]), sigmas_K=[0.1, 0.1])
  # e = d^2 / (2 * area * (2 sigma)^2) = d^2 / 8
  np.testing.assert_allclose(o, [(np.exp(-25 / 8) + 1) / 2, np.exp(-1 / 8)])
  # AP: perfect ranking vs reversed ranking
  oks_n = np.array([0.99, 0.97, 0.3, 0.2])
  assert metrics.average_precision(oks_n, np.array([4, 3, 2, 1.0])) > \
      metrics.average_precision(oks_n, np.array([1, 2, 3, 4.0]))
  assert metrics.average_precision(np.ones(5), np.ones(5)) == pytest.approx(1.0)
  assert metrics.average_precision(np.zeros(5), np.ones(5)) == pytest.approx(0.0)
