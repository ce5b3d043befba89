"""The catalogue of bad inputs: every user-facing script (train.py, test.py and the four
prune scripts) refuses each one with exit status 2 and exactly one stderr line,
`error: <file> [line/layer]: <what> ; <fix>`, prints no traceback, writes no file into
its output folder and leaves every input byte-identical (sha256 before and after).

Most cases run in this process through the script's own `main(argv)`, wrapped by
`run_cli` exactly as `python script.py` wraps it (each child process would spend about
1.5 s importing torch); stdout/stderr are captured at the file-descriptor level, so what
OpenCV or libpng print in C is seen too. `SUBPROCESS` cases run as real child processes,
at least one per script, with the default DataLoader workers where a data set is read.

stderr is read as a terminal shows it: tqdm redraws its progress bar with carriage
returns and clears it (leave=False) before the error line, so only the text after the
last '\\r' of each line counts.
"""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TEST_CFGS, randomize_weights

from darknet.model import Darknet
from darknet.weights import save_model_weights, save_weights
from data.make_shapes import generate
from pruning.plan import plan_masks
from utils.errors import run_cli

CFG = os.path.join(TEST_CFGS, 'small_detector.cfg')       # 4 classes, stride 8, 64x64
OTHER_CFG = os.path.join(TEST_CFGS, 'features.cfg')       # 2 classes, with a shortcut


# ---------------------------------------------------------------- the inputs

def _edit_cfg(text, old, new, count=1):
    assert old in text, old
    return text.replace(old, new, count)


def _line_of(text, needle, occurrence=1):
    """1-based line number of the `occurrence`-th line of `text` containing `needle`."""
    hits = [n for n, line in enumerate(text.splitlines(), 1) if needle in line]
    return hits[occurrence - 1]


