"""Evaluation: a model's detections on a data set scored against its labels.

`evaluate(model, dataloader, num_classes)` runs a Darknet model (as its fused copy) or
an exported ONNX file (`deploy.onnx_export.OnnxModel`) over the loader, NMS, matching at
IoU 0.5:0.05:0.95 in original image pixels (the detections clipped to the image, as
--save-json writes them), and returns an `Evaluation`: precision, recall, mAP@0.5 and
@0.5:0.95, F1, per-class rows and where the time went. test.py is its command; train.py calls it after
each epoch, the prune scripts on the model before and after pruning.
"""
import itertools
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from terminaltables import AsciiTable
from tqdm import tqdm

from darknet.model import Darknet
from evaluation.metrics import (ap_per_class, match_detections, non_max_suppression,
                                scale_boxes_to_original, xywh2xyxy)
from utils.torch_utils import time_sync


@dataclass
class Evaluation:
    """What `evaluate` measured: overall figures, per-class rows, and where time went."""
    metrics: dict                       # precision, recall, map50, map50_95, f1
    # (class id, images, targets, p, r, ap50, ap50_95, f1)
    per_class: list = field(default_factory=list)
    images: int = 0
    targets: int = 0
    seconds: dict = field(default_factory=dict)    # model, nms, matching, metrics
    detections: list = field(default_factory=list)  # COCO-style dicts, when asked

    def table(self, class_names=None):
        rows = [['Class', 'Images', 'Targets', 'P', 'R', 'mAP@0.5', 'mAP@0.5:0.95', 'F1']]
        m = self.metrics
        rows.append(['all', self.images, self.targets] +
                    [f'{m[k]:.3f}' for k in ('precision', 'recall', 'map50', 'map50_95', 'f1')])
        for c, images, targets, *values in self.per_class:
            name = class_names[c] if class_names and c < len(class_names) else str(c)
            rows.append([name, images, targets] + [f'{v:.3f}' for v in values])
        return AsciiTable(rows).table


def _image_id(path):
    stem = os.path.splitext(os.path.basename(path))[0]
    return int(stem) if stem.isdigit() else stem


def _coco_rows(detections, path, info=None):
    """COCO result dicts for one image, boxes in original image pixels (mapped there
    through the letterbox `info`; None: they are already)."""
    boxes = detections[:, :4] if info is None else scale_boxes_to_original(detections[:, :4],
                                                                            info)
    boxes = boxes.tolist()
    image_id = _image_id(path)
    return [{'image_id': image_id, 'category_id': int(cls), 'score': round(float(score), 5),
             'bbox': [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)]}
            for (x1, y1, x2, y2), score, cls in zip(boxes, detections[:, 4].tolist(),
                                                    detections[:, 5].tolist())]


def _original_pixels(detections, labels, info):
    """One image's detections (n, 6) and labels (m, 5) mapped from letterboxed to original
    pixels, detections clipped to the image. Matching there scores the boxes a user gets
    (and --save-json writes, and pycocotools reads): a box reaching into the letterbox
    padding would otherwise lose IoU that its clipped copy has."""
    boxes = scale_boxes_to_original(detections[:, :4], info)
    truth = scale_boxes_to_original(labels[:, 1:], info)
    return (torch.cat([boxes, detections[:, 4:]], 1), torch.cat([labels[:, :1], truth], 1))


def evaluate(model, dataloader, num_classes, conf_thres=0.001, iou_thres=0.5,
             collect_json=False, progress=True):
    """Run `model` over `dataloader` and score its detections against the labels. A
    Darknet model is run as its fused copy (BN folded into the convs, as deployed); an
    `OnnxModel` (an exported file in onnxruntime) goes through the same letterbox, NMS
    and metrics."""
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    was_training = model.training
    model.eval()
    net = model.fuse() if isinstance(model, Darknet) else model
    seconds = dict.fromkeys(('model', 'nms', 'matching', 'metrics'), 0.0)
    matched, images_with_class, detections_json = [], np.zeros(num_classes, int), []
    target_classes, images = [], 0
    bar = tqdm(dataloader, desc='evaluating', leave=False, disable=not progress)
    for imgs, targets, paths, infos in bar:
        start = time_sync(device)
        with torch.no_grad():
            predictions = net(imgs.to(device, non_blocking=True))
        after_model = time_sync(device)
        detections = non_max_suppression(predictions, conf_thres, iou_thres)
        after_nms = time_sync(device)
        height, width = imgs.shape[2:]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        # (n, 6) image index, class, x1, y1, x2, y2 in letterboxed pixels
        truth = torch.cat([targets[:, :2], xywh2xyxy(targets[:, 2:]) * scale], 1)
        for i, found in enumerate(detections):
            found, labels = _original_pixels(found.cpu(), truth[truth[:, 0] == i, 1:], infos[i])
            matched.append((match_detections(found, labels), found[:, 4], found[:, 5]))
            target_classes.append(labels[:, 0])
            images_with_class[np.unique(labels[:, 0].numpy().astype(int))] += 1
            if collect_json:
                detections_json += _coco_rows(found, paths[i])
        images += len(imgs)
        seconds['model'] += after_model - start
        seconds['nms'] += after_nms - after_model
        seconds['matching'] += time.perf_counter() - after_nms
    start = time.perf_counter()
    result = _summarise(matched, target_classes, images_with_class, num_classes)
    seconds['metrics'] = time.perf_counter() - start
    result.images, result.seconds, result.detections = images, seconds, detections_json
    model.train(was_training)
    return result


def _summarise(matched, target_classes, images_with_class, num_classes):
    targets = torch.cat(target_classes).numpy().astype(int) if target_classes else np.zeros(0)
    if not matched or not sum(len(m[0]) for m in matched):
        metrics = dict.fromkeys(('precision', 'recall', 'map50', 'map50_95', 'f1'), 0.0)
        return Evaluation(metrics, targets=len(targets))
    correct, conf, cls = (torch.cat(parts).numpy() for parts in zip(*matched))
    stats = ap_per_class(correct, conf, cls, targets)
    counts = np.bincount(targets, minlength=num_classes)
    metrics = {'precision': float(stats.precision.mean()), 'recall': float(stats.recall.mean()),
               'map50': float(stats.ap50.mean()), 'map50_95': float(stats.ap.mean()),
               'f1': float(stats.f1.mean())}
    per_class = [(int(c), int(images_with_class[c]), int(counts[c]), float(p), float(r),
                  float(ap), float(ap95), float(f1))
                 for c, p, r, ap, ap95, f1 in zip(stats.classes, stats.precision, stats.recall,
                                                  stats.ap50, stats.ap50_95, stats.f1)]
    return Evaluation(metrics, per_class, targets=len(targets))
