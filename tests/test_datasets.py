"""Darknet data loading: paths, letterbox geometry, augmentation, rect batches, checks."""
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data.datasets import (LetterboxInfo, LoadImagesAndLabels, check_dataset, collate_fn,
                           create_dataloader, image_size, img2label_path, letterbox, load_image)
from data.make_shapes import generate
from evaluation.metrics import scale_boxes_to_original
from utils.errors import UserInputError


def _write_set(root, images, name='list.txt'):
    """Write images and labels in the Darknet layout; images: {name: (img, label text)}."""
    (root / 'images').mkdir(parents=True, exist_ok=True)
    (root / 'labels').mkdir(parents=True, exist_ok=True)
    lines = []
    for fname, (img, labels) in images.items():
        cv2.imwrite(str(root / 'images' / fname), img)
        if labels is not None:
            (root / 'labels' / Path(fname).with_suffix('.txt')).write_text(labels)
        lines.append(f'images/{fname}')
    (root / name).write_text('\n'.join(lines) + '\n')
    return root / name


def _rect_image(h, w, x1, y1, x2, y2):
    """Black image with a white rectangle over pixels [x1, x2) x [y1, y2), and its label."""
    img = np.zeros((h, w, 3), np.uint8)
    img[y1:y2, x1:x2] = 255
    label = f'0 {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}\n'
    return img, label


def _white_box(img_chw):
    """Pixel-edge bounds x1, y1, x2, y2 of the white pixels of a (3, H, W) tensor in [0, 1]."""
    ys, xs = np.nonzero((img_chw.min(0).values > 0.5).numpy())
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


def _target_box(t, h, w):
    _, _, cx, cy, bw, bh = t.tolist()
    return np.array([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])


def test_label_path_replaces_last_images_folder():
    assert img2label_path('/d/images/train/a.jpg') == '/d/labels/train/a.txt'
    assert img2label_path('/d/images/x/images/b.png') == '/d/images/x/labels/b.txt'
    assert img2label_path('rel/images/c.jpeg') == 'rel/labels/c.txt'
    assert img2label_path('/data/images/images.jpg') == '/data/labels/images.txt'
    assert img2label_path('/d/imgs/a.jpg') == '/d/imgs/a.txt'  # no images folder: beside it
    assert img2label_path('/d/my_images/a.jpg') == '/d/my_images/a.txt'


def test_list_paths_absolute_cwd_and_list_relative(tmp_path, monkeypatch):
    img, lab = _rect_image(32, 32, 4, 4, 20, 20)
    _write_set(tmp_path / 'set', {'a.jpg': (img, lab), 'b.jpg': (img, lab), 'c.jpg': (img, None)})
    sub = tmp_path / 'set' / 'lists'
    sub.mkdir()
    lst = sub / 'mixed.txt'
    lst.write_text(f'{tmp_path}/set/images/a.jpg\n\nset/images/b.jpg\n../images/c.jpg\n')
    monkeypatch.chdir(tmp_path)  # b is relative to the current folder, c to the list's
    index = check_dataset(lst, 1)
    assert [Path(p).name for p in index.img_files] == ['a.jpg', 'b.jpg', 'c.jpg']
    assert [len(l) for l in index.labels] == [1, 1, 0]  # no label file: no objects
    assert index.shapes.tolist() == [[32, 32]] * 3


