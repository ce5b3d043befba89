r"""Generate the "digits" detection data set, in the Darknet layout, from real images.

    curl -L -o opencv-python-headless-4.10.0.84.tar.gz \
        https://files.pythonhosted.org/packages/2f/7e/d20f68a5f1487adf19d74378d349932a386b1ece3be9be9915e5986db468/opencv-python-headless-4.10.0.84.tar.gz
    python data/make_digits.py --source opencv-python-headless-4.10.0.84.tar.gz \
        --out data/digits --seed 0 --n-train 1000 --n-valid 300 --img-size 128

The source is OpenCV's source distribution (the PyPI sdist above, 95 MB), either the
.tar.gz itself (its members are read straight from the archive) or its extracted
`opencv/samples/data` folder. Two things are used from it:

  digits.png   5000 real handwritten digits, 20x20 px each, 50 rows x 100 columns,
               500 per class (rows 0-4 are the digit 0, rows 5-9 the digit 1, ...);
  photographs  45 real photos of that folder (PHOTOS_TRAIN, PHOTOS_VALID below;
               drawings, text pages, logos, digits and synthetic test patterns are not
               used).

Validation is held out on both: per class, the first 400 digits (in reading order) are
drawn only into training images and the last 100 only into validation images, and the
photos are split into disjoint train and valid pools (stereo pairs and near-duplicate
shots stay in the same pool).

Each image (--img-size, default 128) is a random crop of a pool photo, rescaled, maybe
mirrored, its contrast lowered (BG_GAIN) and its brightness shifted. On it, 1 to
MAX_OBJECTS digits are pasted: the digit's grey level is the alpha mask of an ink of one
random colour, dark or light, at least MIN_CONTRAST grey levels darker than the darkest
tenth (or lighter than the brightest tenth) of the background pixels it covers, black or
white where that cannot be. Digits are scaled to an ink height of MIN_BOX to MAX_BOX px
at 128 (28-56: boxes mostly 17-51 px wide, 29-55 px tall), rotated slightly, kept whole
inside the image, and overlap little. Each label is the tight box of the pixels where the
digit's alpha is at least ALPHA_BOX, less what later digits cover. Mild blur, noise and
a JPEG round trip are applied to some images. The 10 classes are named '0' to '9'.

The output is fully determined by the source and the seed: image i of a split is drawn
from its own generator seeded with (seed, split, i), so the same seed gives byte-identical
files however many images are asked for.

Written under --out:
    images/{train,valid}/NNNNNN.jpg   the images
    labels/{train,valid}/NNNNNN.txt   one `class cx cy w h` line per digit, normalised
    train.txt, valid.txt              image paths relative to the folder of the list file
    digits.names, digits.data         class names, and a .data file with absolute paths
"""
import math
import sys
import tarfile
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

if __package__ in (None, ''):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli.common import ArgumentParser  # noqa: E402
from utils.errors import UserInputError, run_cli  # noqa: E402
from utils.fileio import atomic_write_text  # noqa: E402

CLASS_NAMES = tuple(str(d) for d in range(10))
SPLITS = ('train', 'valid')
SDIST_URL = ('https://files.pythonhosted.org/packages/2f/7e/d20f68a5f1487adf19d74378d349932a'
             '386b1ece3be9be9915e5986db468/opencv-python-headless-4.10.0.84.tar.gz')

# digits.png layout
CELL = 20                 # side of one digit cell in pixels
GRID_ROWS, GRID_COLS = 50, 100
ROWS_PER_CLASS = GRID_ROWS // len(CLASS_NAMES)   # 5 rows = 500 digits per class
N_TRAIN_PER_CLASS = 400   # first 400 of each class: training pool; the last 100: valid

