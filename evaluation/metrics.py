"""Boxes, non-maximum suppression, detection matching and average precision.

Conventions: boxes are x1, y1, x2, y2 in pixels unless a name says xywh (centre, size).
Detections are (n, 6) rows x1, y1, x2, y2, score, class. Ground truth rows for matching
are (m, 5) class, x1, y1, x2, y2, in the same pixels as the detections.

Evaluation as test.py runs it: decoded model output -> `non_max_suppression` ->
`match_detections` per image against its labels -> concatenate over the set ->
`ap_per_class`. The matching is COCO's greedy one and the AP the continuous area under
the precision envelope, which agrees with pycocotools' 101-point AP to about 0.01.
"""
from typing import NamedTuple

import cv2
import numpy as np
import torch

IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10, dtype=torch.float64)  # COCO's 0.50:0.05:0.95


# ---------------------------------------------------------------------------- boxes

def xywh2xyxy(x):
    """(..., 4) centre x, centre y, w, h -> x1, y1, x2, y2 (torch or numpy)."""
    xy, half = x[..., :2], x[..., 2:4] / 2
    if isinstance(x, torch.Tensor):
        return torch.cat((xy - half, xy + half), -1)
    return np.concatenate((xy - half, xy + half), -1)


def xyxy2xywh(x):
    """(..., 4) x1, y1, x2, y2 -> centre x, centre y, w, h (torch or numpy)."""
    low, high = x[..., :2], x[..., 2:4]
    if isinstance(x, torch.Tensor):
        return torch.cat(((low + high) / 2, high - low), -1)
    return np.concatenate(((low + high) / 2, high - low), -1)


def box_iou(box1, box2):
    """IoU of every pair: box1 (N, 4), box2 (M, 4) x1y1x2y2 -> (N, M). 0 where both are empty."""
    area1 = (box1[:, 2] - box1[:, 0]).clamp(min=0) * (box1[:, 3] - box1[:, 1]).clamp(min=0)
    area2 = (box2[:, 2] - box2[:, 0]).clamp(min=0) * (box2[:, 3] - box2[:, 1]).clamp(min=0)
    lt = torch.max(box1[:, None, :2], box2[None, :, :2])  # (N, M, 2)
    rb = torch.min(box1[:, None, 2:], box2[None, :, 2:])  # (N, M, 2)
    inter = (rb - lt).clamp(min=0).prod(2)                # (N, M)
    union = area1[:, None] + area2[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny),
                       torch.zeros_like(inter))


# ---------------------------------------------------------------------------- NMS

def _nms_class_aware(boxes, scores, classes, iou_thres):
    """Indices kept by greedy NMS within each class, highest score first.

    The classes are moved apart so that boxes of different classes never overlap, then
    OpenCV's NMS runs once over all of them. The shift is done here, from non-negative
    coordinates: OpenCV's own NMSBoxesBatched offsets by the largest coordinate only and
    lets classes meet when boxes reach below zero.
    """
    b = boxes.detach().to('cpu', torch.float64).numpy()
    b = b - b.min()  # IoU is shift invariant; now all coordinates are >= 0
    offset = classes.detach().to('cpu', torch.float64).numpy()[:, None] * (b.max() + 1)
    b = b + offset
    xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], 1)  # OpenCV wants x, y, w, h
    s = scores.detach().to('cpu', torch.float32).numpy()
    # score_threshold 0: OpenCV keeps scores > 0, and every score here is above conf_thres
    keep = cv2.dnn.NMSBoxes(xywh, s, 0.0, float(iou_thres))
    return torch.as_tensor(np.asarray(keep, np.int64).reshape(-1), device=boxes.device)


def non_max_suppression(pred, conf_thres=0.001, iou_thres=0.5, max_det=300, multi_label=False,
                        max_nms=30000):
    """Filter decoded predictions to detections, per image.

    pred: (B, N, 5 + C) rows x, y, w, h (box centre and size in input pixels),
    objectness, C class probabilities (after sigmoid). A box's score for a class is
    objectness * class probability. By default each box keeps its best class only;
    `multi_label=True` keeps every class whose score passes `conf_thres` (a few points
    more mAP, more boxes). Boxes with score <= conf_thres are dropped, then greedy NMS
    runs within each class (a box is suppressed by a higher-scored box of its class with
    IoU > iou_thres); at most `max_nms` boxes enter NMS and `max_det` leave it.

    Returns a list of B tensors (n, 6): x1, y1, x2, y2, score, class, by score, on the
    device of `pred`.
    """
    out = []
    for x in pred:  # (N, 5 + C) one image
        x = x[x[:, 4] > conf_thres]  # objectness bounds every score: a cheap first cut
        scores = x[:, 5:] * x[:, 4:5]  # (n, C)
        boxes = xywh2xyxy(x[:, :4])
        if multi_label:
            i, j = (scores > conf_thres).nonzero(as_tuple=True)
            det = torch.cat([boxes[i], scores[i, j, None], j[:, None].to(x.dtype)], 1)
        else:
            conf, j = scores.max(1, keepdim=True)
            det = torch.cat([boxes, conf, j.to(x.dtype)], 1)[conf[:, 0] > conf_thres]
        if len(det) == 0:
            out.append(det.new_zeros((0, 6)))
            continue
        if len(det) > max_nms:
            det = det[det[:, 4].argsort(descending=True)[:max_nms]]
        keep = _nms_class_aware(det[:, :4], det[:, 4], det[:, 5], iou_thres)
        out.append(det[keep[:max_det]])
    return out