def test_image_size_from_headers_matches_decoding(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (37, 53, 3), np.uint8)
    for ext in ('.jpg', '.png', '.bmp'):
        path = tmp_path / f'x{ext}'
        cv2.imwrite(str(path), img)
        assert image_size(path) == (37, 53)
    # a progressive JPEG has its frame header in another SOF marker
    cv2.imwrite(str(tmp_path / 'p.jpg'), img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert image_size(tmp_path / 'p.jpg') == (37, 53)


def test_letterbox_maps_boxes_and_back(tmp_path):
    img, lab = _rect_image(50, 90, 20, 10, 51, 31)  # 90 wide, 50 tall
    lst = _write_set(tmp_path, {'a.png': (img, lab)})
    ds = LoadImagesAndLabels(lst, img_size=64, num_classes=1)
    x, targets, path, info = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert info == LetterboxInfo((50, 90), (64 / 90, 36 / 50), (0, 14))
    assert torch.allclose(x[:, 0, 0], torch.full((3,), 114 / 255))  # padding
    assert torch.allclose(x[:, 63, 63], torch.full((3,), 114 / 255))
    assert targets.shape == (1, 6) and targets[0, 1] == 0
    box = _target_box(targets[0], 64, 64)
    assert np.abs(box - _white_box(x)).max() <= 1.0
    # and back to the original pixels
    orig = scale_boxes_to_original(torch.tensor(box[None]), info)[0].numpy()
    assert np.abs(orig - [20, 10, 51, 31]).max() <= 0.01


def test_letterbox_channel_order_is_rgb(tmp_path):
    img = np.zeros((16, 16, 3), np.uint8)
    img[..., 2] = 255  # red in OpenCV's BGR
    lst = _write_set(tmp_path, {'r.png': (img, '')})
    x = LoadImagesAndLabels(lst, img_size=32)[0][0]
    assert x[0].min() == 1.0 and x[1].max() == 0.0 and x[2].max() == 0.0


def test_augmentation_keeps_boxes_on_the_shape(tmp_path):
    rects = {'a.png': _rect_image(96, 96, 30, 40, 70, 60),
             'b.png': _rect_image(96, 128, 0, 10, 25, 50),    # touches the border
             'c.png': _rect_image(120, 80, 50, 90, 78, 118),
             'd.png': _rect_image(96, 96, 44, 44, 52, 52)}    # small
    lst = _write_set(tmp_path, rects)
    hyp = dict(hsv_h=0, hsv_s=0, hsv_v=0, degrees=0, shear=0, translate=0.3, scale=0.5,
               fliplr=0.5)
    ds = LoadImagesAndLabels(lst, img_size=96, augment=True, hyp=hyp, num_classes=1)
    torch.manual_seed(0)
    kept = 0
    for _ in range(15):
        for i in range(len(ds)):
            x, targets, _, _ = ds[i]
            white = _white_box(x)
            if len(targets):
                kept += 1
                assert np.abs(_target_box(targets[0], 96, 96) - white).max() <= 2.0
            elif white is not None:  # dropped: little of the shape is left in view
                w, h = white[2] - white[0], white[3] - white[1]
                assert min(w, h) <= 3 or w * h < 0.3 * 1.5 ** 2 * 40 * 20
    assert kept > 40

    # with rotation and shear the box still encloses every white pixel
    hyp.update(degrees=30, shear=5)
    ds = LoadImagesAndLabels(lst, img_size=96, augment=True, hyp=hyp, num_classes=1)
    for _ in range(10):
        x, targets, _, _ = ds[0]
        if len(targets):
            box, white = _target_box(targets[0], 96, 96), _white_box(x)
            assert (box[:2] <= white[:2] + 1.0).all() and (box[2:] >= white[2:] - 1.0).all()


def test_augmentation_reproducible_under_manual_seed(tmp_path):
    lst = _write_set(tmp_path, {'a.png': _rect_image(64, 64, 10, 10, 40, 30)})
    ds = LoadImagesAndLabels(lst, img_size=64, augment=True)
    torch.manual_seed(5)
    a = ds[0]
    torch.manual_seed(5)
    b = ds[0]
    c = ds[0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(b[0], c[0])


def test_rect_batches_are_smallest_stride_multiples(tmp_path):
    sizes = [(50, 100), (100, 50), (80, 80), (40, 120), (120, 40), (48, 64), (90, 30)]  # (h, w)
    images = {f'{i}.png': _rect_image(h, w, 0, 0, w // 2, h // 2) for i, (h, w) in enumerate(sizes)}
    lst = _write_set(tmp_path, images)
    loader, ds = create_dataloader(lst, 64, 3, 1, rect=True, shuffle=True)
    ratios = [h / w for h, w in ds.shapes]
    assert ratios == sorted(ratios)
    seen = 0
    for b, (x, targets, paths, infos) in enumerate(loader):
        hw = []
        for info in infos:
            h0, w0 = info.orig_shape
            r = 64 / max(h0, w0)
            hw.append((round(h0 * r), round(w0 * r)))
            assert info.ratio == pytest.approx((round(w0 * r) / w0, round(h0 * r) / h0))
        want = [math.ceil(max(v[k] for v in hw) / 32) * 32 for k in (0, 1)]
        assert list(x.shape[2:]) == want
        assert max(want) == 64 and min(want) in (32, 64)
        assert targets[:, 0].tolist() == list(range(len(paths)))  # one box per image
        for t in targets:  # the label still bounds the white quarter of its image
            img = x[int(t[0])]
            assert np.abs(_target_box(t, *img.shape[1:]) - _white_box(img)).max() <= 1.0
        seen += len(paths)
    assert seen == len(sizes)


def _bad_set(tmp_path, label_text, num_classes=3):
    img, good = _rect_image(32, 32, 4, 4, 20, 20)
    lst = _write_set(tmp_path, {'ok.png': (img, good), 'a.png': (img, good + label_text)})
    with pytest.raises(UserInputError) as e:
        check_dataset(lst, num_classes)
    msg = str(e.value)
    assert '\n' not in msg
    assert 'Fix' in msg
    return msg


@pytest.mark.parametrize('line, expect', [
    ('0 0.5 0.5 0.2\n', '5 numbers'),
    ('0 0.5 0.5 0.2 0.2 7\n', '5 numbers'),
    ('3 0.5 0.5 0.2 0.2\n', 'class 3 is not below classes=3'),
    ('1.5 0.5 0.5 0.2 0.2\n', 'class 1.5 is not a non-negative integer'),
    ('-1 0.5 0.5 0.2 0.2\n', 'class -1'),
    ('0 1.5 0.5 0.2 0.2\n', 'cx=1.5 outside [0, 1]'),
    ('0 0.5 -0.01 0.2 0.2\n', 'cy=-0.01 outside [0, 1]'),
    ('0 0.5 0.5 0 0.2\n', 'not positive'),
    ('0 0.5 0.5 0.2 -0.2\n', 'h=-0.2 outside'),
    ('0 0.5 0.5 abc 0.2\n', 'not a number'),
    ('0 0.5 nan 0.2 0.2\n', 'non-finite'),
])
def test_check_dataset_names_file_and_line(tmp_path, line, expect):
    msg = _bad_set(tmp_path, line)
    assert f'{tmp_path}/labels/a.txt:2: ' in msg
    assert expect in msg
    assert 'ok.txt' not in msg


def test_check_dataset_tolerates_rounding(tmp_path):
    img, _ = _rect_image(32, 32, 4, 4, 20, 20)
    lst = _write_set(tmp_path, {'a.png': (img, '0 1.0000004 0.5 0.2 0.2\n\n  \n')})
    index = check_dataset(lst, 1)
    assert index.labels[0].tolist() == [[0, 1, 0.5, pytest.approx(0.2), pytest.approx(0.2)]]


def test_check_dataset_bad_images_and_lists(tmp_path):
    img, lab = _rect_image(32, 32, 4, 4, 20, 20)
    lst = _write_set(tmp_path, {'a.jpg': (img, lab), 'b.jpg': (img, lab), 'c.jpg': (img, lab)})
    (tmp_path / 'images' / 'b.jpg').write_bytes(b'not an image at all' * 10)
    (tmp_path / 'images' / 'c.jpg').write_bytes(b'')
    lst.write_text(lst.read_text() + 'images/missing.jpg\n')
    with pytest.raises(UserInputError) as e:
        check_dataset(lst, 1)
    msg = str(e.value)
    assert f'{lst}:2: cannot read image' in msg and 'b.jpg' in msg
    assert f'{lst}:3: cannot read image' in msg and 'empty file' in msg
    assert f"{lst}:4: image 'images/missing.jpg' not found" in msg
    assert f'{lst}:1' not in msg

    empty = tmp_path / 'empty.txt'
    empty.write_text('\n\n')
    with pytest.raises(UserInputError, match='empty.txt: no image paths'):
        check_dataset(empty, 1)
    with pytest.raises(UserInputError, match='nothere.txt: list file not found'):
        check_dataset(tmp_path / 'nothere.txt', 1)


def test_check_dataset_caps_the_report(tmp_path):
    msg = _bad_set(tmp_path, '9 0.5 0.5 0.2 0.2\n' * 25)
    assert msg.startswith('25 problem(s)')
    assert 'a.txt:21:' in msg and 'a.txt:22:' not in msg
    assert '; ... and 5 more' in msg


def test_load_image_refuses_undecodable_file(tmp_path):
    bad = tmp_path / 'x.jpg'
    bad.write_bytes(b'\xff\xd8\xff\xc0\x00\x11\x08\x00\x10\x00\x10' + b'\x00' * 20)
    assert image_size(bad) == (16, 16)  # the header is fine ...
    with pytest.raises(UserInputError, match='x.jpg: cannot decode'):  # ... the data is not
        load_image(bad)


def test_loader_on_generated_shapes(tmp_path):
    data = generate(tmp_path, seed=0, n_train=16, n_valid=4, img_size=96, workers=1,
                    progress=False)
    loader, ds = create_dataloader(data.parent / 'train.txt', 96, 4, 4, augment=True,
                                   workers=1, shuffle=True)
    n_img, n_boxes = 0, 0
    for x, targets, paths, infos in loader:
        assert x.shape[1:] == (3, 96, 96) and 0 <= x.min() and x.max() <= 1
        assert targets.shape[1] == 6
        assert set(targets[:, 0].long().tolist()) <= set(range(len(paths)))
        assert (targets[:, 2:] >= 0).all() and (targets[:, 2:] <= 1).all()
        assert (targets[:, 4:] > 0).all()
        n_img, n_boxes = n_img + len(paths), n_boxes + len(targets)
    assert n_img == 16 and n_boxes > 16
    assert sum(len(l) for l in ds.labels) >= n_boxes * 0.5


def test_collate_sets_batch_index():
    items = [(torch.zeros(3, 8, 8), torch.ones(k, 6), f'p{k}', None) for k in (2, 0, 3)]
    x, t, paths, infos = collate_fn(items)
    assert x.shape == (3, 3, 8, 8)
    assert t[:, 0].tolist() == [0, 0, 2, 2, 2]
    assert paths == ('p2', 'p0', 'p3')


def test_create_dataloader_refuses_bad_sizes(tmp_path):
    lst = _write_set(tmp_path, {'a.png': _rect_image(32, 32, 4, 4, 20, 20)})
    with pytest.raises(UserInputError, match='--img-size 100 is not a multiple'):
        create_dataloader(lst, 100, 2, 1)
    with pytest.raises(UserInputError, match='--batch-size'):
        create_dataloader(lst, 64, 0, 1)


def test_letterbox_function_pads_centred():
    img = np.full((10, 40, 3), 7, np.uint8)
    out, info = letterbox(img, (32, 64))
    assert out.shape == (32, 64, 3)
    assert info == LetterboxInfo((10, 40), (64 / 40, 16 / 10), (0, 8))
    assert (out[8:24] == 7).all() and (out[:8] == 114).all() and (out[24:] == 114).all()