# Real photographs of samples/data, split by scene (pairs of one scene stay together).
# Of the stereo chessboard calibration shots only the left ones are used (the right ones
# are near-duplicates), so that these frames do not dominate the backgrounds.
PHOTOS_TRAIN = (
    'aero1.jpg', 'aero3.jpg', 'aloeL.jpg', 'aloeR.jpg', 'apple.jpg', 'basketball1.png',
    'basketball2.png', 'Blender_Suzanne1.jpg', 'Blender_Suzanne2.jpg', 'blox.jpg',
    'board.jpg', 'butterfly.jpg', 'chicky_512.png', 'ela_modified.jpg', 'ela_original.jpg',
    'fruits.jpg', 'graf1.png', 'graf3.png', 'home.jpg', 'lena.jpg', 'smarties.png',
    'starry_night.jpg', 'stuff.jpg',
    *(f'left{k:02d}.jpg' for k in range(1, 10)),
)
PHOTOS_VALID = (
    'baboon.jpg', 'building.jpg', 'leuvenA.jpg', 'leuvenB.jpg', 'messi5.jpg', 'orange.jpg',
    'rubberwhale1.png', 'rubberwhale2.png', 'squirrel_cls.jpg',
    *(f'left{k:02d}.jpg' for k in range(11, 15)),
)

# Defaults
SEED = 0
N_TRAIN = 1000
N_VALID = 300
IMG_SIZE = 128
MIN_OBJECTS, MAX_OBJECTS = 1, 3
# Height of a digit's ink in pixels at --img-size 128 (log-uniform; scaled with the size).
# Tuned for YOLOv3-tiny from the COCO backbone (--cutoff 15), 15 epochs at 128 px, seed 0:
# valid AP50 0.12 with 8-48 px, 1-6 digits, MIN_CONTRAST 60, BG_GAIN (0.7, 1.2); 0.71 with
# 24-56 px, 1-4 digits, 100, (0.3, 0.6); 0.75 with the values here.
MIN_BOX, MAX_BOX = 28.0, 56.0
MAX_ANGLE = 12.0          # rotation, degrees either way
MAX_OVERLAP = 0.15        # intersection / smaller box area allowed between two digits
ALPHA_BOX = 0.2           # ink alpha from which a pixel counts as visible ink
MIN_CONTRAST = 100.0      # grey levels between the ink and (most of) what it covers
MIN_CROP_FRAC = 0.25      # smallest background crop, as a share of the photo's short side
BG_GAIN = (0.3, 0.6)      # contrast of the background photo (1: as photographed)


# ---------------------------------------------------------------------------- source

def _photo_name_ok(name):
    return name in PHOTOS_TRAIN or name in PHOTOS_VALID


def _read_source_files(source):
    """{file name: bytes} of digits.png and the listed photos found in `source`."""
    source = Path(source)
    if not source.exists():
        raise UserInputError(f'--source {source}: no such file or folder; download the OpenCV '
                             f'sdist with: curl -L -O {SDIST_URL}')
    files = {}
    if source.is_dir():
        folder = source
        for sub in ('opencv/samples/data', 'samples/data'):  # an extracted sdist's root
            if not (folder / 'digits.png').is_file() and (source / sub).is_dir():
                folder = source / sub
        for p in folder.iterdir():
            if p.is_file() and (p.name == 'digits.png' or _photo_name_ok(p.name)):
                files[p.name] = p.read_bytes()
        where = str(folder)
    else:
        try:
            with tarfile.open(source, 'r:*') as tar:
                for member in tar:
                    parts = member.name.split('/')
                    if (member.isfile() and parts[-3:-1] == ['samples', 'data']
                            and 'modules' not in parts
                            and (parts[-1] == 'digits.png' or _photo_name_ok(parts[-1]))):
                        files[parts[-1]] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise UserInputError(f'--source {source}: cannot read it as a tar archive ({e}); '
                                 f'give the OpenCV sdist .tar.gz or its samples/data folder')
        where = f'{source} (samples/data/)'
    if 'digits.png' not in files:
        raise UserInputError(f'--source {where}: no digits.png; give the OpenCV sdist '
                             f'({SDIST_URL}) or its extracted opencv/samples/data folder')
    for pool, names in (('train', PHOTOS_TRAIN), ('valid', PHOTOS_VALID)):
        if not any(n in files for n in names):
            raise UserInputError(f'--source {where}: none of the {pool} photos '
                                 f'({", ".join(names[:4])}, ...) is there; give the OpenCV '
                                 f'sdist or its extracted opencv/samples/data folder')
    return files


