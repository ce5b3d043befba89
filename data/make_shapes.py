r"""Generate the synthetic "shapes" detection data set in the Darknet layout.

    python data/make_shapes.py --out data/shapes --seed 0 \
        --n-train 1000 --n-valid 200 --img-size 128

Each image shows 0 to 8 filled shapes (circle, square, triangle, cross) of random size
(down to about 6 px), colour and rotation on a textured background (colour gradient,
soft blotches, thin lines, pixel noise). Shapes may overlap a little and may be cut by
the image border; every label is the tight box of the pixels of its shape that remain
visible. The output is fully determined by the seed: image i of a split is drawn from
its own generator seeded with (seed, split, i), so the same seed gives byte-identical
files however many images are asked for.

Written under --out:
    images/{train,valid}/NNNNNN.jpg   the images
    labels/{train,valid}/NNNNNN.txt   one `class cx cy w h` line per shape, normalised
    train.txt, valid.txt              image paths relative to the folder of the list file
    shapes.names, shapes.data         class names, and a .data file with absolute paths

The repository's own data/shapes.data points at data/shapes/ with paths relative to the
repository root (run scripts from there); `ensure_shapes()` builds that default set the
first time it is needed.
"""
import math
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

if __package__ in (None, ''):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli.common import ArgumentParser  # noqa: E402
from darknet.cfg import parse_data_cfg  # noqa: E402
from utils.errors import UserInputError, run_cli  # noqa: E402
from utils.fileio import atomic_write_text  # noqa: E402

CLASS_NAMES = ('circle', 'square', 'triangle', 'cross')
SPLITS = ('train', 'valid')

# Defaults of the demo set: small enough to generate in seconds and to train a tiny
# model for a few epochs on a laptop CPU at --img-size 128.
SEED = 0
N_TRAIN = 1000
N_VALID = 200
IMG_SIZE = 128
MAX_OBJECTS = 8
MIN_SIZE = 8            # smallest shape diameter in pixels (boxes down to about 6 px)
MAX_SIZE_FRAC = 0.55    # largest shape diameter as a fraction of the image side
MIN_VISIBLE = 0.6       # a shape keeps at least this share of its pixels visible
MIN_CONTRAST = 90.0     # Euclidean BGR distance between a shape and what lies under it


# ---------------------------------------------------------------------------- drawing

