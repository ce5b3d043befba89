"""Evaluate a detector: precision, recall, mAP@0.5 (and 0.5:0.95), F1 per class.

    python test.py --cfg cfg/yolov3-shapes.cfg --weights weights/yolov3-shapes.pt \
        --data data/shapes.data --img-size 128

    python test.py --weights runs/export/yolov3-shapes.onnx --data data/shapes.data

An exported .onnx file (export.py) is evaluated with onnxruntime, no cfg needed, through
the same letterbox, NMS and metrics. With no arguments it evaluates the demo model on
the demo data. `evaluate(...)` is the
same evaluation for other scripts (train.py after each epoch, the prune scripts).
"""
import itertools
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from terminaltables import AsciiTable
from tqdm import tqdm

from models import Darknet, load_weights
from utils import demo
from utils.datasets import create_dataloader
from utils.errors import ArgumentParser, UserInputError, run_cli
from utils.fileio import atomic_write_text, require_output_file
from utils.metrics import (ap_per_class, match_detections, non_max_suppression,
                           scale_boxes_to_original, xywh2xyxy)
from utils.onnx_utils import OnnxModel
from utils.parse_config import load_class_names, parse_data_cfg, require_data_key
from utils.torch_utils import select_device, time_sync


@dataclass
class Evaluation:
    """What `evaluate` measured: overall figures, per-class rows, and where time went."""
    metrics: dict                       # precision, recall, map50, map50_95, f1
    per_class: list = field(default_factory=list)  # (class id, images, targets, p, r, ap50, f1)
    images: int = 0
    targets: int = 0
    seconds: dict = field(default_factory=dict)    # model, nms, matching, metrics
    detections: list = field(default_factory=list)  # COCO-style dicts, when asked

    def table(self, class_names=None):
        rows = [['Class', 'Images', 'Targets', 'P', 'R', 'mAP@0.5', 'F1']]
        m = self.metrics
        rows.append(['all', self.images, self.targets] +
                    [f'{m[k]:.3f}' for k in ('precision', 'recall', 'map50', 'f1')])
        for c, images, targets, p, r, ap, f1 in self.per_class:
            name = class_names[c] if class_names and c < len(class_names) else str(c)
            rows.append([name, images, targets] + [f'{v:.3f}' for v in (p, r, ap, f1)])
        return AsciiTable(rows).table


def _image_id(path):
    stem = os.path.splitext(os.path.basename(path))[0]
    return int(stem) if stem.isdigit() else stem


def _coco_rows(detections, path, info):
    """COCO result dicts for one image, boxes in original image pixels."""
    boxes = scale_boxes_to_original(detections[:, :4], info).tolist()
    image_id = _image_id(path)
    return [{'image_id': image_id, 'category_id': int(cls), 'score': round(float(score), 5),
             'bbox': [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)]}
            for (x1, y1, x2, y2), score, cls in zip(boxes, detections[:, 4].tolist(),
                                                    detections[:, 5].tolist())]


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
            found = found.cpu()
            labels = truth[truth[:, 0] == i, 1:]
            matched.append((match_detections(found, labels), found[:, 4], found[:, 5]))
            target_classes.append(labels[:, 0])
            images_with_class[np.unique(labels[:, 0].numpy().astype(int))] += 1
            if collect_json:
                detections_json += _coco_rows(found, paths[i], infos[i])
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
                  float(ap), float(f1))
                 for c, p, r, ap, f1 in zip(stats.classes, stats.precision, stats.recall,
                                            stats.ap50, stats.f1)]
    return Evaluation(metrics, per_class, targets=len(targets))


def default_img_size(model, img_size=None):
    """--img-size, else the cfg's [net] width, else 416 (the data loader checks it)."""
    return img_size or model.hyperparams.get('width') or 416


def load_model(cfg, weights, device):
    """The Darknet model of cfg + weights on `device`; or, for weights named .onnx, the
    exported file run by onnxruntime on the CPU (it needs no cfg)."""
    if weights and str(weights).endswith('.onnx'):
        return OnnxModel(weights)
    model = Darknet(cfg)
    if weights:
        load_weights(model, weights)
    return model.to(device)


