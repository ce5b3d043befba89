"""The CLI chores written once (cli/common.py, utils.fileio.refuse_overwrite).

The overwrite check compares resolved paths: an output reached through a symlinked
folder is the input file it lands on (atomic_output renames into that folder), which
an abspath comparison misses. Each script-level case fails before any model is read,
so a script that let the path through would fail later with another message.
"""
import os
import test as test_script
from argparse import Namespace
from types import SimpleNamespace

import pytest
from conftest import TEST_CFGS

import derive_cfg
from cli import demo
from cli.common import use_demo
from darknet.model import Darknet
from data.datasets import check_classes, default_img_size
from utils.errors import UserInputError
from utils.fileio import overwritten_input, refuse_overwrite

CFG = os.path.join(TEST_CFGS, 'small_detector.cfg')


@pytest.fixture
def linked(tmp_path):
    """(input file in real/, the folder link/ -> real/)."""
    real = tmp_path / 'real'
    real.mkdir()
    data = real / 'model.weights'
    data.write_bytes(b'\x00' * 64)
    (tmp_path / 'link').symlink_to(real, target_is_directory=True)
    return data, tmp_path / 'link'


def test_overwritten_input_sees_through_symlinks(linked, tmp_path):
    data, link = linked
    (tmp_path / 'alias.weights').symlink_to(data)
    inputs = [None, str(data)]
    assert overwritten_input(str(link / 'model.weights'), inputs) == str(data)
    assert overwritten_input(str(tmp_path / 'alias.weights'), inputs) == str(data)
    assert overwritten_input(str(link / 'other.weights'), inputs) is None
    with pytest.raises(UserInputError, match=r'^--out .*model.weights: would overwrite an '
                                             'input file; pick another$'):
        refuse_overwrite(str(link / 'model.weights'), inputs, 'pick another', '--out')


def test_test_py_refuses_a_json_path_onto_an_input_through_a_symlink(linked):
    data, link = linked
    with pytest.raises(UserInputError, match='--metrics-json .*: would overwrite an input file'):
        test_script.main(['--cfg', CFG, '--weights', str(data), '--data', 'data/shapes.data',
                          '--metrics-json', str(link / 'model.weights')])
    assert data.read_bytes() == b'\x00' * 64


def test_derive_cfg_refuses_an_output_onto_its_cfg_through_a_symlink(linked):
    data, link = linked
    cfg = data.with_name('model.cfg')
    cfg.write_text(open(CFG).read())
    with pytest.raises(UserInputError, match='--output .*: would overwrite an input file'):
        derive_cfg.main(['--cfg', str(cfg), '--classes', '3', '--output', str(link / 'model.cfg')])
    assert cfg.read_text() == open(CFG).read()


def test_use_demo_fills_only_the_missing_flags():
    given = Namespace(cfg=None, weights='mine.pt', data='mine.data', img_size=64)
    use_demo(given)
    assert vars(given) == {'cfg': demo.YOLOV3['cfg'], 'weights': 'mine.pt',
                           'data': 'mine.data', 'img_size': 64}
    bare = Namespace(cfg=None, weights=None, img_size=None)
    use_demo(bare, demo.TINY, weights=None, data=False)
    # no --img-size: the run takes the demo cfg's width, which is the demo's size
    assert vars(bare) == {'cfg': demo.TINY['cfg'], 'weights': None, 'img_size': None}
    for spec in (demo.YOLOV3, demo.TINY):
        assert Darknet(spec['cfg']).hyperparams['width'] == demo.IMG_SIZE


def test_default_img_size_takes_the_flag_then_the_cfg_and_checks_the_stride():
    model = SimpleNamespace(hyperparams={'width': 96}, stride=32)
    assert default_img_size(model) == 96
    assert default_img_size(model, 64) == 64
    assert default_img_size(SimpleNamespace(hyperparams={}, stride=32)) == 416
    with pytest.raises(UserInputError, match='--img-size 100 is not a multiple of the model '
                                             'stride 32; use 96 or 128'):
        default_img_size(model, 100)


def test_check_classes_names_both_files_and_the_fix():
    model = SimpleNamespace(num_classes=4)
    check_classes(model, {'classes': 4}, 'a.data', 'a.cfg')
    with pytest.raises(UserInputError, match=r'^a.data: classes=3 but a.cfg detects 4; '
                                             r'pass the matching .data$'):
        check_classes(model, {'classes': 3}, 'a.data', 'a.cfg')
