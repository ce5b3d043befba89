"""Darknet data layout: list files, label files, letterbox, augmentation, data loaders.

Layout. A list file holds one image path per line. Each path is tried as given
(absolute or relative to the current folder), then relative to the list file's folder.
An image's labels live at the same path with its last `images` folder replaced by
`labels` and the extension by `.txt` (`set/images/train/a.jpg` ->
`set/labels/train/a.txt`); a path with no `images` folder keeps its labels beside the
image. A label file holds `class cx cy w h` lines, normalised to the image size; no
label file means no objects. List and label files are read as UTF-8 with or without a
byte-order mark, with LF, CRLF or CR line ends; blank lines and spaces around fields
do not count. Image types are recognised by their bytes, whatever the extension's case.

Images are decoded as stored, ignoring any EXIF orientation tag, as Darknet does.

Flow: `check_dataset` reads every label file and every image header once and reports
all problems together; `LoadImagesAndLabels` keeps only those labels and sizes and
decodes images one at a time in `__getitem__`; `create_dataloader` wraps it.
"""
import math
import os
import struct
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from darknet.cfg import parse_data_cfg, require_data_key
from data.cache import cache_images
from utils.errors import UserInputError

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp', '.dng', '.pgm',
                  '.ppm', '.pbm')
PAD_VALUE = 114
MAX_REPORTED = 20   # problems listed in one check_dataset message
COORD_TOL = 1e-6    # labels may overshoot [0, 1] by float rounding

# Augmentation defaults: colour jitter gains, affine ranges, flip probability.
DEFAULT_HYP = {
    'hsv_h': 0.015,     # hue gain, fraction of the hue circle
    'hsv_s': 0.7,       # saturation gain
    'hsv_v': 0.4,       # value gain
    'degrees': 0.0,     # rotation, +/- degrees
    'translate': 0.1,   # translation, +/- fraction of the image side
    'scale': 0.25,      # scale, 1 +/- this
    'shear': 0.0,       # shear, +/- degrees
    'fliplr': 0.5,      # probability of a left-right flip
}


class LetterboxInfo(NamedTuple):
    """How a letterboxed image maps to the original: x_new = x_orig * ratio + pad."""
    orig_shape: tuple   # (h0, w0) of the file
    ratio: tuple        # (rw, rh): resized size / original size, per axis
    pad: tuple          # (left, top) padding in pixels


# ---------------------------------------------------------------------------- paths

def is_image_file(path):
    """True for a name with an image extension in any case (.JPG as .jpg)."""
    return os.path.splitext(str(path))[1].lower() in IMG_EXTENSIONS


def img2label_path(img_path):
    """Label path of an image: last `images` folder -> `labels`, extension -> `.txt`."""
    p = Path(img_path)
    parts = list(p.parts)
    for i in range(len(parts) - 2, -1, -1):  # the folders only, from the innermost
        if parts[i] == 'images':
            parts[i] = 'labels'
            return str(Path(*parts).with_suffix('.txt'))
    return str(p.with_suffix('.txt'))


def _resolve(entry, list_dir):
    """The image file an entry of a list file names, or None when none exists."""
    p = Path(entry)
    if p.is_file():
        return str(p)
    if not p.is_absolute() and (list_dir / p).is_file():
        return str(list_dir / p)
    return None


# ---------------------------------------------------------------------------- headers