def get_args_parser():
    parser = ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cfg', help='model definition (.cfg); default: the demo model')
    parser.add_argument('--weights', help='model weights (.weights or .pt), or an exported '
                                          '.onnx file (then no --cfg)')
    parser.add_argument('--data', help='data set description (.data); default: the demo set')
    parser.add_argument('--img-size', type=int, help="input side in pixels (default: cfg's width)")
    parser.add_argument('--batch-size', type=int, default=16, help='images per batch')
    parser.add_argument('--conf-thres', type=float, default=0.001, help='score threshold')
    # the seed's test.py had --nms-thres for NMS and --iou-thres for matching a detection
    # to a label; matching here is fixed at IoU 0.5 (mAP@0.5) and 0.5:0.95
    parser.add_argument('--iou-thres', '--nms-thres', dest='iou_thres', type=float, default=0.5,
                        help='NMS IoU threshold (--nms-thres is the same flag; unlike the '
                        "ultralytics-era test.py, --iou-thres is not the matching threshold)")
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument('--workers', type=int, default=2, help='data loading processes')
    parser.add_argument('--save-json', metavar='PATH', nargs='?', const='results.json',
                        help='write COCO-format detections (.json; with no PATH: '
                        'results.json). Class ids stay 0-based, not COCO\'s 91-id numbering')
    parser.add_argument('--metrics-json', metavar='PATH', help='write the overall metrics (.json)')
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    exported = bool(args.weights) and args.weights.endswith('.onnx')
    if exported and args.data is None:
        raise UserInputError(f'--data is required with --weights {args.weights}: pass the '
                             '.data file to evaluate the ONNX file on')
    if args.cfg is None and not exported:
        args.cfg = demo.YOLOV3['cfg']
        args.weights = args.weights or demo.require_demo_weights(demo.YOLOV3['weights'])
        args.data = args.data or demo.ensure_demo_data()
    if args.data is None:
        raise UserInputError('--data is required with --cfg: pass the .data file to evaluate on')
    if args.weights is None:
        raise UserInputError('--weights is required with --cfg: pass the trained .weights/.pt')
    inputs = {os.path.abspath(p) for p in (args.cfg, args.weights, args.data) if p}
    for flag, path in (('--save-json', args.save_json), ('--metrics-json', args.metrics_json)):
        if path and os.path.abspath(path) in inputs:
            raise UserInputError(f'{flag} {path}: would overwrite an input file; choose '
                                 'another name')
        if path:
            require_output_file(path, flag)
    device = select_device(args.device)
    options = parse_data_cfg(args.data)
    model = load_model(args.cfg, args.weights, device)
    if model.num_classes != options['classes']:
        raise UserInputError(f'{args.data}: classes={options["classes"]} but '
                             f'{args.cfg or args.weights} detects {model.num_classes}; pass '
                             'the matching .data or cfg')
    img_size = default_img_size(model, args.img_size)
    if exported and img_size != model.img_size:
        raise UserInputError(f'--img-size {img_size}: {args.weights} was exported for '
                             f'{model.img_size}x{model.img_size} inputs; drop --img-size or '
                             'export again with it')
    # an exported graph has one fixed square input: its images are letterboxed to it,
    # where a Darknet model gets rectangular batches
    loader, _ = create_dataloader(require_data_key(options, 'valid', args.data), img_size,
                                  args.batch_size, options['classes'], rect=not exported,
                                  workers=args.workers, stride=model.stride)
    names = load_class_names(options['names']) if 'names' in options else None
    result = evaluate(model, loader, options['classes'], args.conf_thres, args.iou_thres,
                      collect_json=bool(args.save_json))
    print(result.table(names))
    print(f'{result.images} images; time: ' + ', '.join(
        f'{k} {v:.2f} s' for k, v in result.seconds.items()))
    if args.save_json:
        atomic_write_text(args.save_json, json.dumps(result.detections))
        print(f'detections: {args.save_json}')
    if args.metrics_json:
        atomic_write_text(args.metrics_json, json.dumps(result.metrics, indent=1))
        print(f'metrics: {args.metrics_json}')
    return result


if __name__ == '__main__':
    run_cli(main)