def _small_set(folder, name, label_text, image_bytes, classes=4):
    """A one-image data set `folder/name/` (images/a.png, labels/a.txt) and its .data."""
    root = folder / name
    (root / 'images').mkdir(parents=True)
    (root / 'labels').mkdir()
    (root / 'images' / 'a.png').write_bytes(image_bytes)
    if label_text is not None:
        (root / 'labels' / 'a.txt').write_text(label_text)
    (root / 'list.txt').write_text('images/a.png\n')
    data = folder / f'{name}.data'
    data.write_text(f'classes={classes}\ntrain={root}/list.txt\nvalid={root}/list.txt\n')
    return data


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    """Good and bad inputs side by side in one folder; `facts` holds computed values."""
    d = tmp_path_factory.mktemp('inputs')
    text = open(CFG).read()
    (d / 'good.cfg').write_text(text)
    model = randomize_weights(Darknet(CFG), seed=0)
    save_weights(model, str(d / 'good.weights'))
    save_model_weights(model, str(d / 'good.pt'))
    good = (d / 'good.weights').read_bytes()
    (d / 'copy.weights').write_bytes(good)  # the one a case tries to overwrite

    # weights files
    (d / 'truncated.weights').write_bytes(good[:len(good) // 2])
    (d / 'oversized.weights').write_bytes(good + bytes(64))
    (d / 'header_only.weights').write_bytes(good[:20])
    (d / 'short_header.weights').write_bytes(good[:10])
    (d / 'empty.weights').write_bytes(b'')
    (d / 'text.weights').write_text('[net]\nwidth=64\nheight=64\n' * 30)
    other = randomize_weights(Darknet(OTHER_CFG), seed=1)
    save_weights(other, str(d / 'other_model.weights'))
    save_model_weights(other, str(d / 'other_cfg.pt'))
    (d / 'garbage.pt').write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8)
                                   .tobytes())
    (d / 'text.pt').write_text('hello, this is not a checkpoint\n' * 40)
    (d / 'weights_folder.weights').mkdir()
    (d / 'other.cfg').write_text(open(OTHER_CFG).read())

    # cfgs (line numbers are looked up, so the test follows edits of small_detector.cfg)
    cfgs = {
        'unknown_layer': _edit_cfg(text, '[upsample]', '[upsampling]'),
        'broken_line': _edit_cfg(text, 'filters=32', 'filters 32'),
        'not_a_number': _edit_cfg(text, 'filters=64', 'filters=sixty-four'),
        'route_outside': _edit_cfg(text, 'layers=-4', 'layers=-40'),
        'shortcut_outside': _edit_cfg(text, '[maxpool]', '[shortcut]\nfrom=-9\n\n[maxpool]'),
        'head_mismatch': _edit_cfg(text, 'classes=4', 'classes=5'),
        'empty': '',
    }
    for name, body in cfgs.items():
        (d / f'{name}.cfg').write_text(body)
    (d / 'binary.cfg').write_bytes(good[:400])
    (d / 'cfg_folder.cfg').mkdir()
    lines = {name: _line_of(body, needle) for name, body, needle in [
        ('unknown_layer', cfgs['unknown_layer'], '[upsampling]'),
        ('broken_line', cfgs['broken_line'], 'filters 32'),
        ('not_a_number', cfgs['not_a_number'], 'sixty-four'),
        ('route_outside', cfgs['route_outside'], '[route]'),
        ('shortcut_outside', cfgs['shortcut_outside'], '[shortcut]'),
        ('head_mismatch', cfgs['head_mismatch'], 'filters=27')]}
    # the message names the header line of the conv block that holds filters=27
    lines['head_mismatch'] = max(n for n, line in enumerate(text.splitlines(), 1)
                                 if line == '[convolutional]' and n < lines['head_mismatch'])

    # the data set, and broken copies of it
    data = generate(d / 'shapes', seed=5, n_train=4, n_valid=4, img_size=64, plain=True,
                    image_format='png', workers=1, progress=False)
    png = (d / 'shapes' / 'images' / 'valid' / '000000.png').read_bytes()
    shapes = d / 'shapes'
    (d / 'no_classes.data').write_text(f'train={shapes}/train.txt\nvalid={shapes}/valid.txt\n')
    (d / 'no_train.data').write_text(f'classes=4\nvalid={shapes}/valid.txt\n')
    (d / 'no_valid.data').write_text(f'classes=4\ntrain={shapes}/train.txt\n')
    (d / 'three_classes.data').write_text(f'classes=3\ntrain={shapes}/train.txt\n'
                                          f'valid={shapes}/valid.txt\n')
    (d / 'missing_images.txt').write_text('shapes/images/valid/000000.png\n'
                                          'shapes/images/valid/nothere.png\n')
    (d / 'missing_images.data').write_text(f'classes=4\ntrain={d}/missing_images.txt\n'
                                           f'valid={d}/missing_images.txt\n')
    _small_set(d, 'malformed', '0 0.5 0.5 0.2\n', png)
    _small_set(d, 'not_numbers', '0 0.5 0.5 0.2 0.2\n1 half 0.5 0.2 0.2\n', png)
    _small_set(d, 'out_of_range', '2 1.5 0.5 0.2 0.2\n', png)
    _small_set(d, 'class_past', '0 0.5 0.5 0.2 0.2\n4 0.5 0.5 0.2 0.2\n', png)
    # a valid PNG signature and IHDR (so the header check passes), then garbage
    body = np.random.default_rng(1).integers(0, 256, len(png) - 33, np.uint8).tobytes()
    _small_set(d, 'corrupt', '0 0.5 0.5 0.2 0.2\n', png[:33] + body)

    # inputs named like the outputs they would become
    collide = d / 'collide'
    collide.mkdir()
    # prune outputs are named after the cfg: sparse.cfg's are sparse-normal-0.5.*
    shutil.copy(d / 'good.weights', collide / 'sparse-normal-0.5.weights')
    shutil.copy(d / 'good.cfg', collide / 'sparse.cfg')
    run = d / 'run'
    run.mkdir()
    shutil.copy(d / 'good.pt', run / 'last.pt')
    broken_run = d / 'broken_run'
    broken_run.mkdir()
    (broken_run / 'last.pt').write_bytes(good[:300])

    safe = plan_masks(model, 'shortcut', 0.0).safe_percent
    past_safe = round(safe + (1 - safe) / 2, 4)
    assert safe < past_safe < 1
    return {'dir': d, 'data': str(data), 'lines': lines, 'safe': safe,
            'past_safe': past_safe}


def _digest(folder):
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob('*')) if p.is_file()}


def _files(folder):
    return sorted(str(p) for p in Path(folder).rglob('*') if not p.is_dir())


def visible_lines(stderr):
    """stderr as a terminal shows it: per line, the text after the last carriage return."""
    lines = [line.rsplit('\r', 1)[-1].rstrip() for line in stderr.split('\n')]
    return [line for line in lines if line.strip()]


# ---------------------------------------------------------------- the cases

C, W, P = '{d}/good.cfg', '{d}/good.weights', '{d}/good.pt'
DATA = '{data}'


def case(script, args, needles, subprocess=False, id=None, marks=()):
    return pytest.param(script, args, needles, subprocess, id=id, marks=marks)


# /sys refuses every mkdir, even root's: the one "no permission" case a root test can see
NO_SYS = pytest.mark.skipif(not os.path.isdir('/sys/kernel'), reason='no Linux /sys here')


