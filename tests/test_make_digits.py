"""The digits set: held-out pools, deterministic, labels tight on the pasted ink.

A fake OpenCV source is built in a temporary folder: a synthetic digits.png of the real
layout (50 rows x 100 cells of 20 px, 5 rows per class) and two generated "photos", one
from each background pool.
"""
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from data import make_digits
from data.make_digits import (CELL, CLASS_NAMES, GRID_COLS, GRID_ROWS, MAX_BOX, MAX_OBJECTS,
                              MIN_BOX, generate, load_source, render_scene)
from utils.errors import UserInputError

TRAIN_PHOTO, VALID_PHOTO = make_digits.PHOTOS_TRAIN[0], make_digits.PHOTOS_VALID[0]


def _sheet():
    """A digits.png of the real layout; every cell is unique (random stroke intensities)."""
    rng = np.random.default_rng(0)
    sheet = np.zeros((GRID_ROWS * CELL, GRID_COLS * CELL), np.uint8)
    rows_per_class = GRID_ROWS // len(CLASS_NAMES)
    for r in range(GRID_ROWS):
        for c in range(GRID_COLS):
            cell = np.zeros((CELL, CELL), np.uint8)
            cv2.putText(cell, str(r // rows_per_class), (4, 17), cv2.FONT_HERSHEY_SIMPLEX,
                        0.6, 255, 2, cv2.LINE_AA)
            cell = (cell * rng.uniform(0.75, 1.0, cell.shape)).astype(np.uint8)
            sheet[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = cell
    return sheet


def _photo(seed, h, w):
    """A smooth colourful texture standing in for a photograph."""
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.uniform(0, 255, (6, 8, 3)).astype(np.float32), (w, h),
                     interpolation=cv2.INTER_CUBIC)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp('opencv') / 'samples' / 'data'
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / 'digits.png'), _sheet())
    cv2.imwrite(str(folder / TRAIN_PHOTO), _photo(1, 200, 300))
    cv2.imwrite(str(folder / VALID_PHOTO), _photo(2, 240, 180))
    return folder


