"""Boxes, NMS, matching and AP, each against a slow obvious version or pycocotools."""
import contextlib
import io
import os

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from evaluation.metrics import (IOU_THRESHOLDS, ap_per_class, box_iou, compute_ap, match_detections,
                                non_max_suppression, scale_boxes_to_original, xywh2xyxy, xyxy2xywh)


def _iou_slow(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _random_boxes(rng, n, size=100.0, low=-20.0):
    xy = rng.uniform(low, size, (n, 2))
    wh = rng.uniform(1, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], 1)


def test_box_iou_matches_slow_version():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 30), _random_boxes(rng, 20)
    b[:5] = a[:5]                 # identical pairs
    b[5] = [10, 10, 10, 30]       # empty box
    got = box_iou(torch.tensor(a), torch.tensor(b)).numpy()
    want = np.array([[_iou_slow(x, y) for y in b] for x in a])
    assert np.allclose(got, want, atol=1e-12)
    assert np.allclose(np.diag(got[:5, :5]), 1)
    assert box_iou(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 0  # empty vs empty


def test_xywh_round_trip():
    x = torch.tensor([[10.0, 20.0, 4.0, 6.0]])
    assert xywh2xyxy(x).tolist() == [[8.0, 17.0, 12.0, 23.0]]
    y = np.random.default_rng(1).uniform(0, 50, (7, 4))
    assert np.allclose(xyxy2xywh(xywh2xyxy(y)), y)


def _nms_slow(pred, conf_thres, iou_thres, multi_label):
    """Per image: scores, candidates, then the textbook greedy loop within each class."""
    out = []
    for x in pred.double().numpy():
        boxes = xywh2xyxy(x[:, :4])
        scores = x[:, 5:] * x[:, 4:5]
        cands = []
        for i in range(len(x)):
            if x[i, 4] <= conf_thres:
                continue
            classes = range(scores.shape[1]) if multi_label else [int(scores[i].argmax())]
            for c in classes:
                if scores[i, c] > conf_thres:
                    cands.append((scores[i, c], c, i))
        cands.sort(key=lambda t: -t[0])
        kept = []
        for s, c, i in cands:
            if all(kc != c or _iou_slow(boxes[i], boxes[ki]) <= iou_thres for _, kc, ki in kept):
                kept.append((s, c, i))
        out.append(np.array([[*boxes[i], s, c] for s, c, i in kept]).reshape(-1, 6))
    return out


@pytest.mark.parametrize('multi_label', [False, True])
def test_nms_matches_slow_greedy(multi_label):
    g = torch.Generator().manual_seed(0)
    b, n, nc = 3, 300, 3
    pred = torch.rand(b, n, 5 + nc, generator=g)
    pred[..., :2] = pred[..., :2] * 120 - 20   # centres, some below zero
    pred[..., 2:4] = pred[..., 2:4] * 60 + 2   # sizes, many boxes reach below zero
    for iou_thres in (0.3, 0.6):
        got = non_max_suppression(pred, conf_thres=0.1, iou_thres=iou_thres,
                                  max_det=10000, multi_label=multi_label)
        want = _nms_slow(pred, 0.1, iou_thres, multi_label)
        for gi, wi in zip(got, want):
            assert gi.shape == wi.shape and len(wi) > 10
            assert np.allclose(gi.double().numpy(), wi, atol=1e-4)


def test_nms_keeps_classes_apart_below_zero():
    # two identical boxes reaching below zero, different classes: both stay
    pred = torch.tensor([[[-10.0, -10.0, 60.0, 60.0, 0.9, 0.9, 0.1],
                          [-10.0, -10.0, 60.0, 60.0, 0.9, 0.1, 0.8],
                          [-11.0, -10.0, 60.0, 60.0, 0.9, 0.8, 0.1]]])
    det = non_max_suppression(pred, 0.01, 0.5)[0]
    assert det[:, 5].tolist() == [0.0, 1.0]
    assert det[:, 4].tolist() == pytest.approx([0.81, 0.72])


def test_nms_limits_and_empty():
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(2, 500, 7, generator=g)
    pred[..., :2] *= 1000
    pred[..., 2:4] = 5
    out = non_max_suppression(pred, 0.001, 0.5, max_det=50)
    assert [len(o) for o in out] == [50, 50]
    assert (out[0][1:, 4] <= out[0][:-1, 4]).all()  # by score
    pred[..., 4] = 0
    out = non_max_suppression(pred, 0.001, 0.5)
    assert [o.shape for o in out] == [(0, 6), (0, 6)]


def test_scale_boxes_to_original_inverts_the_letterbox():
    info = ((50, 90), (64 / 90, 36 / 50), (0, 14))
    orig = torch.tensor([[20.0, 10.0, 51.0, 31.0], [-5.0, 0.0, 100.0, 60.0]])
    lb = orig.clone()
    lb[:, [0, 2]] = lb[:, [0, 2]] * info[1][0] + info[2][0]
    lb[:, [1, 3]] = lb[:, [1, 3]] * info[1][1] + info[2][1]
    back = scale_boxes_to_original(lb, info)
    assert torch.allclose(back[0], orig[0], atol=1e-5)
    assert back[1].tolist() == pytest.approx([0, 0, 90, 50])  # clipped to the image


def _match_slow(dets, labels, thresholds):
    """For each threshold: by score, take the unmatched same-class GT of highest IoU >= t."""
    order = sorted(range(len(dets)), key=lambda i: -dets[i][4])
    correct = np.zeros((len(dets), len(thresholds)), bool)
    for j, t in enumerate(thresholds):
        used = set()
        for i in order:
            best, best_iou = None, -1.0
            for g, lab in enumerate(labels):
                if g in used or lab[0] != dets[i][5]:
                    continue
                iou = _iou_slow(dets[i][:4], lab[1:])
                if iou >= t and iou > best_iou:
                    best, best_iou = g, iou
            if best is not None:
                used.add(best)
                correct[i, j] = True
    return correct


def test_match_detections_small_cases():
    labels = torch.tensor([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30]], dtype=torch.float64)
    dets = torch.tensor([[0, 0, 10, 10, 0.5, 0],      # exact, but a better-scored twin
                         [0, 0, 10, 10, 0.9, 0],      # takes the GT first
                         [20, 20, 30, 30, 0.8, 0],    # right place, wrong class
                         [20, 20, 30, 35, 0.7, 1]],   # IoU 2/3
                        dtype=torch.float64)
    got = match_detections(dets, labels, torch.tensor([0.5, 0.7]))
    assert got.tolist() == [[False, False], [True, True], [False, False], [True, False]]
    assert match_detections(dets[:0], labels).shape == (0, 10)
    assert not match_detections(dets, labels[:0]).any()


