"""evaluate() scores the boxes a user gets: detections are mapped to original image pixels
and clipped to the image before matching, as --save-json writes them and pycocotools
reads them. (Matched unclipped in letterboxed pixels, a box reaching into the padding
lost IoU its saved copy has: test.py's mAP was 0.017 below pycocotools' on the same
rows.)"""
import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data.datasets import letterbox
from evaluation.evaluate import evaluate

H0, W0 = 50, 100      # the original image
SHAPE = (96, 128)     # the letterboxed input: scale 1.28, 16 px of padding above and below
# ground truth in original pixels: class 0 touches the left border, class 1 the top
TRUTH = [(0, 0.0, 10.0, 20.0, 40.0), (1, 50.0, 0.0, 80.0, 20.0)]
# detections in letterboxed pixels (x1, y1, x2, y2): each is its ground truth, stretched
# past the image into the padding (left of x 0: off the input; above y 16: padding)
DETECTIONS = [(0, -30.0, 28.8, 25.6, 67.2), (1, 64.0, 4.0, 102.4, 41.6)]


class FixedOutput(torch.nn.Module):
    """A 'model' whose decoded output (B, N, 5 + C) is fixed: x, y, w, h, objectness,
    class probabilities."""

    def __init__(self, rows):
        super().__init__()
        self.register_buffer('rows', torch.tensor(rows, dtype=torch.float32)[None])

    def forward(self, x):
        return self.rows.expand(len(x), -1, -1)


def _unclipped_iou(det, truth):
    (x1, y1, x2, y2), (a1, b1, a2, b2) = det, truth
    inter = max(0, min(x2, a2) - max(x1, a1)) * max(0, min(y2, b2) - max(y1, b1))
    return inter / ((x2 - x1) * (y2 - y1) + (a2 - a1) * (b2 - b1) - inter)


def test_detections_past_the_border_match_as_their_clipped_copies():
    _, info = letterbox(np.zeros((H0, W0, 3), np.uint8), SHAPE)
    (rw, rh), (left, top) = info.ratio, info.pad
    assert (rw, rh, left, top) == (1.28, 1.28, 0, 16)
    boxed = [(c, x1 * rw + left, y1 * rh + top, x2 * rw + left, y2 * rh + top)
             for c, x1, y1, x2, y2 in TRUTH]
    # unclipped, the first would miss at IoU 0.5 and the second at 0.7 and above
    ious = [_unclipped_iou(d[1:], t[1:]) for d, t in zip(DETECTIONS, boxed)]
    assert ious[0] < 0.5 and 0.5 < ious[1] < 0.7
    height, width = SHAPE
    targets = torch.tensor([[0, c, (x1 + x2) / 2 / width, (y1 + y2) / 2 / height,
                             (x2 - x1) / width, (y2 - y1) / height]
                            for c, x1, y1, x2, y2 in boxed])
    rows = [[(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, 0.9] + [float(c == k) for k in (0, 1)]
            for c, x1, y1, x2, y2 in DETECTIONS]
    loader = [(torch.zeros(1, 3, *SHAPE), targets, ['images/7.jpg'], [info])]
    result = evaluate(FixedOutput(rows), loader, 2, collect_json=True, progress=False)
    # clipped to the image, each detection is its ground truth: AP 1 at every threshold
    assert result.metrics['map50'] == pytest.approx(1.0)
    assert result.metrics['map50_95'] == pytest.approx(1.0)
    # pycocotools on the rows --save-json writes, against the truth in original pixels
    truth = {'images': [{'id': 7, 'height': H0, 'width': W0}], 'categories': [{'id': 0}, {'id': 1}],
             'annotations': [{'id': k + 1, 'image_id': 7, 'category_id': c, 'iscrowd': 0,
                              'bbox': [x1, y1, x2 - x1, y2 - y1], 'area': (x2 - x1) * (y2 - y1)}
                             for k, (c, x1, y1, x2, y2) in enumerate(TRUTH)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = truth
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(result.detections), 'bbox')
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[1] == pytest.approx(result.metrics['map50'], abs=1e-6)
    assert evaluation.stats[0] == pytest.approx(result.metrics['map50_95'], abs=1e-6)