def _jpeg_size(f):
    """(h, w) from the SOF segment of a JPEG file positioned after its SOI marker."""
    while True:
        b = f.read(1)
        while b == b'\xff':  # markers may be preceded by fill bytes
            b = f.read(1)
        if not b:
            raise ValueError('no frame header (truncated JPEG)')
        marker = b[0]
        if marker == 0xD9:
            raise ValueError('no frame header before end of image')
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue  # stand-alone markers carry no length
        length_bytes = f.read(2)
        if len(length_bytes) < 2:
            raise ValueError('truncated JPEG segment')
        length = struct.unpack('>H', length_bytes)[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            sof = f.read(5)
            if len(sof) < 5:
                raise ValueError('truncated JPEG frame header')
            h, w = struct.unpack('>HH', sof[1:5])
            return h, w
        if length < 2:
            raise ValueError('bad JPEG segment length')
        f.seek(length - 2, os.SEEK_CUR)


def image_size(path):
    """(h, w) of an image from its header (JPEG, PNG) or, for other types, by decoding.

    Raises ValueError with a short reason when the file is not a readable image.
    """
    with open(path, 'rb') as f:
        head = f.read(26)
        if not head:
            raise ValueError('empty file')
        if head[:2] == b'\xff\xd8':
            f.seek(2)
            h, w = _jpeg_size(f)
        elif head[:8] == b'\x89PNG\r\n\x1a\n':
            if len(head) < 24 or head[12:16] != b'IHDR':
                raise ValueError('truncated PNG header')
            w, h = struct.unpack('>II', head[16:24])
        else:
            img = _imread(path)
            if img is None:
                raise ValueError('not an image OpenCV can decode')
            h, w = img.shape[:2]
    if h <= 0 or w <= 0:
        raise ValueError(f'image header gives size {w}x{h}')
    return int(h), int(w)


def _imread(path):
    """The image as stored (BGR), None when it cannot be read or decoded. The bytes are
    read by numpy and decoded from memory: cv2.imread fails on non-ASCII paths on
    Windows. OpenCV's own warning about a damaged file is silenced: the caller reports
    it in one line."""
    try:
        data = np.fromfile(str(path), np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    logging = cv2.utils.logging
    level = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_ERROR)
    try:
        return cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error:
        return None
    finally:
        logging.setLogLevel(level)


def load_image(path):
    """Decode an image as BGR uint8 (H, W, 3); a user error when it cannot be decoded."""
    img = _imread(path)
    if img is None:
        raise UserInputError(f'{path}: cannot decode image (corrupt or unsupported); '
                             f'replace the file or remove it from the list file')
    return img


# ---------------------------------------------------------------------------- checking

class DatasetIndex(NamedTuple):
    """What one pass over a list file learns: paths, labels and sizes, in list order."""
    img_files: list     # resolved image paths
    label_files: list   # label paths (may not exist: no objects)
    labels: list        # per image float32 (n, 5) [class, cx, cy, w, h], normalised
    shapes: np.ndarray  # (N, 2) int (h, w) of each image


def _parse_labels(label_path, num_classes, problems):
    """Labels of one file as float32 (n, 5); appends `file:line: what` problems."""
    try:
        # utf-8-sig: a byte-order mark is not part of the first class id
        text = Path(label_path).read_text(encoding='utf-8-sig', errors='replace')
    except FileNotFoundError:
        return np.zeros((0, 5), np.float32)
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f'{label_path}: cannot read label file ({e.__class__.__name__})')
        return np.zeros((0, 5), np.float32)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f'{label_path}:{n}'
        if len(fields) != 5:
            problems.append(f'{where}: expected 5 numbers "class cx cy w h", '
                            f'got {len(fields)} fields')
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            problems.append(f'{where}: not a number in {line.strip()!r}')
            continue
        if not all(math.isfinite(v) for v in values):
            problems.append(f'{where}: non-finite value in {line.strip()!r}')
            continue
        c, _, _, w, h = values
        bad = []
        if c != int(c) or c < 0:
            bad.append(f'class {fields[0]} is not a non-negative integer')
        elif num_classes is not None and c >= num_classes:
            bad.append(f'class {int(c)} is not below classes={num_classes}')
        for name, v, text in zip(('cx', 'cy', 'w', 'h'), values[1:], fields[1:]):
            if not -COORD_TOL <= v <= 1 + COORD_TOL:
                bad.append(f'{name}={text} outside [0, 1]')
        if w <= 0 or h <= 0:
            bad.append(f'box size w={fields[3]} h={fields[4]} is not positive')
        if bad:
            problems.append(f'{where}: ' + ', '.join(bad))
            continue
        rows.append(values)
    labels = np.array(rows, np.float32).reshape(-1, 5)
    labels[:, 1:] = labels[:, 1:].clip(0, 1)
    return labels