def test_match_detections_matches_slow_version():
    rng = np.random.default_rng(2)
    for _ in range(20):
        gt = _random_boxes(rng, int(rng.integers(1, 8)))
        labels = np.concatenate([rng.integers(0, 2, (len(gt), 1)), gt], 1)
        # detections near the ground truth, some duplicated, plus noise boxes
        near = gt[rng.integers(0, len(gt), 15)] + rng.normal(0, 4, (15, 4))
        boxes = np.concatenate([near, _random_boxes(rng, 5)])
        dets = np.concatenate([boxes, rng.uniform(0, 1, (20, 1)), rng.integers(0, 2, (20, 1))], 1)
        got = match_detections(torch.tensor(dets), torch.tensor(labels), IOU_THRESHOLDS)
        want = _match_slow(dets, labels, IOU_THRESHOLDS.double().tolist())
        assert (got.numpy() == want).all()
        assert want.any()


def test_ap_hand_computed():
    # 2 ground truths; detections TP 0.9, FP 0.8, TP 0.7: recall 1/2 at P 1, 1 at P 2/3
    m = ap_per_class(np.array([True, False, True]), np.array([0.9, 0.8, 0.7]),
                     np.zeros(3), np.zeros(2))
    assert m.ap50[0] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert compute_ap(np.array([0.5, 0.5, 1.0]), np.array([1, 0.5, 2 / 3])) == pytest.approx(5 / 6)
    # best mean F1: keep all three (P 2/3, R 1, F1 0.8) rather than one (P 1, R 1/2)
    assert m.recall[0] == pytest.approx(1) and m.precision[0] == pytest.approx(2 / 3)
    assert m.f1[0] == pytest.approx(0.8) and m.conf <= 0.7
    # perfect detections; a class with ground truth and no detections scores 0
    m = ap_per_class(np.ones((4, 10), bool), np.linspace(0.9, 0.6, 4), np.zeros(4),
                     np.array([0, 0, 0, 0, 2]))
    assert m.classes.tolist() == [0, 2]
    assert m.ap50.tolist() == [1, 0] and m.ap50_95.tolist() == [1, 0]
    assert m.precision.tolist() == [1, 0] and m.recall.tolist() == [1, 0]