TRAIN = ['--epochs', '1', '--batch-size', '2', '--img-size', '64']
CASES = [
    # ---- train.py
    case('train.py', ['--cfg', '{d}/missing.cfg', '--data', DATA],
         ['{d}/missing.cfg: cfg file not found', 'check the --cfg path'], id='train-missing-cfg'),
    case('train.py', ['--cfg', '{d}/unknown_layer.cfg', '--data', DATA],
         ['{d}/unknown_layer.cfg line {unknown_layer}: layer type [upsampling] is not supported',
          'supported: convolutional'], id='train-unknown-layer'),
    case('train.py', ['--cfg', '{d}/shortcut_outside.cfg', '--data', DATA],
         ['{d}/shortcut_outside.cfg line {shortcut_outside}: [shortcut] from=-9 points to '
          'layer -8', 'fix the reference'], id='train-shortcut-outside'),
    case('train.py', ['--cfg', C, '--weights', '{d}/other_cfg.pt', '--data', DATA],
         ['{d}/other_cfg.pt: layer 0 [convolutional]', 'the checkpoint is for another cfg'],
         id='train-pt-of-another-cfg'),
    case('train.py', ['--cfg', C, '--weights', '{d}/text.pt', '--data', DATA],
         ['{d}/text.pt: not a readable PyTorch checkpoint', 'pass a .pt saved by train.py'],
         id='train-text-as-pt'),
    case('train.py', ['--cfg', C, '--data', '{d}/no_classes.data'],
         ["{d}/no_classes.data: no 'classes=' line", 'add the number of classes'],
         id='train-data-without-classes'),
    case('train.py', ['--cfg', C, '--data', '{d}/no_train.data'],
         ["{d}/no_train.data: no 'train=' line", 'add the path of the train list'],
         id='train-data-without-train'),
    case('train.py', ['--cfg', C, '--data', '{d}/missing_images.data'],
         ["{d}/missing_images.txt:2: image 'shapes/images/valid/nothere.png' not found",
          'remove the images from the list file'], id='train-missing-image'),
    case('train.py', ['--cfg', C, '--data', '{d}/malformed.data'],
         ['{d}/malformed/labels/a.txt:1: expected 5 numbers "class cx cy w h", got 4 fields',
          'Fix or delete these label lines'], id='train-label-malformed'),
    case('train.py', ['--cfg', C, '--data', '{d}/class_past.data'],
         ['{d}/class_past/labels/a.txt:2: class 4 is not below classes=4',
          'Fix or delete these label lines'], id='train-label-class-past-classes'),
    case('train.py', ['--cfg', C, '--data', '{d}/corrupt.data', '--no-augment'],
         ['{d}/corrupt/images/a.png: cannot decode image',
          'replace the file or remove it from the list file'], id='train-corrupt-image'),
    case('train.py', ['--cfg', C, '--data', DATA, '--img-size', '60'],
         ['--img-size 60 is not a multiple of the model stride 8', 'use 56 or 64'],
         id='train-img-size-off-stride'),
    case('train.py', ['--cfg', C, '--data', DATA, '--epochs', '0'],
         ['--epochs 0: use 1 or more'], id='train-zero-epochs'),
    case('train.py', ['--cfg', C, '--weights', '{d}/run/last.pt', '--data', DATA,
                      '--output-dir', '{d}/run'],
         ['--weights {d}/run/last.pt would be overwritten by this run',
          'choose another --output-dir'], subprocess=True, id='train-weights-are-last-pt'),
    case('train.py', ['--cfg', C, '--data', DATA, '--resume'],
         ['{o}/run/last.pt: nothing to resume', 'start without --resume'],
         id='train-resume-without-run'),
    case('train.py', ['--cfg', C, '--data', DATA, '--resume', '--output-dir', '{d}/broken_run'],
         ['{d}/broken_run/last.pt: not a readable PyTorch checkpoint',
          'start the run again without --resume'], id='train-resume-broken-last-pt'),

    # ---- test.py
    case('test.py', ['--cfg', '{d}/empty.cfg', '--weights', W, '--data', DATA],
         ['{d}/empty.cfg: no sections found', 'starts with [net]'], id='test-empty-cfg'),
    case('test.py', ['--cfg', '{d}/not_a_number.cfg', '--weights', W, '--data', DATA],
         ["{d}/not_a_number.cfg line {not_a_number}: filters='sixty-four' is not a valid int",
          'fix the value'], id='test-non-numeric-value'),
    case('test.py', ['--cfg', '{d}/head_mismatch.cfg', '--weights', W, '--data', DATA],
         ['{d}/head_mismatch.cfg line {head_mismatch}: the conv before this [yolo] has '
          'filters=27', 'set filters=30'], id='test-head-filters-vs-classes'),
    case('test.py', ['--cfg', '{d}/binary.cfg', '--weights', W, '--data', DATA],
         ['{d}/binary.cfg: cannot read as a text cfg', 'pass a Darknet .cfg file'],
         id='test-binary-cfg'),
    case('test.py', ['--cfg', '{d}/cfg_folder.cfg', '--weights', W, '--data', DATA],
         ['{d}/cfg_folder.cfg: cfg file not found', 'check the --cfg path'],
         id='test-folder-as-cfg'),
    case('test.py', ['--cfg', C, '--weights', '{d}/missing.weights', '--data', DATA],
         ['{d}/missing.weights: weights file not found', 'check the --weights path'],
         id='test-missing-weights'),
    case('test.py', ['--cfg', C, '--weights', '{d}/text.weights', '--data', DATA],
         ['{d}/text.weights: not a Darknet .weights file', 'pass a .weights file'],
         id='test-text-as-weights'),
    case('test.py', ['--cfg', C, '--weights', '{d}/other_model.weights', '--data', DATA],
         ['{d}/other_model.weights: {cfg} needs', 'belongs to another cfg'],
         id='test-weights-of-another-model'),
    case('test.py', ['--cfg', C, '--weights', W, '--data', '{d}/no_valid.data'],
         ["{d}/no_valid.data: no 'valid=' line", 'add the path of the valid list'],
         id='test-data-without-valid'),
    case('test.py', ['--cfg', C, '--weights', W, '--data', '{d}/three_classes.data'],
         ['{d}/three_classes.data: classes=3 but {d}/good.cfg detects 4',
          'pass the matching .data or cfg'], id='test-classes-differ'),
    case('test.py', ['--cfg', C, '--weights', W, '--data', '{d}/out_of_range.data'],
         ['{d}/out_of_range/labels/a.txt:1: cx=1.5 outside [0, 1]',
          'Fix or delete these label lines'], id='test-label-out-of-range'),
    case('test.py', ['--cfg', C, '--weights', W, '--data', DATA, '--img-size', '100'],
         ['--img-size 100 is not a multiple of the model stride 8', 'use 96 or 104'],
         id='test-img-size-off-stride'),
    case('test.py', ['--cfg', C, '--weights', W, '--data', '{d}/corrupt.data'],
         ['{d}/corrupt/images/a.png: cannot decode image',
          'replace the file or remove it from the list file'], subprocess=True,
         id='test-corrupt-image-in-a-worker'),
    case('test.py', ['--cfg', C, '--weights', '{d}/copy.weights', '--data', DATA,
                     '--metrics-json', '{d}/copy.weights'],
         ['--metrics-json {d}/copy.weights: would overwrite an input file',
          'choose another name'], id='test-json-over-an-input'),

    # ---- prune_normal.py
    case('prune_normal.py', ['--cfg', C, '--weights', '{d}/truncated.weights'],
         ['{d}/truncated.weights: {d}/good.cfg needs', 'the file is truncated or belongs to '
          'another cfg'], subprocess=True, id='normal-truncated-weights'),
    case('prune_normal.py', ['--cfg', '{d}/broken_line.cfg', '--weights', W],
         ['{d}/broken_line.cfg line {broken_line}: \'filters 32\' is not a "[section]" or '
          '"key=value" line', 'fix it or comment it out with #'], id='normal-broken-line'),
    case('prune_normal.py', ['--cfg', C, '--weights', W, '--percent', '-0.1'],
         ['--percent -0.1: must be in [0, 1)', 'e.g. 0.5 prunes half'],
         id='normal-negative-percent'),
    case('prune_normal.py', ['--cfg', '{d}/collide/sparse.cfg', '--weights',
                             '{d}/collide/sparse-normal-0.5.weights', '--output-dir',
                             '{d}/collide', '--exist-ok'],
         ['{d}/collide/sparse-normal-0.5.weights: would overwrite an input file',
          'choose another --output-dir'], id='normal-output-over-inputs'),
    case('prune_normal.py', ['--cfg', C, '--weights', W, '--data', '{d}/not_numbers.data'],
         ["{d}/not_numbers/labels/a.txt:2: not a number in '1 half 0.5 0.2 0.2'",
          'Fix or delete these label lines'], id='normal-label-not-a-number'),

    # ---- prune_regular.py
    case('prune_regular.py', ['--cfg', C, '--weights', '{d}/oversized.weights'],
         ['{d}/oversized.weights: {d}/good.cfg needs', 'the file has', 'belongs to another '
          'cfg'], id='regular-oversized-weights'),
    case('prune_regular.py', ['--cfg', C, '--weights', W, '--percent', '1'],
         ['--percent 1.0: must be in [0, 1)'], subprocess=True, id='regular-percent-one'),
    case('prune_regular.py', ['--cfg', C, '--weights', '{d}/empty.weights'],
         ['{d}/empty.weights: the weights file is empty', 'download or train it again'],
         id='regular-empty-weights'),
    case('prune_regular.py', ['--cfg', '{d}/route_outside.cfg', '--weights', W],
         ['{d}/route_outside.cfg line {route_outside}: [route] layers=-40 points to layer -30',
          'fix the reference'], id='regular-route-outside'),
    case('prune_regular.py', ['--cfg', C, '--weights', '{d}/weights_folder.weights'],
         ['{d}/weights_folder.weights: weights file not found', 'check the --weights path'],
         id='regular-folder-as-weights'),

    # ---- prune_shortcut.py
    case('prune_shortcut.py', ['--cfg', C, '--weights', '{d}/garbage.pt'],
         ['{d}/garbage.pt: not a readable PyTorch checkpoint', 'pass a .pt saved by train.py'],
         subprocess=True, id='shortcut-garbage-pt'),
    case('prune_shortcut.py', ['--cfg', C, '--weights', P, '--percent', '{past_safe}',
                               '--criterion', 'gamma'],
         ['--percent {past_safe} would empty a layer: the largest safe percent for this model '
          'and mode is {safe:.4f}', 'pass --layer-keep F'], id='shortcut-past-safe-limit'),
    case('prune_shortcut.py', ['--cfg', C, '--weights', '{d}/header_only.weights'],
         ['{d}/header_only.weights: {d}/good.cfg needs', 'the file has 0 (20 bytes)'],
         id='shortcut-header-only-weights'),
    case('prune_shortcut.py', ['--cfg', C, '--weights', W, '--data', '{d}/missing.data'],
         ['{d}/missing.data: data file not found', 'check the --data path'],
         id='shortcut-missing-data'),

    # ---- prune_tiny.py
    case('prune_tiny.py', ['--cfg', C, '--weights', W, '--percent', 'half'],
         ["argument --percent: invalid float value: 'half'", '(see --help)'],
         subprocess=True, id='tiny-percent-not-a-number'),
    case('prune_tiny.py', ['--cfg', C, '--weights', '{d}/short_header.weights'],
         ['{d}/short_header.weights: 10 bytes is too short for a Darknet .weights header',
          'the file is truncated'], id='tiny-short-header'),
    case('prune_tiny.py', ['--cfg', C, '--weights', '{d}/other_cfg.pt'],
         ['{d}/other_cfg.pt: layer 0 [convolutional]', 'the checkpoint is for another cfg'],
         id='tiny-pt-of-another-cfg'),
    case('prune_tiny.py', ['--cfg', '{d}/other.cfg', '--weights', '{d}/other_model.weights'],
         ['{d}/other.cfg has [shortcut] layers; tiny mode is for', 'use prune_shortcut.py'],
         id='tiny-mode-on-a-shortcut-cfg'),
    case('prune_tiny.py', ['--cfg', C, '--weights', W, '--img-size', '36'],
         ['--img-size 36 is not a multiple of the model stride 8', 'use 32 or 40'],
         id='tiny-img-size-off-stride'),

    # ---- output locations, checked before any work (every script that writes)
    case('train.py', ['--cfg', C, '--data', DATA, '--output-dir', '{d}/good.cfg'],
         ['--output-dir {d}/good.cfg: is a file, not a folder', 'choose another --output-dir'],
         id='train-output-dir-is-a-file'),
    case('train.py', ['--cfg', C, '--data', DATA, '--output-dir', '{d}/good.cfg/run'],
         ['--output-dir {d}/good.cfg/run: {d}/good.cfg is a file, not a folder'],
         subprocess=True, id='train-output-dir-under-a-file'),
    case('train.py', ['--cfg', C, '--data', DATA, '--output-dir', '/sys/yolo-catalogue/run'],
         ['--output-dir /sys/yolo-catalogue/run: cannot create folders in /sys',
          'choose a folder you can write to'], id='train-output-dir-not-permitted',
         marks=NO_SYS),
    case('test.py', ['--cfg', C, '--weights', W, '--data', DATA, '--save-json',
                     '{d}/good.cfg/detections.json'],
         ['--save-json {d}/good.cfg/detections.json: {d}/good.cfg is a file'],
         id='test-save-json-under-a-file'),
    case('test.py', ['--cfg', C, '--weights', W, '--data', DATA, '--metrics-json',
                     '{d}/weights_folder.weights'],
         ['--metrics-json {d}/weights_folder.weights: is a folder; pass a file name'],
         id='test-metrics-json-is-a-folder'),
    case('prune_normal.py', ['--cfg', C, '--weights', W, '--output-dir', '{d}/good.weights'],
         ['--output-dir {d}/good.weights: is a file, not a folder'],
         id='normal-output-dir-is-a-file'),
    case('prune_regular.py', ['--cfg', C, '--weights', W, '--output-dir',
                              '{d}/good.weights/pruned'],
         ['{d}/good.weights is a file, not a folder'],
         id='regular-output-dir-under-a-file'),
    case('prune_shortcut.py', ['--cfg', C, '--weights', W, '--output-dir', '/sys/yolo-catalogue'],
         ['--output-dir /sys/yolo-catalogue: cannot create folders in /sys'],
         id='shortcut-output-dir-not-permitted', marks=NO_SYS),
    case('prune_tiny.py', ['--cfg', C, '--weights', W, '--output-dir', '{d}/good.cfg'],
         ['--output-dir {d}/good.cfg: is a file, not a folder'], subprocess=True,
         id='tiny-output-dir-is-a-file'),
    case('prune_layer.py', ['--cfg', '{d}/other.cfg', '--weights', '{d}/other_model.weights',
                            '--output-dir', '{d}/good.cfg/layers'],
         ['--output-dir {d}/good.cfg/layers: {d}/good.cfg is a file'],
         id='layer-output-dir-under-a-file'),
    case('export.py', ['--cfg', C, '--weights', W, '--output-dir', '{d}/good.cfg'],
         ['--output-dir {d}/good.cfg: is a file, not a folder'], id='export-output-dir-is-a-file'),
    case('export.py', ['--cfg', C, '--weights', W, '--output', '{d}/good.cfg/model.onnx'],
         ['--output {d}/good.cfg/model.onnx: {d}/good.cfg is a file'],
         subprocess=True, id='export-output-under-a-file'),
    case('convert_weights.py', ['--cfg', C, '--weights', W, '--output', '{d}/good.weights/m.pt'],
         ['--output {d}/good.weights/m.pt: {d}/good.weights is a file'],
         id='convert-output-under-a-file'),
    case('convert_weights.py', ['--cfg', C, '--weights', W, '--output',
                                '{d}/weights_folder.weights'],
         ['--output {d}/weights_folder.weights: is a folder'], id='convert-output-is-a-folder'),
    case('derive_cfg.py', ['--cfg', C, '--classes', '2', '--output', '{d}/good.cfg/two.cfg'],
         ['--output {d}/good.cfg/two.cfg: {d}/good.cfg is a file'], subprocess=True,
         id='derive-output-under-a-file'),
]