def check_dataset(list_path, num_classes=None):
    """Read a list file, every label file and every image header; return a DatasetIndex.

    All problems are gathered first and raised together as one UserInputError whose
    single-line message lists the first few as `file:line: what`. `num_classes=None`
    skips the upper bound on class ids.
    """
    list_path = Path(list_path)
    if not list_path.is_file():
        raise UserInputError(f'{list_path}: list file not found; check the train=/valid= '
                             f'paths in the .data file')
    list_dir = list_path.parent
    img_files, label_files, labels, shapes, problems = [], [], [], [], []
    # surrogateescape: on Linux a path is bytes, so a list saved in another encoding
    # (GBK from Windows) still names its files
    text = list_path.read_text(encoding='utf-8-sig', errors='surrogateescape')
    for n, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry:
            continue
        img = _resolve(entry, list_dir)
        if img is None:
            problems.append(f'{list_path}:{n}: image {entry!r} not found (tried as given '
                            f'and relative to {list_dir})')
            continue
        try:
            shape = image_size(img)
        except (OSError, ValueError) as e:
            problems.append(f'{list_path}:{n}: cannot read image {img}: {e}')
            continue
        label_file = img2label_path(img)
        img_files.append(img)
        label_files.append(label_file)
        labels.append(_parse_labels(label_file, num_classes, problems))
        shapes.append(shape)
    if problems:
        extra = len(problems) - MAX_REPORTED
        more = f'; ... and {extra} more' if extra > 0 else ''
        raise UserInputError(f'{len(problems)} problem(s) in the data set of {list_path}: '
                             + '; '.join(problems[:MAX_REPORTED]) + more
                             + '. Fix or delete these label lines, or remove the images from '
                               'the list file')
    if not img_files:
        raise UserInputError(f'{list_path}: no image paths in the list file; add one image '
                             f'path per line')
    return DatasetIndex(img_files, label_files, labels, np.array(shapes, np.int64).reshape(-1, 2))


# ---------------------------------------------------------------------------- geometry

def letterbox(img, new_shape, ratio=None, color=(PAD_VALUE, PAD_VALUE, PAD_VALUE)):
    """Resize `img` by `ratio` (default: the largest that fits) and pad it to `new_shape`.

    new_shape is (h, w). Returns (image (h, w, 3), LetterboxInfo). The image is centred;
    an odd padding puts the extra pixel on the right / bottom.
    """
    h0, w0 = img.shape[:2]
    new_h, new_w = new_shape
    if ratio is None:
        ratio = min(new_h / h0, new_w / w0)
    w, h = min(new_w, max(1, round(w0 * ratio))), min(new_h, max(1, round(h0 * ratio)))
    if (w, h) != (w0, h0):
        interp = cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR
        img = cv2.resize(img, (w, h), interpolation=interp)
    left, top = (new_w - w) // 2, (new_h - h) // 2
    img = cv2.copyMakeBorder(img, top, new_h - h - top, left, new_w - w - left,
                             cv2.BORDER_CONSTANT, value=color)
    return img, LetterboxInfo((h0, w0), (w / w0, h / h0), (left, top))


def augment_hsv(img, rng, hgain, sgain, vgain):
    """Random hue / saturation / value gains, applied in place to a BGR uint8 image."""
    if not (hgain or sgain or vgain):
        return img
    gains = rng.uniform(-1, 1, 3) * (hgain, sgain, vgain) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_h = ((x * gains[0]) % 180).astype(np.uint8)  # OpenCV hue runs over 0..179
    lut_s = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=img)
    return img


