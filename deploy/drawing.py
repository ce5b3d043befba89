"""Detection on files a user points at: find the inputs, run a model on one BGR image,
draw what it found, write Darknet label lines. detect.py is the command line over it.

Flow: `find_sources` turns an image, a folder, a glob, a .txt list or a video file into
a list of paths; `Detector` letterboxes a frame (data.datasets.letterbox), runs the
model, keeps boxes through evaluation.metrics.non_max_suppression and maps them back to the
frame's pixels (scale_boxes_to_original); `draw` and `label_lines` present the result.
"""
import glob
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from data.datasets import IMG_EXTENSIONS, _imread, _resolve, letterbox
from evaluation.metrics import non_max_suppression, scale_boxes_to_original
from utils.errors import UserInputError
from utils.torch_utils import time_sync

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.m4v', '.mpg', '.mpeg', '.wmv', '.webm')


def is_video_file(path):
    return os.path.splitext(str(path))[1].lower() in VIDEO_EXTENSIONS


def _media(paths):
    return sorted(p for p in paths if os.path.isfile(p) and
                  os.path.splitext(p)[1].lower() in IMG_EXTENSIONS + VIDEO_EXTENSIONS)


def find_sources(source):
    """Image and video paths `source` names: a file, a folder (its files, not
    sub-folders), a glob pattern or a .txt list of paths (relative ones from the current
    folder, then from the list's folder). Refuses a source that yields none."""
    kinds = 'images (' + ' '.join(IMG_EXTENSIONS) + ') or videos (' + \
            ' '.join(VIDEO_EXTENSIONS) + ')'
    if str(source).isdigit() or '://' in str(source):
        raise UserInputError(f'--source {source}: cameras and streams are not supported; '
                             'pass an image, a folder, a glob, a .txt list or a video file')
    if os.path.isdir(source):
        paths = _media(os.path.join(source, name) for name in os.listdir(source))
    elif os.path.isfile(source) and source.lower().endswith('.txt'):
        with open(source, encoding='utf-8', errors='replace') as f:
            entries = [line.strip() for line in f if line.strip()]
        folder = Path(source).parent
        paths = [_resolve(entry, folder) for entry in entries]
        missing = [e for e, p in zip(entries, paths) if p is None]
        if missing:
            raise UserInputError(f'{source}: {len(missing)} listed file(s) not found (first: '
                                 f'{missing[0]}); fix the list')
    elif os.path.isfile(source):
        paths = [source]
    elif glob.has_magic(source):
        paths = _media(glob.glob(source))
    else:
        raise UserInputError(f'--source {source}: no such file or folder; pass {kinds}, a '
                             'folder, a glob or a .txt list')
    if not paths:
        raise UserInputError(f'--source {source}: no {kinds} found')
    for path in paths:
        if os.path.splitext(path)[1].lower() not in IMG_EXTENSIONS + VIDEO_EXTENSIONS:
            raise UserInputError(f'{path}: not an image or video file name; pass {kinds}')
    return paths


def read_image(path):
    """BGR uint8 image, or a one-line refusal."""
    img = _imread(path)
    if img is None:
        raise UserInputError(f'{path}: cannot decode image (corrupt or unsupported); '
                             'replace it or leave it out of --source')
    return img


class Detector:
    """A model with its input size and thresholds; calling it on a BGR frame gives
    (detections (n, 6): x1, y1, x2, y2 in the frame's pixels, score, class; milliseconds
    of the forward pass)."""

    def __init__(self, model, img_size, conf_thres=0.25, iou_thres=0.45, name=''):
        self.model, self.img_size = model.eval(), img_size
        self.conf_thres, self.iou_thres, self.name = conf_thres, iou_thres, name
        self.device = next(model.parameters()).device
        self.times = []

    def __call__(self, frame):
        img, info = letterbox(frame, (self.img_size, self.img_size))
        # BGR HWC -> RGB CHW in [0, 1], a batch of one
        x = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1)))
        x = x.to(self.device).float().div_(255).unsqueeze(0)
        start = time_sync(self.device)
        with torch.no_grad():
            predictions = self.model(x)
        ms = (time_sync(self.device) - start) * 1000
        self.times.append(ms)
        found = non_max_suppression(predictions, self.conf_thres, self.iou_thres)[0].cpu()
        found[:, :4] = scale_boxes_to_original(found[:, :4], info)
        return found.numpy(), ms


def class_colour(c):
    """A fixed, well-spread BGR colour per class id."""
    hue = int(c * 47) % 180
    hsv = np.uint8([[[hue, 200, 255]]])
    return tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


MIN_DRAWN_SIDE = 256  # smaller frames are enlarged (whole factors) so labels stay legible


def draw_factor(shape):
    """The whole factor `draw` enlarges a frame of `shape` by."""
    return max(1, -(-MIN_DRAWN_SIDE // min(shape[:2])))


def draw(frame, detections, names=None, title=None):
    """A copy of `frame` with each box, its class name and score; `title` on top. A frame
    with a side under MIN_DRAWN_SIDE is enlarged by draw_factor (nearest neighbour)."""
    factor = draw_factor(frame.shape)
    out = frame.copy() if factor == 1 else cv2.resize(
        frame, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
    detections = detections.copy()
    detections[:, :4] *= factor
    scale = max(0.35, min(out.shape[:2]) / 800)
    thick = max(1, round(min(out.shape[:2]) / 400))
    for x1, y1, x2, y2, score, c in detections.tolist():
        colour = class_colour(int(c))
        # corners inside the image: a box ending on the right or bottom edge (x2 = width)
        # would be drawn one pixel outside it
        right, bottom = out.shape[1] - 1, out.shape[0] - 1
        p1 = (min(int(round(x1)), right), min(int(round(y1)), bottom))
        p2 = (min(int(round(x2)), right), min(int(round(y2)), bottom))
        cv2.rectangle(out, p1, p2, colour, thick)
        name = names[int(c)] if names else str(int(c))
        text = f'{name} {score:.2f}'
        (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        top, left = max(p1[1] - h - base, 0), max(min(p1[0], out.shape[1] - w), 0)
        cv2.rectangle(out, (left, top), (left + w, top + h + base), colour, -1)
        cv2.putText(out, text, (left, top + h), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0),
                    1, cv2.LINE_AA)
    if title:
        (w, h), base = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        band = np.full((h + base + 6, out.shape[1], 3), 255, np.uint8)
        cv2.putText(band, title, (3, h + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
        out = np.vstack((band, out))
    return out


def side_by_side(left, right, gap=4):
    """Two annotated frames of equal height next to each other, a white gap between."""
    height = max(left.shape[0], right.shape[0])
    pad = lambda img: cv2.copyMakeBorder(img, 0, height - img.shape[0], 0, 0,
                                         cv2.BORDER_CONSTANT, value=(255, 255, 255))
    return np.hstack((pad(left), np.full((height, gap, 3), 255, np.uint8), pad(right)))


def label_lines(detections, shape):
    """Darknet label lines 'class cx cy w h' (normalised to the frame) of the boxes."""
    h, w = shape[:2]
    lines = []
    for x1, y1, x2, y2, _, c in detections.tolist():
        lines.append(f'{int(c)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} '
                     f'{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}')
    return ''.join(line + '\n' for line in lines)