# ---------------------------------------------------------------- running a case

# the scripts that read a data set, and so take --workers
LOADING_SCRIPTS = ('train.py', 'test.py', 'prune_normal.py', 'prune_regular.py',
                   'prune_shortcut.py', 'prune_tiny.py', 'prune_layer.py')


def _entry(script):
    """The function `python <script>` hands to run_cli."""
    import importlib
    if script == 'test.py':
        import test
        assert os.path.dirname(os.path.abspath(test.__file__)) == ROOT  # not Python's own
        return test.main
    if script.startswith('prune_') and script != 'prune_layer.py':
        from cli.prune import main
        mode = script[len('prune_'):-len('.py')]
        return lambda argv: main(mode, argv)
    return importlib.import_module(script[:-len('.py')]).main


def _outputs(script, args, out):
    """Flags that send every output of `script` into `out`, unless the case sets them."""
    if script == 'test.py':
        return [flag for name in ('save-json', 'metrics-json') if f'--{name}' not in args
                for flag in (f'--{name}', f'{out}/{name}.json')]
    if script in ('convert_weights.py', 'derive_cfg.py'):  # each case names its --output
        return []
    return [] if {'--output-dir', '--output'} & set(args) else ['--output-dir', f'{out}/run']


def _run(script, argv, in_subprocess, capfd):
    """(exit status, stdout, stderr, warnings shown) of `python script argv`."""
    if in_subprocess:
        # bytes: text mode would turn tqdm's carriage returns into line breaks
        result = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT,
                                capture_output=True, timeout=120,
                                env={**os.environ, 'OMP_NUM_THREADS': '1'})
        return (result.returncode, result.stdout.decode(errors='replace'),
                result.stderr.decode(errors='replace'), [])
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('default')
        with pytest.raises(SystemExit) as stop:
            run_cli(_entry(script), argv)
    out, err = capfd.readouterr()
    shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning,
                                                              PendingDeprecationWarning))]
    return stop.value.code, out, err, shown


