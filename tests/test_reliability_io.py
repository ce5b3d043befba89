"""Files from other tools and paths users type: cfgs saved by other editors (read as
OpenCV's Darknet importer reads them), label and list files from labelling tools,
upper-case extensions, relative paths, spaces and Chinese characters; and the file
machinery under them: stale temporary files, the one-run-per-folder lock, groups of
outputs, and the message of each kind of failed write.
"""
import errno
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import (ROOT, TEST_CFGS, assert_same_detections, opencv_detections, our_detections,
                      randomize_weights)

from darknet.cfg import load_class_names, parse_data_cfg, parse_model_cfg
from darknet.model import Darknet
from darknet.weights import load_weights, save_weights
from data.datasets import check_dataset, load_image
from data.make_shapes import generate
from utils import fileio
from utils.errors import UserInputError, run_cli

CFG = os.path.join(TEST_CFGS, 'small_detector.cfg')
TEXT = open(CFG).read()

pytestmark = pytest.mark.usefixtures('one_thread')


# ---------------------------------------------------------------- cfgs from other editors

CFG_VARIANTS = {
    'bom': '\ufeff' + TEXT,                                 # Windows Notepad
    'bom-net-first': '\ufeff' + TEXT[TEXT.index('[net]'):],  # the mark right before [net]
    'crlf': TEXT.replace('\n', '\r\n'),
    'cr-only': TEXT.replace('\n', '\r'),                     # classic Mac OS
    'tabs': re.sub(r'(?m)^(\w+)=', '\t\\1\t=\t', TEXT),
    'trailing-spaces': TEXT.replace('\n', ' \t \n'),
    'no-final-newline': TEXT.rstrip('\n'),
    'all-at-once': '\ufeff' + re.sub(r'(?m)^(\w+)=(.*)$', '\t\\1 = \\2  ', TEXT)
                   .rstrip('\n').replace('\n', '\r\n'),
}
# OpenCV reads lines up to '\n' only: a CR-only file is one line to it, as to Darknet
OPENCV_READS = set(CFG_VARIANTS) - {'cr-only'}


@pytest.fixture(scope='module')
def small_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp('w') / 'small.weights'
    save_weights(randomize_weights(Darknet(CFG), seed=3), str(path))
    return str(path)


@pytest.mark.parametrize('variant', sorted(CFG_VARIANTS))
def test_a_cfg_from_another_editor_reads_like_the_plain_file(tmp_path, small_weights,
                                                            variant):
    """Typed values equal the plain file's, line numbers too (a bad value in the variant
    is reported at the same line), and where OpenCV's importer reads the file, its
    detections equal ours."""
    path = tmp_path / f'{variant}.cfg'
    path.write_bytes(CFG_VARIANTS[variant].encode('utf-8'))
    assert parse_model_cfg(str(path)) == parse_model_cfg(CFG)
    broken = tmp_path / f'{variant}-broken.cfg'
    broken.write_bytes(re.sub(r'(filters\s*=\s*)64', r'\g<1>x64', CFG_VARIANTS[variant],
                              count=1).encode('utf-8'))
    line = next(n for n, text in enumerate(TEXT.splitlines(), 1) if 'filters=64' in text)
    if variant == 'bom-net-first':
        line -= TEXT[:TEXT.index('[net]')].count('\n')
    with pytest.raises(UserInputError, match=f'line {line}: filters='):
        parse_model_cfg(str(broken))
    if variant in OPENCV_READS:
        model = load_weights(Darknet(str(path)), small_weights)
        image = np.random.default_rng(0).random((1, 3, 64, 64), np.float32)
        assert_same_detections(our_detections(model, image),
                               opencv_detections(str(path), small_weights, image, model),
                               opencv=True)


def test_data_and_names_files_with_bom_and_crlf(tmp_path):
    (tmp_path / 'set.names').write_bytes('\ufeffcircle\r\nsquare\r\n\r\n'.encode())
    (tmp_path / 'set.data').write_bytes(
        '\ufeffclasses = 2\r\nnames = set.names \r\n# comment\r\n'.encode())
    options = parse_data_cfg(str(tmp_path / 'set.data'))
    assert options['classes'] == 2
    assert load_class_names(options['names']) == ['circle', 'square']


# ---------------------------------------------------------------- data sets from other tools

def _image(path, ext='.png', seed=0):
    img = np.random.default_rng(seed).integers(0, 256, (40, 56, 3), np.uint8)
    ok, data = cv2.imencode(ext.lower(), img)
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.tobytes())  # bytes, so any name works
    return img


