"""detect.py: boxes drawn where the model detects, Darknet labels, video in and out,
--compare side by side, the zero-argument demo, and one-line refusals."""
import os

import cv2
import numpy as np
import pytest
from conftest import ROOT, TEST_CFGS, randomize_weights

import detect
from darknet.model import Darknet
from darknet.weights import save_model_weights
from deploy.drawing import draw_factor
from utils.errors import UserInputError

CFG = os.path.join(TEST_CFGS, 'small_detector.cfg')  # 4 classes, 64 px


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """A random-weight model that finds boxes in noise, names, a 64x48 PNG and a video."""
    folder = tmp_path_factory.mktemp('detect')
    weights = str(folder / 'random.pt')
    save_model_weights(randomize_weights(Darknet(CFG), seed=1), weights)
    names = folder / 'four.names'
    names.write_text('a\nb\nc\nd\n')
    images = folder / 'images'
    images.mkdir()
    rng = np.random.default_rng(0)
    image = str(images / 'noise.png')
    cv2.imwrite(image, rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    video = str(folder / 'clip.avi')
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*'MJPG'), 5, (64, 48))
    for _ in range(5):
        writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    writer.release()
    return {'folder': folder, 'weights': weights, 'names': str(names), 'image': image,
            'video': video}


def _run(setup, out, *extra):
    return detect.main(['--cfg', CFG, '--weights', setup['weights'], '--names', setup['names'],
                        '--output-dir', str(out), *extra])


def _enlarged(image):
    f = draw_factor(image.shape)
    return np.repeat(np.repeat(image, f, 0), f, 1), f


def test_boxes_are_drawn_where_the_model_detects(setup, tmp_path):
    original = cv2.imread(setup['image'])
    base, f = _enlarged(original)
    # nothing passes a score threshold above 1: the output is the (enlarged) input
    _run(setup, tmp_path / 'none', '--source', setup['image'], '--conf-thres', '1.01')
    assert np.array_equal(cv2.imread(str(tmp_path / 'none' / 'noise.png')), base)
    result = _run(setup, tmp_path / 'some', '--source', setup['image'], '--conf-thres', '0.45',
                  '--save-txt')
    drawn = cv2.imread(str(tmp_path / 'some' / 'noise.png'))
    labels = np.loadtxt(tmp_path / 'some' / 'labels' / 'noise.txt', ndmin=2)
    assert result['boxes'] == len(labels) > 0
    changed = (drawn != base).any(2)
    h, w = original.shape[:2]
    for c, cx, cy, bw, bh in labels:
        assert 0 <= c < 4
        x1, x2 = (int(round(v * w * f)) for v in (cx - bw / 2, cx + bw / 2))
        y1, y2 = (int(round(v * h * f)) for v in (cy - bh / 2, cy + bh / 2))
        x1, x2 = np.clip([x1, x2], 0, w * f - 1)
        y1, y2 = np.clip([y1, y2], 0, h * f - 1)
        # the box's outline: its left and right edges (within the rounding of the label's
        # six decimals) are drawn over the image
        for x in (x1, x2):
            assert changed[y1:y2 + 1, max(x - 1, 0):x + 2].any(1).mean() > 0.9
    assert changed.mean() < 0.9  # boxes and labels, not a repainted image


def test_video_in_gives_video_out_with_every_frame(setup, tmp_path):
    result = _run(setup, tmp_path, '--source', setup['video'])
    assert result['frames'] == 5
    capture = cv2.VideoCapture(str(tmp_path / 'clip.mp4'))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame.shape)
    f = draw_factor((48, 64))
    assert frames == [(48 * f, 64 * f, 3)] * 5


def test_compare_puts_both_models_side_by_side(setup, tmp_path):
    other = str(tmp_path / 'other.pt')
    save_model_weights(randomize_weights(Darknet(CFG), seed=2), other)
    _run(setup, tmp_path / 'out', '--source', setup['image'], '--compare', CFG, other,
         '--conf-thres', '1.01')
    out = cv2.imread(str(tmp_path / 'out' / 'noise.png'))
    f = draw_factor((48, 64))
    assert out.shape[1] == 2 * 64 * f + 4  # two panels and the gap
    assert 48 * f < out.shape[0] < 48 * f + 40  # the panels under a title band
    # each panel is the image (nothing passes the threshold) under its own title
    base, _ = _enlarged(cv2.imread(setup['image']))
    top = out.shape[0] - 48 * f
    for left in (0, 64 * f + 4):
        assert np.array_equal(out[top:, left:left + 64 * f], base)
        assert (out[:top, left:left + 64 * f] < 128).any()  # black title text on white


def test_folder_glob_and_list_find_the_same_images(setup, tmp_path):
    listing = tmp_path / 'list.txt'
    listing.write_text(setup['image'] + '\n')
    for source in (os.path.dirname(setup['image']), os.path.join(
            os.path.dirname(setup['image']), '*.png'), str(listing)):
        result = _run(setup, tmp_path / 'out', '--source', source)
        assert result['images'] == 1


def test_no_arguments_runs_the_demo_and_its_pruned_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = detect.main(['--output-dir', str(tmp_path)])
    assert result['images'] == detect.DEMO_IMAGES and len(result['detectors']) == 2
    first, pruned = (d.model for d in result['detectors'])
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in
                                                            first.parameters())
    for path in result['outputs']:
        image = cv2.imread(path)
        assert image.shape[1] == 2 * 128 * draw_factor((128, 128)) + 4


@pytest.mark.parametrize('case, needle', [
    ('bad_image', 'cannot decode image'),
    ('bad_video', 'cannot read it as a video'),
    ('empty_folder', 'no images'),
    ('names', '3 class names but the model detects 4'),
    ('over_input', 'would overwrite the input'),
    ('missing', 'no such file or folder'),
    ('camera', 'cameras and streams are not supported'),
])
def test_bad_input_is_refused_in_one_line(setup, tmp_path, case, needle):
    out = tmp_path / 'out'
    source = str(tmp_path / 'x.png')
    extra = []
    if case == 'bad_image':
        open(source, 'wb').write(b'not an image' * 20)
    elif case == 'bad_video':
        source = str(tmp_path / 'x.mp4')
        open(source, 'wb').write(b'not a video' * 20)
    elif case == 'empty_folder':
        source = str(tmp_path / 'empty')
        os.mkdir(source)
    elif case == 'names':
        source = setup['image']
        names = tmp_path / 'three.names'
        names.write_text('a\nb\nc\n')
        extra = ['--names', str(names)]
    elif case == 'over_input':
        source, out = setup['image'], os.path.dirname(setup['image'])
    elif case == 'camera':
        source = '0'
    with pytest.raises(UserInputError) as error:
        _run(setup, out, '--source', source, *extra)
    assert needle in str(error.value) and '\n' not in str(error.value)
    if case != 'over_input':
        assert not os.path.exists(out) or not os.listdir(out)