@pytest.mark.parametrize('script, args, needles, in_subprocess', CASES)
def test_bad_input_is_refused_cleanly(inputs, tmp_path, capfd, script, args, needles,
                                      in_subprocess):
    d = inputs['dir']
    out = tmp_path / 'out'
    out.mkdir()
    values = {'d': d, 'o': out, 'data': inputs['data'], 'cfg': f'{d}/good.cfg',
              'safe': inputs['safe'], 'past_safe': inputs['past_safe'], **inputs['lines']}
    argv = [a.format(**values) for a in args] + _outputs(script, args, out)
    # the test.py subprocess keeps the default workers
    if script in LOADING_SCRIPTS and (script != 'test.py' or not in_subprocess):
        argv += ['--workers', '0']
    if script == 'train.py':  # one short epoch, unless the case sets these flags itself
        for flag, value in zip(TRAIN[::2], TRAIN[1::2]):
            argv += [] if flag in args else [flag, value]
    before = _digest(d)

    code, stdout, stderr, shown = _run(script, argv, in_subprocess, capfd)

    lines = visible_lines(stderr)
    assert code == 2, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith('error: '), stderr[-3000:]
    for needle in needles:
        assert needle.format(**values) in lines[0]
    assert 'Traceback' not in stdout + stderr
    assert not shown, [str(w.message) for w in shown]
    assert _files(out) == []                       # no output written
    assert _digest(d) == before                    # inputs untouched, nothing added beside them