def test_labels_from_labelling_tools_and_upper_case_extensions(tmp_path):
    """CRLF, a byte-order mark, blank lines and trailing spaces in label and list files,
    .JPG/.PNG names: the same labels as the plain files give."""
    root = tmp_path / 'set'
    plain = '0 0.5 0.5 0.2 0.3\n1 0.25 0.75 0.1 0.1\n'
    messy = '\ufeff0 0.5 0.5 0.2 0.3  \r\n\r\n  1 0.25 0.75 0.1 0.1\t\r\n\r\n'
    for name, ext, text in (('a', '.JPG', plain), ('b', '.PNG', messy), ('c', '.png', plain),
                            ('d', '.Jpeg', messy)):
        _image(root / 'images' / f'{name}{ext}', ext)
        (root / 'labels').mkdir(exist_ok=True)
        (root / 'labels' / f'{name}.txt').write_bytes(text.encode())
    (root / 'list.txt').write_bytes('\ufeffimages/a.JPG\r\n\r\nimages/b.PNG  \r\n'
                                    'images/c.png\r\nimages/d.Jpeg'.encode())
    index = check_dataset(root / 'list.txt', num_classes=2)
    assert [os.path.basename(p) for p in index.img_files] == ['a.JPG', 'b.PNG', 'c.png',
                                                              'd.Jpeg']
    expected = np.array([[0, 0.5, 0.5, 0.2, 0.3], [1, 0.25, 0.75, 0.1, 0.1]], np.float32)
    for labels in index.labels:
        np.testing.assert_array_equal(labels, expected)
    assert index.shapes.tolist() == [[40, 56]] * 4
    from data.datasets import is_image_file  # what detect.py lists folders with
    assert all(is_image_file(p) for p in index.img_files) and not is_image_file('a.txt')


@pytest.mark.skipif(sys.platform != 'linux', reason='file names are bytes on Linux only')
def test_a_list_saved_as_gbk_still_names_its_files(tmp_path):
    """A list written by a Windows tool in GBK, naming files whose names are those same
    GBK bytes (as unzipped from its archive): each image is found."""
    name = '猫.png'.encode('gbk')
    folder = os.fsencode(tmp_path)
    img = np.zeros((8, 8, 3), np.uint8)
    with open(os.path.join(folder, name), 'wb') as f:  # noqa: the test's own input
        f.write(cv2.imencode('.png', img)[1].tobytes())
    (tmp_path / 'list.txt').write_bytes(name + b'\r\n')
    index = check_dataset(tmp_path / 'list.txt')
    assert os.fsencode(index.img_files[0]) == os.path.join(folder, name)
    np.testing.assert_array_equal(load_image(index.img_files[0]), img)


def test_images_are_decoded_without_cv2_imread(tmp_path, monkeypatch):
    """cv2.imread fails on non-ASCII paths on Windows; decoding goes through numpy."""
    path = tmp_path / '图片 集' / '猫 1.JPG'
    img = _image(path, '.png')
    monkeypatch.setattr(cv2, 'imread', lambda *args, **kwargs: None)
    np.testing.assert_array_equal(load_image(str(path)), img)


def _write_set(root, names, label='0 0.5 0.5 0.2 0.2\n'):
    for i, name in enumerate(names):
        _image(root / 'images' / name, '.png', seed=i)
        (root / 'labels').mkdir(parents=True, exist_ok=True)
        (root / 'labels' / (os.path.splitext(name)[0] + '.txt')).write_text(label)


def test_list_paths_resolve_as_given_then_beside_the_list(tmp_path, monkeypatch):
    """In a list file: an absolute path; a path relative to the working folder; one
    relative only to the list's folder. Where both readings exist, the working folder's
    wins (as Darknet, which knows only that one)."""
    root = tmp_path / 'set'
    _write_set(root, ['a.png', 'b.png'])
    _write_set(tmp_path / 'work' / 'set', ['b.png'], label='1 0.5 0.5 0.4 0.4\n')
    (root / 'list.txt').write_text(f'{root}/images/a.png\nset/images/b.png\nimages/a.png\n')
    monkeypatch.chdir(tmp_path / 'work')
    index = check_dataset(root / 'list.txt', num_classes=2)
    assert index.img_files == [f'{root}/images/a.png', 'set/images/b.png',
                               str(root / 'images' / 'a.png')]
    assert [int(labels[0, 0]) for labels in index.labels] == [0, 1, 0]