def _files(root):
    """{relative path: bytes} of everything but the .data file (it holds absolute paths)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob('*'))
            if p.is_file() and p.suffix != '.data'}


def _labels(root, split):
    n = len((root / f'{split}.txt').read_text().split())
    texts = [(root / 'labels' / split / f'{i:06d}.txt').read_text() for i in range(n)]
    return [np.array(t.split(), float).reshape(-1, 5) for t in texts]


def test_digit_and_photo_pools_are_disjoint(source):
    digits, photos = load_source(source)
    sheet = cv2.imread(str(source / 'digits.png'), cv2.IMREAD_GRAYSCALE)
    assert [len(digits[s]) for s in ('train', 'valid')] == [4000, 1000]
    train = {cell.tobytes() for _, cell in digits['train']}
    valid = {cell.tobytes() for _, cell in digits['valid']}
    assert len(train) == 4000 and len(valid) == 1000 and not train & valid
    # the valid pool is the last row of each class's five rows
    last_rows = {sheet[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL].tobytes()
                 for r in range(4, GRID_ROWS, 5) for c in range(GRID_COLS)}
    assert valid == last_rows
    for split in ('train', 'valid'):
        assert [c for c, _ in digits[split]].count(3) == len(digits[split]) // 10
    assert [len(photos[s]) for s in ('train', 'valid')] == [1, 1]
    assert not set(make_digits.PHOTOS_TRAIN) & set(make_digits.PHOTOS_VALID)


def test_each_split_draws_only_from_its_pools(source, tmp_path, monkeypatch):
    seen = {}
    real = make_digits.render_scene

    def spy(rng, digits, photos, *args, **kwargs):
        seen.setdefault(id(digits), (digits, photos))
        return real(rng, digits, photos, *args, **kwargs)

    monkeypatch.setattr(make_digits, 'render_scene', spy)
    generate(tmp_path, source, n_train=3, n_valid=3, img_size=64, progress=False)
    pools = list(seen.values())
    assert len(pools) == 2
    (d1, p1), (d2, p2) = pools
    assert not {c.tobytes() for _, c in d1} & {c.tobytes() for _, c in d2}
    assert p1[0].shape != p2[0].shape  # the two photos (200x300 and 240x180)


def test_labels_well_formed_and_all_classes_present(source, tmp_path):
    root = generate(tmp_path, source, seed=0, n_train=40, n_valid=10, img_size=128,
                    progress=False).parent
    labels = _labels(root, 'train') + _labels(root, 'valid')
    counts = [len(l) for l in labels]
    assert min(counts) >= 1 and max(counts) <= MAX_OBJECTS and len(set(counts)) >= 3
    allv = np.concatenate(labels)
    assert set(allv[:, 0].astype(int)) == set(range(10))
    assert np.all(allv[:, 0] == allv[:, 0].round())
    assert allv[:, 1:].min() >= 0 and allv[:, 1:].max() <= 1 and allv[:, 3:].min() > 0
    x1, x2 = allv[:, 1] - allv[:, 3] / 2, allv[:, 1] + allv[:, 3] / 2
    y1, y2 = allv[:, 2] - allv[:, 4] / 2, allv[:, 2] + allv[:, 4] / 2
    assert min(x1.min(), y1.min()) >= 0 and max(x2.max(), y2.max()) <= 1
    height = allv[:, 4] * 128  # ink height MIN_BOX..MAX_BOX, a little more when rotated
    assert height.min() >= MIN_BOX - 2 and height.max() <= MAX_BOX * 1.25
    assert height.max() - height.min() > (MAX_BOX - MIN_BOX) / 2  # the sizes vary
    for split in ('train', 'valid'):
        for line in (root / f'{split}.txt').read_text().split():
            img = cv2.imread(str(root / line))
            assert img is not None and img.shape == (128, 128, 3)
    assert (root / 'digits.names').read_text().split() == list(CLASS_NAMES)
    data = dict(l.split('=', 1) for l in (root / 'digits.data').read_text().split())
    assert data['classes'] == '10'
    assert all(Path(data[k]).is_absolute() and Path(data[k]).is_file()
               for k in ('train', 'valid', 'names'))


def test_boxes_are_tight_on_the_pasted_ink(source):
    digits, photos = load_source(source)
    n_boxes = 0
    for i in range(30):
        rng = np.random.default_rng([5, i])
        img, labels, background = render_scene(rng, digits['train'], photos['train'], 96,
                                               effects=False)
        diff = np.abs(img.astype(int) - background.astype(int)).max(2)
        inside = np.zeros(diff.shape, bool)
        for _, cx, cy, bw, bh in labels:
            x1, x2 = round((cx - bw / 2) * 96), round((cx + bw / 2) * 96)
            y1, y2 = round((cy - bh / 2) * 96), round((cy + bh / 2) * 96)
            inside[y1:y2, x1:x2] = True
            # every side of the box touches ink
            assert diff[y1, x1:x2].max() > 3 and diff[y2 - 1, x1:x2].max() > 3
            assert diff[y1:y2, x1].max() > 3 and diff[y1:y2, x2 - 1].max() > 3
            n_boxes += 1
        assert diff[~inside].max() <= 0.4 * 255  # only faint anti-aliasing outside boxes
        assert diff[inside].mean() > 5 * max(diff[~inside].mean(), 0.5)
    assert n_boxes > 40


def test_same_seed_same_bytes_and_tarball_equals_folder(source, tmp_path):
    a = _files(generate(tmp_path / 'a', source, seed=3, n_train=6, n_valid=3, img_size=64,
                        progress=False).parent)
    b = _files(generate(tmp_path / 'b', source, seed=3, n_train=6, n_valid=3, img_size=64,
                        progress=False).parent)
    c = _files(generate(tmp_path / 'c', source, seed=4, n_train=6, n_valid=3, img_size=64,
                        progress=False).parent)
    assert len(a) == 2 * (6 + 3) + 3  # images, labels, two lists and the names file
    assert a == b
    images = [k for k in a if k.startswith('images/')]
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in images)
    # the same files read straight from an sdist-like tarball
    tgz = tmp_path / 'opencv-python-headless-0.0.tar.gz'
    with tarfile.open(tgz, 'w:gz') as tar:
        for p in sorted(source.iterdir()):
            tar.add(p, arcname=f'opencv-python-headless-0.0/opencv/samples/data/{p.name}')
    d = _files(generate(tmp_path / 'd', tgz, seed=3, n_train=6, n_valid=3, img_size=64,
                        progress=False).parent)
    assert d == a


def test_missing_source_is_one_line_error(source, tmp_path, capsys):
    with pytest.raises(UserInputError, match='no such file'):
        load_source(tmp_path / 'nowhere.tar.gz')
    empty = tmp_path / 'empty'
    empty.mkdir()
    cv2.imwrite(str(empty / TRAIN_PHOTO), _photo(1, 50, 50))
    with pytest.raises(UserInputError, match='no digits.png'):
        load_source(empty)
    no_photos = tmp_path / 'no_photos'
    no_photos.mkdir()
    (no_photos / 'digits.png').write_bytes((source / 'digits.png').read_bytes())
    cv2.imwrite(str(no_photos / TRAIN_PHOTO), _photo(1, 50, 50))
    with pytest.raises(UserInputError, match='valid photos'):
        load_source(no_photos)
    not_tar = tmp_path / 'junk.tar.gz'
    not_tar.write_bytes(b'not a tarball')
    with pytest.raises(UserInputError, match='tar'):
        load_source(not_tar)
    # from the command line: exit 2 and one line on stderr, no traceback
    with pytest.raises(SystemExit) as exc:
        make_digits.run_cli(make_digits.main, ['--source', str(empty), '--out',
                                               str(tmp_path / 'out')])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: ') and 'digits.png' in err