def _random_eval_set(seed, n_images=40, n_classes=3):
    """Ground truth and noisy detections: hits of varying quality, duplicates, misses,
    wrong classes and background false positives."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n_images):
        gt = _random_boxes(rng, int(rng.integers(0, 7)), size=300.0, low=0.0)
        gcls = rng.integers(0, n_classes, len(gt))
        dets = []
        for box, c in zip(gt, gcls):
            wh = box[2:] - box[:2]
            for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):  # misses and duplicates
                jitter = rng.normal(0, rng.uniform(0.02, 0.25), 4) * np.concatenate([wh, wh])
                cls = c if rng.random() < 0.9 else rng.integers(0, n_classes)
                dets.append([*(box + jitter), rng.beta(4, 2), cls])
        for box in _random_boxes(rng, int(rng.integers(0, 5)), size=300.0, low=0.0):
            dets.append([*box, rng.beta(2, 4), rng.integers(0, n_classes)])
        dets = np.array(dets, float).reshape(-1, 6)
        dets[:, [2, 3]] = np.maximum(dets[:, [2, 3]], dets[:, [0, 1]] + 1)
        images.append((np.concatenate([gcls[:, None], gt], 1), dets))
    return images


def _coco_ap(images):
    """(AP@0.5, AP@0.5:0.95) from pycocotools on the same ground truth and detections."""
    gt = {'images': [], 'annotations': [], 'categories': [{'id': c + 1} for c in range(3)]}
    dt = []
    for i, (labels, dets) in enumerate(images):
        gt['images'].append({'id': i})
        for c, x1, y1, x2, y2 in labels:
            gt['annotations'].append({'id': len(gt['annotations']) + 1, 'image_id': i,
                                      'category_id': int(c) + 1, 'iscrowd': 0,
                                      'bbox': [x1, y1, x2 - x1, y2 - y1],
                                      'area': (x2 - x1) * (y2 - y1)})
        for x1, y1, x2, y2, s, c in dets:
            dt.append({'image_id': i, 'category_id': int(c) + 1,
                       'bbox': [x1, y1, x2 - x1, y2 - y1], 'score': s})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(dt), 'bbox')
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[1], ev.stats[0]


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_map_agrees_with_pycocotools(seed):
    images = _random_eval_set(seed)
    tp, conf, pred_cls, target_cls = [], [], [], []
    for labels, dets in images:
        assert len(dets) <= 100  # pycocotools' default cap per image
        tp.append(match_detections(torch.tensor(dets), torch.tensor(labels), IOU_THRESHOLDS))
        conf.append(dets[:, 4])
        pred_cls.append(dets[:, 5])
        target_cls.append(labels[:, 0])
    m = ap_per_class(torch.cat(tp).numpy(), np.concatenate(conf), np.concatenate(pred_cls),
                     np.concatenate(target_cls))
    coco50, coco = _coco_ap(images)
    assert 0.2 < coco50 < 0.95 and coco < coco50  # a set that is neither trivial nor hopeless
    assert m.ap50.mean() == pytest.approx(coco50, abs=0.01)
    assert m.ap50_95.mean() == pytest.approx(coco, abs=0.02)


def _letterbox_by_hand(h0, w0, height, width):
    """((h0, w0), (rw, rh), (left, top)) of a centred letterbox into (height, width): the
    largest scale that fits, sides rounded to whole pixels, the odd pixel of padding on
    the right / bottom."""
    scale = min(height / h0, width / w0)
    w, h = min(width, round(w0 * scale)), min(height, round(h0 * scale))
    return (h0, w0), (w / w0, h / h0), ((width - w) // 2, (height - h) // 2)


def _letterboxed_eval_set(seed, shape=(64, 96), sizes=((50, 90), (120, 40), (77, 33),
                                                        (96, 96), (40, 200))):
    """Per image: (path, library LetterboxInfo, ground truth in original pixels, ground
    truth and detections in letterboxed pixels). Two classes with 25 boxes each; each
    class's top-scored detection is exact, the others jittered (IoUs across 0.5..1),
    duplicated or missing, plus background false positives. Boxes stay inside the image
    part of the letterbox, so no clipping tells the two roads apart."""
    from data.datasets import letterbox
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.repeat([0, 1], 25)).reshape(len(sizes), -1)
    out, exact_done = [], set()
    for k, ((h0, w0), image_classes) in enumerate(zip(sizes, classes)):
        _, info = letterbox(np.zeros((h0, w0, 3), np.uint8), shape)
        hand = _letterbox_by_hand(h0, w0, *shape)
        assert (tuple(info.orig_shape), tuple(info.ratio), tuple(info.pad)) == hand
        (_, _), (rw, rh), (left, top) = hand
        inside = np.array([left, top, left + rw * w0, top + rh * h0])
        wh0 = rng.uniform(0.2, 0.5, (len(image_classes), 2)) * [w0, h0]
        xy0 = rng.uniform(0, 1, (len(image_classes), 2)) * ([w0, h0] - wh0)
        truth = np.concatenate([xy0, xy0 + wh0], 1)                 # original pixels
        boxed = truth * [rw, rh, rw, rh] + [left, top, left, top]   # letterboxed pixels
        dets = []
        for box, c in zip(boxed, image_classes):
            if c not in exact_done:  # the class's best detection: exact
                exact_done.add(c)
                dets.append([*box, 0.999 - 0.0001 * c, c])
                continue
            size = np.tile(box[2:] - box[:2], 2)
            for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):
                jitter = rng.normal(0, rng.choice([0.02, 0.05, 0.12]), 4) * size
                dets.append([*(box + jitter), rng.uniform(0.05, 0.95), c])
        for _ in range(3):  # background
            x, y = rng.uniform(inside[:2], inside[2:] - 8)
            dets.append([x, y, x + 8, y + 8, rng.uniform(0.05, 0.95), rng.integers(0, 2)])
        dets = np.array(dets)
        dets[:, [0, 2]] = dets[:, [0, 2]].clip(inside[0], inside[2])
        dets[:, [1, 3]] = dets[:, [1, 3]].clip(inside[1], inside[3])
        labels = np.concatenate([image_classes[:, None], boxed], 1)
        out.append((f'images/{k}.jpg', info, truth, image_classes, labels, dets))
    return out


@pytest.mark.parametrize('seed', [0, 1])
def test_letterboxed_detections_map_back_to_original_pixels(seed):
    """Non-square images letterboxed into a 96x64 input. Our AP is computed where the
    model sees the boxes (letterboxed pixels, ground truth mapped there by hand);
    pycocotools scores test.py's --save-json rows (mapped back by the letterbox info)
    against ground truth in original pixels. With each class's best detection exact and
    25 boxes per class (recall steps of 0.04 sit on its 101-point grid, exactly in
    floating point too, which steps of 0.1 do not at 0.7), pycocotools' AP
    is (1 + 100 * continuous AP) / 101 at every IoU threshold; a mapping off by a
    fraction of a pixel changes the matches at the high thresholds."""
    from evaluation.evaluate import _coco_rows
    images = _letterboxed_eval_set(seed)
    tp, conf, pred_cls, target_cls, rows = [], [], [], [], []
    truth = {'images': [], 'annotations': [], 'categories': [{'id': 0}, {'id': 1}]}
    for path, info, boxes, classes, labels, dets in images:
        tp.append(match_detections(torch.tensor(dets), torch.tensor(labels), IOU_THRESHOLDS))
        conf.append(dets[:, 4])
        pred_cls.append(dets[:, 5])
        target_cls.append(labels[:, 0])
        rows += _coco_rows(torch.tensor(dets, dtype=torch.float32), path, info)
        image_id = int(os.path.splitext(os.path.basename(path))[0])
        truth['images'].append({'id': image_id, 'height': info.orig_shape[0],
                                'width': info.orig_shape[1]})
        for (x1, y1, x2, y2), c in zip(boxes, classes):
            truth['annotations'].append({'id': len(truth['annotations']) + 1,
                                         'image_id': image_id, 'category_id': int(c),
                                         'iscrowd': 0, 'area': (x2 - x1) * (y2 - y1),
                                         'bbox': [x1, y1, x2 - x1, y2 - y1]})
    ours = ap_per_class(torch.cat(tp).numpy(), np.concatenate(conf), np.concatenate(pred_cls),
                        np.concatenate(target_cls)).ap  # (classes, thresholds)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = truth
        coco_gt.createIndex()
        evaluation = COCOeval(coco_gt, coco_gt.loadRes(rows), 'bbox')
        evaluation.evaluate()
        evaluation.accumulate()
    # precision (thresholds, recall points, classes, area ranges, max dets): all areas, 100
    coco = evaluation.eval['precision'][:, :, :, 0, -1].mean(1).T  # (classes, thresholds)
    assert 0.3 < ours[:, 0].min() and ours[:, -1].max() < 0.9 * ours[:, 0].min()  # not trivial
    np.testing.assert_allclose(coco, (1 + 100 * ours) / 101, rtol=0, atol=1e-3)