def test_data_paths_resolve_from_the_working_folder_then_beside_the_data_file(
        tmp_path, monkeypatch):
    (tmp_path / 'data').mkdir()
    (tmp_path / 'work').mkdir()
    for folder in (tmp_path / 'data', tmp_path / 'work'):
        (folder / 'both.txt').write_text('x\n')
    (tmp_path / 'data' / 'beside.txt').write_text('x\n')
    (tmp_path / 'data' / 'set.data').write_text(
        f'classes=1\ntrain=beside.txt\nvalid=both.txt\ntest={tmp_path}/data/beside.txt\n'
        'names=nowhere.names\n')
    monkeypatch.chdir(tmp_path / 'work')
    options = parse_data_cfg('../data/set.data')
    assert options['train'] == str(tmp_path / 'data' / 'beside.txt')
    assert options['valid'] == 'both.txt'                      # the working folder's
    assert options['test'] == f'{tmp_path}/data/beside.txt'
    assert options['names'] == 'nowhere.names'                 # reported missing by its reader


# ---------------------------------------------------------------- spaces and Chinese

@pytest.fixture(scope='module')
def chinese_set(tmp_path_factory):
    """The shapes set in a folder named with spaces and Chinese characters, its images
    renamed likewise (upper-case extensions), the list relative to the list's folder."""
    base = tmp_path_factory.mktemp('paths') / '我的 数据'
    root = base / '形状 集'
    generate(root, seed=7, n_train=4, n_valid=4, img_size=64, plain=True, image_format='png',
             workers=1, progress=False)
    for split in ('train', 'valid'):
        lines = []
        for line in (root / f'{split}.txt').read_text().split():  # images/train/000000.png
            image = root / line
            image.rename(image.with_name(f'图 {image.stem}.PNG'))
            label = root / 'labels' / split / f'{image.stem}.txt'
            if label.exists():  # an image without shapes has none
                label.rename(label.with_name(f'图 {image.stem}.txt'))
            lines.append(f'images/{split}/图 {image.stem}.PNG')
        (root / f'{split}.txt').write_bytes(('\r\n'.join(lines) + '\r\n').encode())
    (base / '数据.data').write_bytes('\ufeffclasses=4\r\ntrain=形状 集/train.txt\r\n'
                                   'valid=形状 集/valid.txt\r\nnames=形状 集/shapes.names\r\n'
                                   .encode())
    cfg = base / '模型 配置.cfg'
    cfg.write_bytes(('\ufeff' + TEXT).replace('\n', '\r\n').encode())
    weights = base / '权重 文件.weights'
    save_weights(randomize_weights(Darknet(CFG), seed=4), str(weights))
    return base


def _run(main, argv, capfd):
    """(exit status, stdout, stderr) of `main(argv)` run as `python script.py` runs it."""
    capfd.readouterr()
    try:
        run_cli(main, argv)
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capfd.readouterr()
    return code, out, err


def test_test_and_prune_with_chinese_paths_and_spaces(chinese_set, tmp_path, capfd):
    """test.py reads the set through the .data's relative paths and writes its JSON into
    a new Chinese folder; prune_normal.py writes its pair there; both files read back."""
    import json
    import test

    from cli.prune import main as prune
    base, out = chinese_set, tmp_path / '输出 目录' / '第 1 次'
    common = ['--cfg', str(base / '模型 配置.cfg'), '--weights', str(base / '权重 文件.weights'),
              '--workers', '0']
    code, _, err = _run(test.main, common + ['--data', str(base / '数据.data'), '--img-size',
                                             '64', '--metrics-json', str(out / '指标.json')],
                        capfd)
    assert code == 0, err
    assert set(json.loads((out / '指标.json').read_text(encoding='utf-8'))) >= {'map50'}
    code, _, err = _run(lambda a: prune('normal', a), common + ['--output-dir', str(out)],
                        capfd)
    assert code == 0, err
    load_weights(Darknet(str(out / '模型 配置-normal-0.5.cfg')),  # named after the cfg
                 str(out / '模型 配置-normal-0.5.weights'))


def test_train_in_a_chinese_folder_with_a_relative_data_file(chinese_set, tmp_path,
                                                             monkeypatch, capfd):
    import train
    monkeypatch.chdir(chinese_set)
    out = tmp_path / '训练 结果'
    code, _, err = _run(train.main, ['--cfg', '模型 配置.cfg', '--data', '数据.data',
                                     '--epochs', '1', '--batch-size', '2', '--img-size', '64',
                                     '--workers', '0', '--output-dir', str(out)], capfd)
    assert code == 0, err
    assert torch.load(out / 'last.pt', map_location='cpu', weights_only=True)['epoch'] == 0
    assert sorted(os.listdir(out)) == ['best.pt', 'bn_gammas.png', 'last.pt', 'results.csv']


# ---------------------------------------------------------------- the file machinery