def random_affine(img, boxes, rng, degrees=0.0, translate=0.1, scale=0.25, shear=0.0,
                  border_value=PAD_VALUE):
    """Random rotation / scale / shear / translation about the image centre.

    boxes: (n, 4) x1, y1, x2, y2 in pixels (pixel edges). Returns the warped image, the
    boxes' transformed, clipped bounds and a (n,) bool mask of the boxes kept: boxes
    under 2 px, with under a fifth of their scaled area left or thinner than 1:20 are
    dropped.
    """
    h, w = img.shape[:2]
    centre = np.array([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1]])
    s = rng.uniform(1 - scale, 1 + scale)
    rot = np.eye(3)
    rot[:2] = cv2.getRotationMatrix2D((0, 0), rng.uniform(-degrees, degrees), s)
    sh = np.eye(3)
    sh[0, 1] = math.tan(math.radians(rng.uniform(-shear, shear)))
    sh[1, 0] = math.tan(math.radians(rng.uniform(-shear, shear)))
    move = np.array([[1, 0, w / 2 + rng.uniform(-translate, translate) * w],
                     [0, 1, h / 2 + rng.uniform(-translate, translate) * h], [0, 0, 1]])
    m = move @ sh @ rot @ centre  # (3, 3), acts on pixel-centre coordinates
    img = cv2.warpAffine(img, m[:2], (w, h), flags=cv2.INTER_LINEAR,
                         borderValue=(border_value,) * 3)

    n = len(boxes)
    if n == 0:
        return img, boxes.reshape(0, 4), np.zeros(0, bool)
    # corners in pixel-centre coordinates (edge - 0.5), warped, back to edges
    x1, y1, x2, y2 = boxes.T
    corners = np.stack([np.stack([x1, y1], 1), np.stack([x2, y1], 1),
                        np.stack([x1, y2], 1), np.stack([x2, y2], 1)], 1) - 0.5  # (n, 4, 2)
    warped = corners @ m[:2, :2].T + m[:2, 2] + 0.5                              # (n, 4, 2)
    new = np.concatenate([warped.min(1), warped.max(1)], 1)                     # (n, 4)
    new[:, [0, 2]] = new[:, [0, 2]].clip(0, w)
    new[:, [1, 3]] = new[:, [1, 3]].clip(0, h)

    bw, bh = new[:, 2] - new[:, 0], new[:, 3] - new[:, 1]
    area0 = (x2 - x1) * (y2 - y1) * s * s
    aspect = np.maximum(bw / (bh + 1e-9), bh / (bw + 1e-9))
    keep = (bw > 2) & (bh > 2) & (bw * bh > 0.2 * area0) & (aspect < 20)
    return img, new, keep


# ---------------------------------------------------------------------------- data set