def test_catalogue_covers_every_script_with_thirty_inputs():
    scripts = [c.values[0] for c in CASES]
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    for script in ('train.py', 'test.py', 'prune_normal.py', 'prune_regular.py',
                   'prune_shortcut.py', 'prune_tiny.py'):
        assert scripts.count(script) >= 4
        assert any(c.values[0] == script and c.values[3] for c in CASES), script


@pytest.mark.skipif(os.geteuid() == 0, reason='running as root, which reads a chmod 000 file '
                    'anyway; the folder-in-place-of-a-file cases stand in for unreadable inputs')
def test_unreadable_cfg_is_refused_cleanly(tmp_path, capfd):
    cfg = tmp_path / 'locked.cfg'
    shutil.copy(CFG, cfg)
    cfg.chmod(0)
    try:
        code, stdout, stderr, _ = _run('test.py', ['--cfg', str(cfg), '--weights', 'x.weights',
                                                   '--data', 'data/shapes.data'], False, capfd)
    finally:
        cfg.chmod(0o644)
    lines = visible_lines(stderr)
    assert code == 2 and len(lines) == 1 and f'{cfg}: cannot read' in lines[0]
    assert 'Traceback' not in stdout + stderr


# ---------------------------------------------------------------- failed writes

# Runs `python SCRIPT ARGS` with every file it writes capped at LIMIT bytes: the write
# past it fails with EFBIG, as a full disk fails with ENOSPC, through the same code.
# SIGXFSZ would kill the process instead; ignored, it stays ignored across exec.
LIMITED = '''
import os, resource, signal, sys
limit, script = int(sys.argv[1]), sys.argv[2]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
os.execv(sys.executable, [sys.executable, script, *sys.argv[3:]])
'''