def test_a_stale_temporary_file_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    stale = tmp_path / f'.out.json.tmp{dead.pid}'
    alive = tmp_path / f'.out.json.tmp{os.getppid()}'   # a running writer's: kept
    other = tmp_path / f'.other.json.tmp{dead.pid}'     # another file's: kept
    for path in (stale, alive, other):
        path.write_text('{"half')
    fileio.atomic_write_text(tmp_path / 'out.json', '{}')
    assert sorted(os.listdir(tmp_path)) == sorted(['out.json', alive.name, other.name])


def test_a_group_writes_all_its_files_or_none(tmp_path):
    for name in ('a.cfg', 'a.weights'):
        (tmp_path / name).write_text('old')
    with pytest.raises(UserInputError, match='the disk is full'):
        with fileio.output_group():
            fileio.atomic_write_text(tmp_path / 'a.weights', 'new')
            with fileio.atomic_output(tmp_path / 'a.cfg', 'w'):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert sorted(os.listdir(tmp_path)) == ['a.cfg', 'a.weights']
    assert {(tmp_path / n).read_text() for n in ('a.cfg', 'a.weights')} == {'old'}
    with fileio.output_group():
        fileio.atomic_write_text(tmp_path / 'a.weights', 'new')
        assert (tmp_path / 'a.weights').read_text() == 'old'   # not yet
        fileio.atomic_write_text(tmp_path / 'a.cfg', 'new')
    assert {(tmp_path / n).read_text() for n in ('a.cfg', 'a.weights')} == {'new'}


@pytest.mark.parametrize('code, words', [
    (errno.ENOSPC, 'the disk is full'), (errno.EDQUOT, 'the disk quota is used up'),
    (errno.EIO, 'a disk or network error'), (errno.EROFS, 'the file system is read-only')])
def test_each_failed_write_is_one_line_and_keeps_the_old_file(tmp_path, code, words):
    """The errors a real disk gives (simulated: RLIMIT_FSIZE's EFBIG is the real one, in
    test_catalogue.py), raised by the file object as the disk would."""
    path = tmp_path / 'last.pt'
    path.write_bytes(b'old')
    with pytest.raises(UserInputError) as error:
        with fileio.atomic_output(path) as f:
            f.write(b'new')
            raise OSError(code, os.strerror(code))
    assert str(error.value).startswith(f'{path}: {words} ({os.strerror(code)}); nothing was '
                                       'written and the previous file is unchanged; ')
    assert os.listdir(tmp_path) == ['last.pt'] and path.read_bytes() == b'old'


def test_torch_save_failing_part_way_is_a_write_error(tmp_path, monkeypatch):
    """torch.save reports a failed write as a RuntimeError whose context is the OSError."""
    path = tmp_path / 'last.pt'
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(fileio, 'open', lambda *a, **k: Full(real_open(*a, **k)),
                        raising=False)
    with pytest.raises(UserInputError, match='last.pt: the disk is full'):
        with fileio.atomic_output(path) as f:
            torch.save({'w': torch.zeros(10000)}, f)
    assert os.listdir(tmp_path) == []


def test_output_folder_checks_create_nothing(tmp_path, monkeypatch):
    target = tmp_path / 'a' / 'b'
    assert fileio.require_output_dir(str(target)) == str(target)
    assert os.listdir(tmp_path) == []
    (tmp_path / 'c').mkdir()
    fileio.require_output_dir(str(tmp_path / 'c'))
    assert os.listdir(tmp_path / 'c') == []

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, 'mkdir', read_only)
    with pytest.raises(UserInputError, match=f'--output-dir {target}: cannot create folders '
                       f'in {tmp_path}: the file system is read-only; choose a writable folder'):
        fileio.require_output_dir(str(target))


HOLDER = '''
import sys, time
sys.path.insert(0, sys.argv[1])
from utils.fileio import output_lock
with output_lock(sys.argv[2]):
    print('held', flush=True)
    time.sleep(120)
'''


def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path, capfd):
    """A process holding the folder (as a running train.py does) makes train.py refuse
    before any work; once the holder is SIGKILLed the lock is free again, with no stale
    lock to delete."""
    import train
    folder = tmp_path / 'run'
    holder = subprocess.Popen([sys.executable, '-c', HOLDER, ROOT, str(folder)],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b'held\n'
        code, _, err = _run(train.main, ['--cfg', CFG, '--data', 'nowhere.data',
                                         '--output-dir', str(folder)], capfd)
        assert code == 2 and err.strip().splitlines() == [
            f'error: --output-dir {folder}: another run is writing into this folder (it holds '
            f'{folder}/.lock); wait for it to end or choose another --output-dir']
        assert os.listdir(folder) == ['.lock']
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    with fileio.output_lock(str(folder)):
        with pytest.raises(UserInputError, match='another run is writing'):
            with fileio.output_lock(str(folder)):
                pass
    assert os.listdir(folder) == []