class LoadImagesAndLabels(Dataset):
    """Images of a Darknet list file with their labels, letterboxed to `img_size`.

    Item: (image float32 (3, H, W) RGB in [0, 1], targets float32 (n, 6)
    [batch_index, class, cx, cy, w, h] normalised to the returned image (batch_index is
    0 until `collate_fn` fills it), image path, LetterboxInfo). H = W = img_size unless
    `rect`: then images are ordered by aspect ratio and each batch of `batch_size` gets
    the smallest (H, W), multiples of `stride`, that holds every image of the batch with
    its long side at img_size. `augment` adds a random affine, HSV jitter and a flip
    (rect batches are for evaluation and are not augmented). With augmentation the
    LetterboxInfo describes the letterbox only, not the random affine. `cache` decodes
    and letterboxes every image once, here, and keeps them (data/cache.py).
    """

    def __init__(self, list_path, img_size=416, batch_size=16, augment=False, hyp=None,
                 rect=False, stride=32, num_classes=None, cache=False):
        index = check_dataset(list_path, num_classes)
        unknown = set(hyp or {}) - set(DEFAULT_HYP)
        if unknown:
            raise ValueError(f'unknown augmentation settings {sorted(unknown)}; '
                             f'known: {sorted(DEFAULT_HYP)}')
        self.hyp = {**DEFAULT_HYP, **(hyp or {})}
        self.img_size = int(img_size)
        self.batch_size = int(batch_size)
        self.augment = bool(augment) and not rect
        self.rect = bool(rect)
        self.stride = int(stride)
        self.img_files = list(index.img_files)
        self.label_files = list(index.label_files)
        self.labels = list(index.labels)
        self.shapes = index.shapes  # (N, 2) h, w

        self.batch_shapes = None
        if self.rect:
            # sort by aspect ratio so each batch holds images of similar shape
            order = np.argsort(self.shapes[:, 0] / self.shapes[:, 1], kind='stable')
            self.img_files = [self.img_files[i] for i in order]
            self.label_files = [self.label_files[i] for i in order]
            self.labels = [self.labels[i] for i in order]
            self.shapes = self.shapes[order]
            r = self.img_size / self.shapes.max(1)                       # (N,)
            hw = np.maximum(1, np.round(self.shapes * r[:, None]))      # (N, 2) resized
            n_batches = math.ceil(len(self.img_files) / self.batch_size)
            self.batch_shapes = []
            for b in range(n_batches):
                sl = hw[b * self.batch_size:(b + 1) * self.batch_size]
                h, w = sl.max(0)
                self.batch_shapes.append((int(math.ceil(h / self.stride) * self.stride),
                                          int(math.ceil(w / self.stride) * self.stride)))
        self.images = cache_images(list_path, [self.shape_of(i) for i in range(len(self))],
                                   self.letterboxed) if cache else None

    def __len__(self):
        return len(self.img_files)

    def shape_of(self, index):
        """(h, w) image `index` is letterboxed to."""
        return self.batch_shapes[index // self.batch_size] if self.rect else (self.img_size,) * 2

    def letterboxed(self, index):
        """Image `index` decoded and letterboxed: (BGR uint8 (h, w, 3), LetterboxInfo)."""
        img0 = load_image(self.img_files[index])
        h0, w0 = img0.shape[:2]
        shape = self.shape_of(index)
        # long side at img_size, shrunk further only if the target shape is smaller
        ratio = min(self.img_size / max(h0, w0), shape[0] / h0, shape[1] / w0)
        return letterbox(img0, shape, ratio)

    def __getitem__(self, index):
        path = self.img_files[index]
        img, info = self.letterboxed(index) if self.images is None else self.images[index]
        img = img.copy() if self.images is not None and self.augment else img  # HSV is in place
        h0, w0 = info.orig_shape

        labels = self.labels[index]  # (n, 5) normalised to the original image
        cls = labels[:, 0].copy()
        (rw, rh), (left, top) = info.ratio, info.pad
        boxes = np.stack([(labels[:, 1] - labels[:, 3] / 2) * w0 * rw + left,
                          (labels[:, 2] - labels[:, 4] / 2) * h0 * rh + top,
                          (labels[:, 1] + labels[:, 3] / 2) * w0 * rw + left,
                          (labels[:, 2] + labels[:, 4] / 2) * h0 * rh + top], 1)  # (n, 4) pixels

        if self.augment:
            hyp = self.hyp
            # draw from torch's generator so torch.manual_seed and per-worker seeding
            # make augmentation reproducible and different across workers
            rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,)).item()))
            img, boxes, keep = random_affine(img, boxes, rng, hyp['degrees'], hyp['translate'],
                                             hyp['scale'], hyp['shear'])
            boxes, cls = boxes[keep], cls[keep]
            augment_hsv(img, rng, hyp['hsv_h'], hyp['hsv_s'], hyp['hsv_v'])
            if rng.random() < hyp['fliplr']:
                img = img[:, ::-1]
                boxes = np.stack([img.shape[1] - boxes[:, 2], boxes[:, 1],
                                  img.shape[1] - boxes[:, 0], boxes[:, 3]], 1)

        h, w = img.shape[:2]
        targets = torch.zeros((len(cls), 6), dtype=torch.float32)
        if len(cls):
            targets[:, 1] = torch.from_numpy(cls)
            targets[:, 2] = torch.from_numpy((boxes[:, 0] + boxes[:, 2]) / 2 / w)
            targets[:, 3] = torch.from_numpy((boxes[:, 1] + boxes[:, 3]) / 2 / h)
            targets[:, 4] = torch.from_numpy((boxes[:, 2] - boxes[:, 0]) / w)
            targets[:, 5] = torch.from_numpy((boxes[:, 3] - boxes[:, 1]) / h)

        img = np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))  # BGR HWC -> RGB CHW
        return torch.from_numpy(img).float().div_(255), targets, path, info


def collate_fn(batch):
    """Stack images; concatenate targets with column 0 set to the index in the batch."""
    imgs, targets, paths, infos = zip(*batch)
    for i, t in enumerate(targets):
        t[:, 0] = i
    return torch.stack(imgs, 0), torch.cat(targets, 0), paths, infos


def _worker_init(worker_id):
    # each worker decodes one image at a time: OpenCV's own threads would only compete
    cv2.setNumThreads(0)