def _run_limited(script, argv, limit):
    result = subprocess.run([sys.executable, '-c', LIMITED, str(limit),
                             os.path.join(ROOT, script), *argv], cwd=ROOT, capture_output=True,
                            timeout=180, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    return result.returncode, result.stdout.decode(errors='replace'), \
        result.stderr.decode(errors='replace')


FULL = 'is larger than this file system or the file-size limit (ulimit -f) allows'
WRITES = [  # script, args, the file whose write fails, byte limit
    pytest.param('prune_normal.py', ['--cfg', C, '--weights', W, '--output-dir', '{o}',
                                     '--exist-ok'],
                 'good-normal-0.5.weights', 20000, id='prune-weights'),
    pytest.param('convert_weights.py', ['--cfg', C, '--weights', W, '--output', '{o}/m.pt'],
                 'm.pt', 20000, id='convert-pt'),
    pytest.param('derive_cfg.py', ['--cfg', C, '--classes', '2', '--output', '{o}/two.cfg'],
                 'two.cfg', 200, id='derive-cfg'),
    pytest.param('test.py', ['--cfg', C, '--weights', W, '--data', DATA, '--workers', '0',
                             '--img-size', '64', '--metrics-json', '{o}/metrics.json'],
                 'metrics.json', 40, id='test-json'),
    pytest.param('export.py', ['--cfg', C, '--weights', W, '--output', '{o}/m.onnx',
                               '--exist-ok'], 'm.onnx', 20000, id='export-onnx'),
]


@pytest.mark.parametrize('script, args, name, limit', WRITES)
def test_a_write_that_fails_part_way_keeps_the_old_file(inputs, tmp_path, script, args, name,
                                                        limit):
    """The previous version of the output survives byte for byte, no temporary file is
    left, and the run ends with one line that names the file and the cause."""
    d, out = inputs['dir'], tmp_path / 'out'
    out.mkdir()
    values = {'d': d, 'o': out, 'data': inputs['data']}
    old = out / name
    old.write_bytes(b'the previous version\n' * 2)  # under every limit
    before = _digest(d)
    code, stdout, stderr = _run_limited(script, [a.format(**values) for a in args], limit)
    lines = visible_lines(stderr)
    assert code == 2, stderr[-3000:]
    assert lines == [f'error: {old}: the file {FULL} (File too large); nothing was written '
                     'and the previous file is unchanged; write elsewhere or raise the limit '
                     'and run again'], stderr[-3000:]
    assert 'Traceback' not in stdout + stderr
    assert old.read_bytes() == b'the previous version\n' * 2
    assert _files(out) == [str(old)]
    assert _digest(d) == before


def test_a_full_disk_stops_training_cleanly_and_resume_finishes(inputs, tmp_path):
    """Epoch 1 is saved; the resumed run trains epoch 2 and cannot write its checkpoint:
    one line, exit 2, last.pt still epoch 1, no temporary file. With the space back,
    --resume trains epochs 2 and 3 and counts each once."""
    import torch

    import train
    folder = tmp_path / 'run'
    common = ['--cfg', CFG, '--data', inputs['data'], '--workers', '0', '--batch-size', '2',
              '--img-size', '64', '--output-dir', str(folder)]
    train.main(common + ['--epochs', '1'])
    last = folder / 'last.pt'
    saved = last.read_bytes()
    code, stdout, stderr = _run_limited('train.py', common + ['--epochs', '3', '--resume'],
                                        len(saved) // 2)
    lines = visible_lines(stderr)
    assert code == 2 and len(lines) == 1, stderr[-3000:]
    assert FULL in lines[0] and 'nothing was written' in lines[0] and str(folder) in lines[0]
    assert 'Traceback' not in stdout + stderr
    assert last.read_bytes() == saved
    assert not [p for p in os.listdir(folder) if '.tmp' in p or p == '.lock']
    train.main(common + ['--epochs', '3', '--resume'])
    assert torch.load(last, map_location='cpu', weights_only=True)['epoch'] == 2
    rows = (folder / 'results.csv').read_text().splitlines()[1:]
    assert [row.split(',')[0] for row in rows] == ['1', '2', '3']


# ---------------------------------------------------------------- interrupts

# Runs a script with a signal sent to itself at a hook: as the input model loads (before
# any work), as the .weights write starts, just before the cfg write (the weights already
# on disk under their temporary name), in the ONNX check (the .onnx already written under
# its temporary name), or in the ONNX export (before any file).
HOOKED = '''
import os, runpy, sys
root, signum, hook, script = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
sys.path.insert(0, root)
import deploy.onnx_export as onnx_utils, cli.prune as prune_cli, pruning.report as report

def hooked(module, name):
    real = getattr(module, name)
    def call(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return real(*args, **kwargs)
    setattr(module, name, call)

module, name = {'weights': (report, 'save_weights'), 'cfg': (report, 'write_cfg'),
                'check': (onnx_utils, 'onnx_difference'), 'load': (prune_cli, 'load_model'),
                'export': (onnx_utils, '_export_bytes')}[hook]
hooked(module, name)
sys.argv = [script, *sys.argv[5:]]
runpy.run_path(script, run_name='__main__')
'''

INTERRUPTS = [  # script, signal, hook, the outputs a finished run would write
    ('prune_normal.py', signal.SIGINT, 'weights', ['good-normal-0.5.cfg', 'good-normal-0.5.weights']),
    ('prune_shortcut.py', signal.SIGTERM, 'cfg', ['good-shortcut-0.5.cfg',
                                                   'good-shortcut-0.5.weights']),
    ('prune_tiny.py', signal.SIGINT, 'cfg', ['good-tiny-0.5.cfg', 'good-tiny-0.5.weights']),
    ('prune_regular.py', signal.SIGTERM, 'load', ['good-regular-0.5.cfg',
                                                   'good-regular-0.5.weights']),
    ('prune_layer.py', signal.SIGTERM, 'weights', ['residual_blocks-layer-1.cfg',
                                                    'residual_blocks-layer-1.weights']),
    ('export.py', signal.SIGINT, 'check', ['good.onnx']),
    ('export.py', signal.SIGTERM, 'export', ['good.onnx']),
]


@pytest.mark.parametrize('script, signum, hook, names', INTERRUPTS,
                         ids=[f'{s[:-3]}-{g.name}-{h}' for s, g, h, _ in INTERRUPTS])
def test_an_interrupted_prune_or_export_writes_nothing(inputs, tmp_path, script, signum, hook,
                                                       names):
    """Ctrl-C or SIGTERM at the hook: exit 130, one line, the previous outputs (here
    placeholders) byte-identical, no temporary file, inputs untouched."""
    d, out = inputs['dir'], tmp_path / 'out'
    out.mkdir()
    model = ['--cfg', f'{d}/good.cfg', '--weights', f'{d}/good.weights']
    if script == 'prune_layer.py':  # a cfg with residual blocks it can remove
        cfg = os.path.join(TEST_CFGS, 'residual_blocks.cfg')
        save_weights(randomize_weights(Darknet(cfg), seed=2), str(tmp_path / 'blocks.weights'))
        model = ['--cfg', cfg, '--weights', str(tmp_path / 'blocks.weights')]
    for name in names:
        (out / name).write_bytes(b'previous ' + name.encode())
    before = _digest(d)
    result = subprocess.run([sys.executable, '-c', HOOKED, ROOT, str(int(signum)), hook,
                             os.path.join(ROOT, script), *model, '--output-dir', str(out),
                             '--exist-ok'],  # the placeholders stand for an earlier run
                            cwd=ROOT, capture_output=True, timeout=180,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    stdout, stderr = result.stdout.decode(errors='replace'), result.stderr.decode(errors='replace')
    assert result.returncode == 130, stderr[-3000:]
    assert visible_lines(stderr) == ['interrupted'], stderr[-3000:]
    assert 'Traceback' not in stdout + stderr
    assert _files(out) == sorted(str(out / name) for name in names)
    for name in names:
        assert (out / name).read_bytes() == b'previous ' + name.encode()
    assert _digest(d) == before
