"""The synthetic shapes set: deterministic, well-formed, labels tight on the drawn shapes."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from data.make_shapes import CLASS_NAMES, MAX_OBJECTS, ensure_shapes, generate
from utils.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]


def _files(root):
    """{relative path: bytes} of everything but the .data file (it holds absolute paths)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob('*'))
            if p.is_file() and p.suffix != '.data'}


def _labels(root, split):
    n = len((root / f'{split}.txt').read_text().split())
    texts = [(root / 'labels' / split / f'{i:06d}.txt').read_text() for i in range(n)]
    return [np.array(t.split(), float).reshape(-1, 5) for t in texts]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = _files(generate(tmp_path / 'a', seed=3, n_train=10, n_valid=4, img_size=96,
                        workers=1, progress=False).parent)
    b = _files(generate(tmp_path / 'b', seed=3, n_train=10, n_valid=4, img_size=96,
                        workers=1, progress=False).parent)
    c = _files(generate(tmp_path / 'c', seed=4, n_train=10, n_valid=4, img_size=96,
                        workers=1, progress=False).parent)
    assert len(a) == 2 * (10 + 4) + 3  # images, labels, two lists and the names file
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.startswith('images/')]
    assert all(a[k] != c[k] for k in images)


def test_image_does_not_depend_on_how_many_are_made(tmp_path):
    small = _files(generate(tmp_path / 's', seed=0, n_train=3, n_valid=1, img_size=64,
                            workers=1, progress=False).parent)
    large = _files(generate(tmp_path / 'l', seed=0, n_train=6, n_valid=2, img_size=64,
                            workers=1, progress=False).parent)
    for k in small:
        if k.startswith(('images/', 'labels/')):
            assert small[k] == large[k], k


def test_labels_well_formed_and_all_classes_present(tmp_path):
    root = generate(tmp_path, seed=0, n_train=60, n_valid=10, img_size=128, workers=1,
                    progress=False).parent
    labels = _labels(root, 'train') + _labels(root, 'valid')
    counts = [len(l) for l in labels]
    assert min(counts) >= 0 and max(counts) <= MAX_OBJECTS
    assert len(set(counts)) >= 4  # the count varies
    allv = np.concatenate(labels)
    assert set(allv[:, 0].astype(int)) == set(range(len(CLASS_NAMES)))
    assert np.all(allv[:, 0] == allv[:, 0].round())
    assert allv[:, 1:].min() >= 0 and allv[:, 1:].max() <= 1
    assert allv[:, 3:].min() > 0
    x1, x2 = allv[:, 1] - allv[:, 3] / 2, allv[:, 1] + allv[:, 3] / 2
    assert x1.min() >= -1e-6 and x2.max() <= 1 + 1e-6  # clipped to the image
    # small objects exist (boxes of 8 px or less at 128 px)
    assert (allv[:, 3:].max(1) * 128 <= 8).any()
    # list files name the images, relative to their own folder
    for split in ('train', 'valid'):
        for line in (root / f'{split}.txt').read_text().split():
            assert (root / line).is_file()
    assert (root / 'shapes.names').read_text().split() == list(CLASS_NAMES)
    assert (REPO / 'data' / 'shapes.names').read_text().split() == list(CLASS_NAMES)


def test_boxes_are_tight_on_the_drawn_pixels(tmp_path):
    # plain mode: flat black background, so the shapes are exactly the non-black pixels
    root = generate(tmp_path, seed=1, n_train=30, n_valid=0, img_size=96, image_format='png',
                    plain=True, workers=1, progress=False).parent
    n_boxes = 0
    for i, lab in enumerate(_labels(root, 'train')):
        img = cv2.imread(str(root / 'images' / 'train' / f'{i:06d}.png'))
        fg = img.max(2) > 0
        h, w = fg.shape
        covered = np.zeros_like(fg)
        for _, cx, cy, bw, bh in lab:
            x1, x2 = round((cx - bw / 2) * w), round((cx + bw / 2) * w)
            y1, y2 = round((cy - bh / 2) * h), round((cy + bh / 2) * h)
            covered[y1:y2, x1:x2] = True
            # every side of the box touches a drawn pixel
            assert fg[y1, x1:x2].any() and fg[y2 - 1, x1:x2].any()
            assert fg[y1:y2, x1].any() and fg[y1:y2, x2 - 1].any()
            n_boxes += 1
        assert not (fg & ~covered).any()  # no drawn pixel outside every box
    assert n_boxes > 50


def test_ensure_shapes_generates_once(tmp_path):
    data = tmp_path / 'demo.data'
    data.write_text(f'classes=4\ntrain={tmp_path}/set/train.txt\n'
                    f'valid={tmp_path}/set/valid.txt\nnames={tmp_path}/set/shapes.names\n')
    assert ensure_shapes(data, n_train=4, n_valid=2, img_size=64, progress=False) == data
    lists = [(tmp_path / 'set' / f'{s}.txt').read_text().split() for s in ('train', 'valid')]
    assert [len(x) for x in lists] == [4, 2]
    first = (tmp_path / 'set' / 'images' / 'train' / '000000.jpg').stat().st_mtime_ns
    ensure_shapes(data, n_train=4, n_valid=2, img_size=64, progress=False)
    assert (tmp_path / 'set' / 'images' / 'train' / '000000.jpg').stat().st_mtime_ns == first


def test_ensure_shapes_refuses_bad_data_files(tmp_path):
    with pytest.raises(UserInputError, match='not found'):
        ensure_shapes(tmp_path / 'missing.data')
    bad = tmp_path / 'bad.data'
    bad.write_text('classes=3\ntrain=x/train.txt\nvalid=x/valid.txt\n')
    with pytest.raises(UserInputError, match='classes=4'):
        ensure_shapes(bad)
    bad.write_text('classes=4\ntrain=x/a.txt\nvalid=y/valid.txt\n')
    with pytest.raises(UserInputError, match='train.txt'):
        ensure_shapes(bad)


def test_repo_data_file_points_at_default_set():
    text = (REPO / 'data' / 'shapes.data').read_text().split()
    assert 'classes=4' in text
    assert 'train=data/shapes/train.txt' in text and 'valid=data/shapes/valid.txt' in text
    assert 'names=data/shapes.names' in text