def check_img_size(img_size, stride):
    """Refuse an input side the model cannot take, naming the two nearest that it can."""
    if img_size < 1 or img_size % stride:
        low = max(stride, img_size // stride * stride)
        raise UserInputError(f'--img-size {img_size} is not a multiple of the model stride '
                             f'{stride}; use {low} or {low + stride}')


def default_img_size(model, img_size=None):
    """--img-size, else the cfg's [net] width, else 416; refused (naming the two nearest
    sizes it takes) unless a multiple of the model's stride."""
    img_size = img_size or model.hyperparams.get('width') or 416
    check_img_size(img_size, model.stride)
    return img_size


def check_classes(model, options, data, name, fix='pass the matching .data'):
    """Refuse a .data file (parsed: `options`, path: `data`) whose classes= is not the
    class count of `model` (read from `name`); `fix` says what to do."""
    if model.num_classes != options['classes']:
        raise UserInputError(f'{data}: classes={options["classes"]} but {name} detects '
                             f'{model.num_classes}; {fix}')


def default_workers():
    """Loader processes when none are asked for: one per core, at most 8."""
    return min(8, os.cpu_count() or 1)


def create_dataloader(list_path, img_size, batch_size, num_classes, augment=False, rect=False,
                      workers=0, shuffle=False, stride=32, hyp=None, shards=None, cache=False,
                      pin_memory=False):
    """A DataLoader over `list_path` and its data set: returns (loader, dataset).

    `shards=(rank, world, seed)` shuffles with a DistributedSampler, one share of each
    epoch's permutation per process (call `loader.sampler.set_epoch(e)`); one process
    with world 1 sees the same permutation that several processes split. Rect batches
    depend on the order of the images, so `rect` turns shuffling off and cannot be
    combined with shards. `workers` None: `default_workers()`. `cache`: see
    LoadImagesAndLabels; `pin_memory`: batches in page-locked memory, for CUDA.
    """
    check_img_size(img_size, stride)
    if batch_size < 1:
        raise UserInputError(f'--batch-size {batch_size}: use 1 or more')
    if rect and shards is not None:
        raise ValueError('rect batches need the data set order: do not pass shards')
    dataset = LoadImagesAndLabels(list_path, img_size, batch_size, augment=augment, hyp=hyp,
                                  rect=rect, stride=stride, num_classes=num_classes, cache=cache)
    sampler = None
    if shards is not None:
        rank, world, seed = shards
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                     seed=seed)
    workers = default_workers() if workers is None else workers
    workers = max(0, min(workers, os.cpu_count() or 1, batch_size))
    loader = DataLoader(dataset, batch_size=batch_size,
                        shuffle=shuffle and not rect and sampler is None,
                        sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                        worker_init_fn=_worker_init if workers else None,
                        persistent_workers=workers > 0, pin_memory=pin_memory)
    return loader, dataset


class DataFile:
    """A .data file parsed once, and the loaders a run builds from it, each built once:
    the validation loader (rect batches, for mAP) and fixed training batches (for
    BatchNorm recalibration and the criteria that score on data)."""

    def __init__(self, path):
        self.path, self.options = path, parse_data_cfg(path)
        self._valid = {}
        self._batches = {}

    @property
    def classes(self):
        return self.options['classes']

    @property
    def has_train(self):
        return 'train' in self.options

    def valid_loader(self, img_size, batch_size, stride, workers=0):
        key = (img_size, batch_size, stride, workers)
        if key not in self._valid:
            self._valid[key], _ = create_dataloader(
                require_data_key(self.options, 'valid', self.path), img_size, batch_size,
                self.classes, rect=True, workers=workers, stride=stride)
        return self._valid[key]

    def train_loader(self, img_size, batch_size, stride, augment=True, workers=0, shards=None,
                     cache=False, pin_memory=False):
        """(loader, dataset) over the train= list, for training."""
        return create_dataloader(require_data_key(self.options, 'train', self.path), img_size,
                                 batch_size, self.classes, augment=augment, workers=workers,
                                 stride=stride, shards=shards, cache=cache,
                                 pin_memory=pin_memory)

    def training_batches(self, images, img_size, batch_size, stride, workers=0, seed=0):
        """`images` training images as a list of (images, targets) batches, letterboxed
        without augmentation, in a fixed shuffled order (a train list is often sorted by
        class or scene)."""
        key = (images, img_size, batch_size, stride, seed)
        if key not in self._batches:
            loader, _ = create_dataloader(require_data_key(self.options, 'train', self.path),
                                          img_size, batch_size, self.classes, workers=workers,
                                          stride=stride, shards=(0, 1, seed))
            batches, count = [], 0
            for imgs, targets, _, _ in loader:
                take = min(len(imgs), images - count)
                batches.append((imgs[:take], targets[targets[:, 0] < take]))
                count += take
                if count >= images:
                    break
            self._batches[key] = batches
        return self._batches[key]