def scale_boxes_to_original(boxes, info):
    """Map x1y1x2y2 boxes from a letterboxed image back to the original's pixels.

    info: a data.datasets.LetterboxInfo, or the tuple ((h0, w0), (rw, rh), (left, top)).
    Returns a new tensor (or array), clipped to the original image.
    """
    (h0, w0), (rw, rh), (left, top) = info
    y = boxes.clone() if isinstance(boxes, torch.Tensor) else np.array(boxes, copy=True)
    y[:, [0, 2]] = ((y[:, [0, 2]] - left) / rw).clip(0, w0)
    y[:, [1, 3]] = ((y[:, [1, 3]] - top) / rh).clip(0, h0)
    return y


# ---------------------------------------------------------------------------- matching

def match_detections(detections, labels, iouv=IOU_THRESHOLDS):
    """Greedy COCO matching of one image's detections to its ground truth.

    detections (n, 6) x1, y1, x2, y2, score, class; labels (m, 5) class, x1, y1, x2, y2;
    iouv (t,) IoU thresholds. For each threshold separately, detections are visited by
    descending score and each takes the still unmatched ground truth of its class with
    the highest IoU >= threshold. Returns (n, t) bool: detection i is a true positive at
    threshold j. The loop visits only detections that overlap some ground truth of their
    class enough to match; the thresholds are handled together.
    """
    n, t = len(detections), len(iouv)
    correct = np.zeros((n, t), bool)
    if n == 0 or len(labels) == 0:
        return torch.as_tensor(correct, device=detections.device)
    iou = box_iou(detections[:, :4].double(), labels[:, 1:].double())  # (n, m)
    same = detections[:, 5:6] == labels[None, :, 0]                     # (n, m)
    iou = torch.where(same, iou, torch.zeros_like(iou)).cpu().numpy()
    thr = iouv.double().cpu().numpy()                                   # (t,)
    order = np.argsort(-detections[:, 4].cpu().numpy(), kind='stable')
    candidates = order[(iou[order] >= thr.min()).any(1)]
    free = np.ones((t, iou.shape[1]), bool)   # ground truth still unmatched, per threshold
    rows = np.arange(t)
    for d in candidates:
        ok = (iou[d][None, :] >= thr[:, None]) & free     # (t, m)
        scored = np.where(ok, iou[d][None, :], -1.0)
        best = scored.argmax(1)                            # (t,)
        hit = ok[rows, best]
        free[rows[hit], best[hit]] = False
        correct[d] = hit
    return torch.as_tensor(correct, device=detections.device)


# ---------------------------------------------------------------------------- AP

class ClassMetrics(NamedTuple):
    """Per-class results of `ap_per_class`, each (k,) over `classes` unless noted."""
    classes: np.ndarray     # class ids that have ground truth, ascending
    precision: np.ndarray   # at the operating confidence
    recall: np.ndarray      # at the operating confidence
    f1: np.ndarray          # at the operating confidence
    ap50: np.ndarray        # AP at IoU 0.5 (the first threshold)
    ap: np.ndarray          # (k, t) AP at every threshold; ap.mean(1) is AP@0.5:0.95
    conf: float             # operating confidence: the one maximising mean F1 at IoU 0.5

    @property
    def ap50_95(self):
        """(k,) AP averaged over the IoU thresholds (COCO's AP@0.5:0.95 with 10 of them)."""
        return self.ap.mean(1)


def compute_ap(recall, precision):
    """Area under the precision envelope of one recall/precision curve (continuous VOC).

    recall, precision: (n,) cumulative values over detections sorted by score.
    """
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))  # envelope: max to the right
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]               # where recall steps up
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def ap_per_class(tp, conf, pred_cls, target_cls, eps=1e-16):
    """Precision, recall, F1 and AP per class from matched detections of a whole set.

    Arrays may be numpy or CPU tensors. tp: (n, t) or (n,) bool, detection i is a true
    positive at IoU threshold j;
    conf: (n,) scores; pred_cls: (n,) classes of the detections; target_cls: (g,)
    classes of all ground truth boxes. Classes without ground truth are left out
    (their detections count against nothing), as pycocotools does. P, R and F1 are
    read at one confidence for all classes, the one that maximises the mean F1 at the
    first IoU threshold (searched on a 0.001 grid).
    """
    tp, conf = np.asarray(tp, bool), np.asarray(conf, np.float64)
    pred_cls, target_cls = np.asarray(pred_cls), np.asarray(target_cls)
    if tp.ndim == 1:
        tp = tp[:, None]
    order = np.argsort(-conf, kind='stable')
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]

    classes, n_gt = np.unique(target_cls, return_counts=True)
    k, t = len(classes), tp.shape[1]
    grid = np.linspace(0, 1, 1001)   # candidate operating confidences
    ap = np.zeros((k, t))
    p_grid, r_grid = np.zeros((k, len(grid))), np.zeros((k, len(grid)))
    for ci, c in enumerate(classes):
        sel = pred_cls == c
        if not sel.any():
            continue
        tpc = np.cumsum(tp[sel], 0)                     # (n_c, t)
        fpc = np.cumsum(~tp[sel], 0)
        recall = tpc / (n_gt[ci] + eps)
        precision = tpc / (tpc + fpc)
        for j in range(t):
            ap[ci, j] = compute_ap(recall[:, j], precision[:, j])
        # detections with score >= g for every grid value g (conf sorted descending)
        count = np.searchsorted(-conf[sel], -grid, side='right')   # (len(grid),)
        has = count > 0
        p_grid[ci, has] = precision[count[has] - 1, 0]
        r_grid[ci, has] = recall[count[has] - 1, 0]

    f1_grid = 2 * p_grid * r_grid / (p_grid + r_grid + eps)
    best = int(f1_grid.mean(0).argmax()) if k else 0
    return ClassMetrics(classes, p_grid[:, best], r_grid[:, best], f1_grid[:, best],
                        ap[:, 0], ap, float(grid[best]))