def _decode(name, data, flags):
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if img is None:
        raise UserInputError(f'--source: {name} is not a readable image')
    return img


def load_source(source):
    """Read the source once: returns (digit pools, photo pools).

    digit pools: {'train': [(class, 20x20 uint8), ...], 'valid': [...]}
    photo pools: {'train': [BGR uint8 image, ...], 'valid': [...]}, in list order.
    """
    files = _read_source_files(source)
    sheet = _decode('digits.png', files['digits.png'], cv2.IMREAD_GRAYSCALE)
    if sheet.shape != (GRID_ROWS * CELL, GRID_COLS * CELL):
        raise UserInputError(f'--source: digits.png is {sheet.shape[1]}x{sheet.shape[0]} px, '
                             f'expected {GRID_COLS * CELL}x{GRID_ROWS * CELL} '
                             f'({GRID_ROWS} rows x {GRID_COLS} digits of {CELL} px)')
    digits = {'train': [], 'valid': []}
    for cls in range(len(CLASS_NAMES)):
        for k in range(ROWS_PER_CLASS * GRID_COLS):  # reading order within the class
            r, c = cls * ROWS_PER_CLASS + k // GRID_COLS, k % GRID_COLS
            cell = sheet[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
            if cell.max() < 64:
                continue  # an empty cell (not in OpenCV's sheet; guards a damaged one)
            digits['train' if k < N_TRAIN_PER_CLASS else 'valid'].append((cls, cell.copy()))
    photos = {}
    for pool, names in (('train', PHOTOS_TRAIN), ('valid', PHOTOS_VALID)):
        photos[pool] = [_decode(n, files[n], cv2.IMREAD_COLOR) for n in names if n in files]
    return digits, photos


# ---------------------------------------------------------------------------- drawing

def _background(rng, photo, size):
    """A random square crop of `photo`, rescaled to size x size, jittered; float32 BGR."""
    h, w = photo.shape[:2]
    short = min(h, w)
    side = int(round(short * rng.uniform(MIN_CROP_FRAC, 1.0)))
    side = max(min(side, short), 1)
    y0 = int(rng.integers(0, h - side + 1))
    x0 = int(rng.integers(0, w - side + 1))
    crop = photo[y0:y0 + side, x0:x0 + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    img = cv2.resize(crop, (size, size), interpolation=interp).astype(np.float32)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    gain = rng.uniform(*BG_GAIN)
    bias = rng.uniform(-25, 25)
    img = (img - 128.0) * gain + 128.0 + bias
    return np.clip(img, 0, 255).astype(np.float32)


def _luma(bgr):
    return bgr @ np.array([0.114, 0.587, 0.299])


def _pick_ink(rng, under):
    """An ink colour standing out from the background pixels `under` (k, 3) it covers.

    Dark ink goes at least MIN_CONTRAST grey levels below the darkest tenth of them,
    light ink as far above the brightest tenth; where neither fits, the side with more
    room gets black or white ink.
    """
    lum = _luma(under)
    lo, hi = np.percentile(lum, 10), np.percentile(lum, 90)
    options = []
    if lo - MIN_CONTRAST >= 0:
        options.append((0.0, lo - MIN_CONTRAST))      # dark ink
    if hi + MIN_CONTRAST <= 255:
        options.append((hi + MIN_CONTRAST, 255.0))    # light ink
    if not options:
        return np.zeros(3) if lo > 255 - hi else np.full(3, 255.0)
    a, b = options[int(rng.integers(0, len(options)))]
    target = rng.uniform(a, b)
    for _ in range(8):
        colour = rng.uniform(0, 255, 3)
        colour = np.clip(colour + (target - _luma(colour)), 0, 255)
        if a - 0.5 <= _luma(colour) <= b + 0.5:
            return colour
    return np.full(3, target)  # grey: exactly the target level


def _ink_bounds(cell):
    """(x1, y1, x2, y2) of the pixels of a digit cell at alpha >= ALPHA_BOX."""
    ys, xs = np.nonzero(cell >= ALPHA_BOX * 255)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def _warp_digit(cell, height, angle, cx, cy, size):
    """The digit's alpha (size x size float32 in [0, 1]), its ink `height` px tall,
    rotated by `angle` degrees and centred on (cx, cy)."""
    x1, y1, x2, y2 = _ink_bounds(cell)
    scale = height / max(y2 - y1, 1)
    # in pixel-index coordinates (warpAffine's): pixel j covers [j - 0.5, j + 0.5]
    src_c = ((x1 + x2 - 1) / 2, (y1 + y2 - 1) / 2)  # ink centre in the cell
    m = cv2.getRotationMatrix2D(src_c, angle, scale)
    m[:, 2] += (cx - 0.5 - src_c[0], cy - 0.5 - src_c[1])
    alpha = cv2.warpAffine(cell.astype(np.float32) / 255.0, m, (size, size),
                           flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return np.clip(alpha, 0, 1)


def _box_of(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def _overlap(a, b):
    """Intersection over the smaller box's area."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(small, 1e-9)


def render_scene(rng, digits, photos, img_size=IMG_SIZE, effects=True):
    """Draw one image and its labels.

    `digits` is a list of (class, 20x20 uint8 cell), `photos` a list of BGR images: the
    pools of one split. Returns (image (H, W, 3) uint8 BGR, labels (n, 5) float64
    [class, cx, cy, w, h] normalised, background (H, W, 3) uint8: the image before any
    digit was pasted and before the effects). `effects=False` leaves out blur, noise
    and the JPEG round trip, so that the image differs from the background only where
    ink was pasted (for tests).
    """
    size = img_size
    photo = photos[int(rng.integers(0, len(photos)))]
    bg = _background(rng, photo, size)
    img = bg.copy()
    max_h = MAX_BOX * size / IMG_SIZE
    min_h = MIN_BOX * size / IMG_SIZE
    placed = []    # (class, alpha mask at >= ALPHA_BOX)
    boxes = []
    for _ in range(int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))):
        for _try in range(30):
            cls, cell = digits[int(rng.integers(0, len(digits)))]
            height = float(math.exp(rng.uniform(math.log(min_h), math.log(max_h))))
            angle = float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))
            margin = 0.6 * height + 2
            if size - 2 * margin <= 0:
                continue
            cx, cy = rng.uniform(margin, size - margin, 2)
            alpha = _warp_digit(cell, height, angle, cx, cy, size)
            ink = alpha >= ALPHA_BOX
            if ink.sum() < 6:
                continue
            box = _box_of(ink)
            if box[0] <= 0 or box[1] <= 0 or box[2] >= size or box[3] >= size:
                continue  # keep every digit whole inside the image
            if any(_overlap(box, b) > MAX_OVERLAP for b in boxes):
                continue
            colour = _pick_ink(rng, img[ink])
            a = alpha[..., None] * rng.uniform(0.85, 1.0)  # ink opacity
            img = img * (1 - a) + colour * a
            placed.append((cls, ink))
            boxes.append(box)
            break

    background = np.round(bg).astype(np.uint8)
    return _camera_effects(rng, img, effects), _visible_labels(placed, size), background


def _camera_effects(rng, img, effects):
    """The float image as uint8; with `effects`, a mild blur now and then, pixel noise,
    and sometimes a JPEG round trip."""
    if effects:
        if rng.random() < 0.3:
            img = cv2.GaussianBlur(img, (0, 0), sigmaX=rng.uniform(0.4, 0.9))
        sigma = rng.uniform(0, 8)
        img = img + rng.normal(0.0, sigma, img.shape)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    if effects and rng.random() < 0.3:
        ok, buf = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(35, 90))])
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return img


def _visible_labels(placed, size):
    """(n, 5) [class, cx, cy, w, h] of the ink of each placed digit still visible."""
    labels = []
    covered = np.zeros((size, size), bool)
    for cls, ink in reversed(placed):  # later digits lie on top: box what stays visible
        visible = ink & ~covered
        covered |= ink
        if not visible.any():
            continue
        x1, y1, x2, y2 = _box_of(visible)
        labels.append((cls, (x1 + x2) / 2 / size, (y1 + y2) / 2 / size,
                       (x2 - x1) / size, (y2 - y1) / size))
    labels.reverse()
    return np.array(labels, np.float64).reshape(-1, 5)


def format_labels(labels):
    """Darknet label text, one `class cx cy w h` line per row."""
    return ''.join(f'{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n' for c, x, y, w, h in labels)


# ---------------------------------------------------------------------------- writing

def generate(out, source, seed=SEED, n_train=N_TRAIN, n_valid=N_VALID, img_size=IMG_SIZE,
             image_format='jpg', effects=True, progress=True):
    """Write the data set under `out`; return the path of the .data file written there.

    The list files are written last (to a temporary name, then renamed), so a run cut
    short leaves no list file behind.
    """
    if image_format not in ('jpg', 'png'):
        raise UserInputError(f'--format {image_format}: use jpg or png')
    if img_size < 32:
        raise UserInputError(f'--img-size {img_size} is too small: use at least 32')
    if n_train < 0 or n_valid < 0:
        raise UserInputError('--n-train and --n-valid must not be negative')
    digits, photos = load_source(source)
    out = Path(out).resolve()
    for split in SPLITS:
        (out / 'images' / split).mkdir(parents=True, exist_ok=True)
        (out / 'labels' / split).mkdir(parents=True, exist_ok=True)
        list_file = out / f'{split}.txt'
        if list_file.exists():
            list_file.unlink()  # stale until rewritten below

    ext = '.' + image_format
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == '.jpg' else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    bar = tqdm(total=n_train + n_valid, desc=f'digits -> {out}', disable=not progress, unit='img')
    rel = {split: [] for split in SPLITS}
    for split, n in zip(SPLITS, (n_train, n_valid)):
        for i in range(n):
            rng = np.random.default_rng([seed, SPLITS.index(split), i])
            img, labels, _ = render_scene(rng, digits[split], photos[split], img_size, effects)
            ok, buf = cv2.imencode(ext, img, params)
            assert ok, 'OpenCV failed to encode an image'
            name = f'{i:06d}'
            (out / 'images' / split / (name + ext)).write_bytes(buf.tobytes())
            (out / 'labels' / split / (name + '.txt')).write_text(format_labels(labels))
            rel[split].append(f'images/{split}/{name}{ext}')
            bar.update()
    bar.close()

    atomic_write_text(out / 'digits.names', ''.join(n + '\n' for n in CLASS_NAMES))
    for split in SPLITS:
        atomic_write_text(out / f'{split}.txt', ''.join(r + '\n' for r in rel[split]))
    data_path = out / 'digits.data'
    atomic_write_text(data_path, f'classes={len(CLASS_NAMES)}\n'
                                 f'train={out / "train.txt"}\n'
                                 f'valid={out / "valid.txt"}\n'
                                 f'names={out / "digits.names"}\n')
    return data_path


# ---------------------------------------------------------------------------- CLI

def get_args_parser():
    p = ArgumentParser(description='Generate the digits detection set (real handwritten '
                                   'digits on real photos) from the OpenCV sdist.')
    p.add_argument('--source', required=True,
                   help='the OpenCV sdist .tar.gz (opencv-python-headless-4.10.0.84.tar.gz) '
                        'or its extracted opencv/samples/data folder')
    p.add_argument('--out', default='data/digits',
                   help='output folder (gets images/, labels/, train.txt, valid.txt)')
    p.add_argument('--seed', type=int, default=SEED, help='random seed; same seed, same files')
    p.add_argument('--n-train', type=int, default=N_TRAIN, help='number of training images')
    p.add_argument('--n-valid', type=int, default=N_VALID, help='number of validation images')
    p.add_argument('--img-size', type=int, default=IMG_SIZE, help='image side in pixels')
    p.add_argument('--format', default='jpg', choices=('jpg', 'png'), help='image file type')
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    t0 = time.time()
    data_path = generate(args.out, args.source, args.seed, args.n_train, args.n_valid,
                         args.img_size, image_format=args.format)
    print(f'wrote {args.n_train} + {args.n_valid} images in {time.time() - t0:.1f} s; '
          f'data file {data_path}')


if __name__ == '__main__':
    run_cli(main)