def _background(rng, size):
    """A textured background: gradient + soft blotches + thin lines + soft blobs."""
    c0, c1 = rng.uniform(0, 255, (2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 + (c1 - c0) * t[..., None]  # (size, size, 3)

    # low-frequency blotches: a coarse random grid upsampled smoothly
    k = int(rng.integers(2, 6))
    grid = rng.normal(0.0, rng.uniform(5, 35), (k, k, 3)).astype(np.float32)
    img += cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)

    # blurred blobs: soft-edged, so they cannot pass for the hard-edged circles
    blobs = np.zeros((size, size, 3), np.float32)
    for _ in range(int(rng.integers(0, 4))):
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        axes = tuple(int(v) for v in rng.integers(size // 16 + 1, size // 4 + 2, 2))
        cv2.ellipse(blobs, centre, axes, float(rng.uniform(0, 180)), 0, 360,
                    rng.uniform(-80, 80, 3).tolist(), -1)
    if blobs.any():
        img += cv2.GaussianBlur(blobs, (0, 0), sigmaX=size / 24)

    # thin straight lines (clutter the detector must learn to ignore)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 6))):
        p1 = tuple(int(v) for v in rng.integers(-size // 4, size + size // 4, 2))
        p2 = tuple(int(v) for v in rng.integers(-size // 4, size + size // 4, 2))
        cv2.line(img, p1, p2, rng.integers(0, 256, 3).tolist(), int(rng.integers(1, 3)),
                 cv2.LINE_AA)
    return img


def _polygon(cls, d, angle):
    """Vertices (k, 2) of a shape of diameter `d` centred on the origin, rotated."""
    r = d / 2
    if cls == 1:    # square: 4 vertices on the circumscribed circle
        a = angle + np.pi / 4 + np.arange(4) * np.pi / 2
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if cls == 2:    # equilateral triangle
        a = angle + np.arange(3) * 2 * np.pi / 3
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if cls == 3:    # plus-shaped cross, arm half-width a third of the arm half-length
        b = r / 3
        pts = np.array([(b, r), (b, b), (r, b), (r, -b), (b, -b), (b, -r),
                        (-b, -r), (-b, -b), (-r, -b), (-r, b), (-b, b), (-b, r)])
        c, s = math.cos(angle), math.sin(angle)
        return pts @ np.array([[c, s], [-s, c]])
    raise ValueError(f'class {cls} is not a polygon')


def _shape_mask(cls, cx, cy, d, angle, size, pad):
    """Boolean mask of one shape on a canvas of side size + 2 * pad (image at [pad:-pad])."""
    canvas = np.zeros((size + 2 * pad, size + 2 * pad), np.uint8)
    shift = 4  # sub-pixel vertex positions (fixed point, 1/16 px)
    scale = 1 << shift
    if cls == 0:
        centre = (int(round((cx + pad) * scale)), int(round((cy + pad) * scale)))
        cv2.circle(canvas, centre, int(round(d / 2 * scale)), 1, -1, cv2.LINE_8, shift)
    else:
        pts = _polygon(cls, d, angle) + (cx + pad, cy + pad)
        cv2.fillPoly(canvas, [np.round(pts * scale).astype(np.int32)], 1, cv2.LINE_8,
                     shift=shift)
    return canvas.astype(bool)


def _pick_colour(rng, under, plain):
    """A colour that stands out from the mean colour of the pixels it will cover."""
    best, best_dist = None, -1.0
    for _ in range(12):
        colour = rng.uniform(40 if plain else 0, 255, 3)
        dist = float(np.linalg.norm(colour - under))
        if dist >= MIN_CONTRAST:
            return colour
        if dist > best_dist:
            best, best_dist = colour, dist
    return best


def render_scene(rng, img_size=IMG_SIZE, plain=False):
    """Draw one image and its labels.

    Returns (image (H, W, 3) uint8 BGR, labels (n, 5) float64 [class, cx, cy, w, h]
    normalised). `plain=True` draws on flat black with no clutter, noise or shading, so
    the visible pixels of the shapes are exactly the non-black pixels (for tests).
    """
    size = img_size
    img = np.zeros((size, size, 3), np.uint8) if plain else _background(rng, size)
    max_d = max(MIN_SIZE + 1.0, MAX_SIZE_FRAC * size)
    pad = int(math.ceil(max_d))
    owner = np.full((size, size), -1, np.int16)  # index of the shape owning each pixel
    areas, classes = [], []                       # visible pixel count when placed

    for _ in range(int(rng.integers(0, MAX_OBJECTS + 1))):
        for _try in range(20):
            cls = int(rng.integers(0, len(CLASS_NAMES)))
            d = float(math.exp(rng.uniform(math.log(MIN_SIZE), math.log(max_d))))
            cx, cy = rng.uniform(-0.25 * d, size + 0.25 * d, 2)
            angle = float(rng.uniform(0, 2 * math.pi))
            full = _shape_mask(cls, cx, cy, d, angle, size, pad)
            mask = full[pad:pad + size, pad:pad + size]
            n_in = int(mask.sum())
            if n_in < MIN_VISIBLE * full.sum() or n_in < 12:
                continue  # mostly outside the image
            # the new shape goes on top: every earlier shape must stay mostly visible
            covered = np.bincount(owner[mask].astype(np.int64) + 1, minlength=len(areas) + 1)[1:]
            if len(areas):
                now = np.bincount(owner.ravel().astype(np.int64) + 1,
                                  minlength=len(areas) + 1)[1:] - covered
                if np.any(now < MIN_VISIBLE * np.asarray(areas)):
                    continue
            under = img[mask].mean(0)
            colour = _pick_colour(rng, under, plain)
            if plain:
                img[mask] = np.round(colour).astype(np.uint8)
            else:  # a gentle linear shading across the shape, so fills are not flat
                ys, xs = np.nonzero(mask)
                g = rng.uniform(-30, 30)
                ramp = ((xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)) / max(d, 1.0)
                img[ys, xs] = np.clip(colour + g * ramp[:, None], 0, 255).astype(np.uint8)
            owner[mask] = len(areas)
            areas.append(n_in)
            classes.append(cls)
            break

    if not plain:
        img = _camera_effects(rng, img)
    return img, _tight_labels(owner, classes, size)


def _camera_effects(rng, img):
    """A little blur now and then, and pixel noise."""
    if rng.random() < 0.25:
        img = cv2.GaussianBlur(img, (3, 3), 0)
    sigma = rng.uniform(0, 12)
    noise = rng.normal(0.0, sigma, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _tight_labels(owner, classes, size):
    """(n, 5) [class, cx, cy, w, h] of the pixels each shape `owner` gives it."""
    labels = []
    for k, cls in enumerate(classes):
        ys, xs = np.nonzero(owner == k)
        # pixel i covers [i, i + 1): the tight box runs from min to max + 1
        x1, x2, y1, y2 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        labels.append((cls, (x1 + x2) / 2 / size, (y1 + y2) / 2 / size,
                       (x2 - x1) / size, (y2 - y1) / size))
    return np.array(labels, np.float64).reshape(-1, 5)


def format_labels(labels):
    """Darknet label text, one `class cx cy w h` line per row."""
    return ''.join(f'{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n' for c, x, y, w, h in labels)


# ---------------------------------------------------------------------------- writing

def _make_one(job):
    """Render and write image `index` of `split`; module level so a Pool can run it."""
    out, split, index, seed, img_size, ext, plain = job
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    img, labels = render_scene(rng, img_size, plain)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == '.jpg' else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, buf = cv2.imencode(ext, img, params)
    assert ok, 'OpenCV failed to encode an image'
    name = f'{index:06d}'
    Path(out, 'images', split, name + ext).write_bytes(buf.tobytes())
    Path(out, 'labels', split, name + '.txt').write_text(format_labels(labels))
    return f'images/{split}/{name}{ext}'


def generate(out, seed=SEED, n_train=N_TRAIN, n_valid=N_VALID, img_size=IMG_SIZE,
             image_format='jpg', plain=False, workers=None, progress=True):
    """Write the data set under `out`; return the path of the .data file written there.

    The list files are written last (to a temporary name, then renamed), so a run cut
    short leaves no list file behind and `ensure_shapes` starts over.
    """
    if image_format not in ('jpg', 'png'):
        raise UserInputError(f'--format {image_format}: use jpg or png')
    if img_size < 2 * MIN_SIZE:
        raise UserInputError(f'--img-size {img_size} is too small: use at least {2 * MIN_SIZE}')
    if n_train < 0 or n_valid < 0:
        raise UserInputError('--n-train and --n-valid must not be negative')
    out = Path(out).resolve()
    for split in SPLITS:
        (out / 'images' / split).mkdir(parents=True, exist_ok=True)
        (out / 'labels' / split).mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        list_file = out / f'{split}.txt'
        if list_file.exists():
            list_file.unlink()  # stale until rewritten below

    jobs = [(str(out), split, i, seed, img_size, '.' + image_format, plain)
            for split, n in zip(SPLITS, (n_train, n_valid)) for i in range(n)]
    workers = min(os.cpu_count() or 1, 4) if workers is None else workers
    bar = tqdm(total=len(jobs), desc=f'shapes -> {out}', disable=not progress, unit='img')
    if workers > 1 and len(jobs) > 64:
        import multiprocessing
        with multiprocessing.get_context('spawn').Pool(workers) as pool:
            rel = []
            for r in pool.imap(_make_one, jobs, chunksize=16):
                rel.append(r)
                bar.update()
    else:
        rel = []
        for job in jobs:
            rel.append(_make_one(job))
            bar.update()
    bar.close()

    atomic_write_text(out / 'shapes.names', ''.join(n + '\n' for n in CLASS_NAMES))
    for split in SPLITS:
        lines = [r for r in rel if r.startswith(f'images/{split}/')]
        atomic_write_text(out / f'{split}.txt', ''.join(r + '\n' for r in lines))
    data_path = out / 'shapes.data'
    atomic_write_text(data_path, f'classes={len(CLASS_NAMES)}\n'
                                 f'train={out / "train.txt"}\n'
                                 f'valid={out / "valid.txt"}\n'
                                 f'names={out / "shapes.names"}\n')
    return data_path


# ---------------------------------------------------------------------------- ensure

def ensure_shapes(data_path='data/shapes.data', seed=SEED, n_train=N_TRAIN, n_valid=N_VALID,
                  img_size=IMG_SIZE, progress=True):
    """Generate the shapes set a .data file names, unless its list files already exist.

    The .data file is read as the training scripts read it (darknet.cfg: relative
    paths from the current folder, else from the .data file's folder), so the set lands
    where they will look. It is written to the folder of the `train` list, which must be
    named train.txt next to valid.txt. Returns `data_path`.
    """
    options = parse_data_cfg(str(data_path))
    for key in ('train', 'valid'):
        if key not in options:
            raise UserInputError(f'{data_path}: no {key}= line; add {key}=<folder>/{key}.txt')
    if options['classes'] != len(CLASS_NAMES):
        raise UserInputError(f'{data_path}: classes={options["classes"]} but the shapes set has '
                             f'{len(CLASS_NAMES)} classes; set classes={len(CLASS_NAMES)}')
    train, valid = Path(options['train']).resolve(), Path(options['valid']).resolve()
    if train.is_file() and valid.is_file():
        return data_path
    if (train.name, valid.name) != ('train.txt', 'valid.txt') or train.parent != valid.parent:
        raise UserInputError(f'{data_path}: cannot generate the shapes set there: train= and '
                             f'valid= must be <folder>/train.txt and <folder>/valid.txt')
    generate(train.parent, seed=seed, n_train=n_train, n_valid=n_valid, img_size=img_size,
             progress=progress)
    return data_path


# ---------------------------------------------------------------------------- CLI

def get_args_parser():
    p = ArgumentParser(description='Generate the synthetic shapes detection set.')
    p.add_argument('--out', default='data/shapes',
                   help='output folder (gets images/, labels/, train.txt, valid.txt)')
    p.add_argument('--seed', type=int, default=SEED, help='random seed; same seed, same files')
    p.add_argument('--n-train', type=int, default=N_TRAIN, help='number of training images')
    p.add_argument('--n-valid', type=int, default=N_VALID, help='number of validation images')
    p.add_argument('--img-size', type=int, default=IMG_SIZE, help='image side in pixels')
    p.add_argument('--format', default='jpg', choices=('jpg', 'png'), help='image file type')
    p.add_argument('--workers', type=int, default=None, help='processes (default: up to 4)')
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    t0 = time.time()
    data_path = generate(args.out, args.seed, args.n_train, args.n_valid, args.img_size,
                         image_format=args.format, workers=args.workers)
    print(f'wrote {args.n_train} + {args.n_valid} images in {time.time() - t0:.1f} s; '
          f'data file {data_path}')


if __name__ == '__main__':
    run_cli(main)
