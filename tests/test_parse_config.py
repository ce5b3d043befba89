"""cfg and .data parsing: typed values, exact round trips, and every refusal's message."""
import os

import pytest
import torch
from conftest import ROOT, SHIPPED_CFGS, TEST_CFGS

from darknet.cfg import (load_class_names, parse_data_cfg, parse_model_cfg, require_data_key,
                         write_cfg)
from darknet.model import Darknet
from derive_cfg import derive_cfg
from utils.errors import UserInputError

ALL_CFGS = SHIPPED_CFGS + sorted(os.path.join(TEST_CFGS, f) for f in os.listdir(TEST_CFGS))


@pytest.mark.parametrize('cfg', ALL_CFGS, ids=os.path.basename)
def test_write_then_parse_round_trips_exactly(cfg, tmp_path):
    hyperparams, layers = parse_model_cfg(cfg)
    out = tmp_path / 'copy.cfg'
    write_cfg(str(out), hyperparams, layers)
    assert parse_model_cfg(str(out)) == (hyperparams, layers)
    text = out.read_text()
    write_cfg(str(out), *parse_model_cfg(str(out)))
    assert out.read_text() == text


def test_values_are_typed_and_trainer_keys_are_kept():
    hyperparams, layers = parse_model_cfg(os.path.join(ROOT, 'cfg', 'yolov4-tiny.cfg'))
    assert hyperparams['steps'] == [1600000, 1800000] and hyperparams['hue'] == 0.1
    head = layers[30]
    assert head['type'] == 'yolo' and head['mask'] == [3, 4, 5]
    assert head['anchors'][:4] == [10.0, 14.0, 23.0, 27.0]
    assert head['iou_loss'] == 'ciou' and head['nms_kind'] == 'greedynms'
    assert head['scale_x_y'] == 1.05 and head['beta_nms'] == 0.6
    assert layers[3] == {'type': 'route', 'layers': [-1], 'groups': 2, 'group_id': 1}


def _write(tmp_path, text, name='bad.cfg'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


NET = '[net]\nwidth=64\nheight=64\n'
CONV = '[convolutional]\nbatch_normalize=1\nfilters={f}\nsize=3\nstride=1\npad=1\nactivation=leaky\n'
HEAD = ('[convolutional]\nsize=1\nfilters={f}\nactivation=linear\n'
        '[yolo]\nmask=0,1\nanchors=10,13, 16,30\nclasses=2\nnum=2\n')


def test_comments_and_whitespace_are_tolerated(tmp_path):
    text = ('# a model\n[net]  \n width = 64 ; the input\n\n[convolutional] # first\n'
            '  filters =  14\t\n size=3\nactivation= leaky\n' + HEAD.format(f=14))
    hyperparams, layers = parse_model_cfg(_write(tmp_path, text))
    assert hyperparams == {'width': 64}
    assert layers[0] == {'type': 'convolutional', 'filters': 14, 'size': 3, 'activation': 'leaky'}


@pytest.mark.parametrize('body, line, needles', [
    (CONV.format(f=14) + '[dropout]\nprobability=.5\n' + HEAD.format(f=14), 11,
     ['layer type [dropout] is not supported']),
    (CONV.format(f=14).replace('filters', 'filter') + HEAD.format(f=14), 6,
     ["no key 'filter'", "did you mean 'filters'?"]),
    (CONV.format(f='sixteen') + HEAD.format(f=14), 6, ["filters='sixteen' is not a valid int"]),
    (CONV.format(f=14) + '[route]\nlayers=-3\n' + HEAD.format(f=14), 11,
     ['layers=-3 points to layer -2', 'fix the reference']),
    (CONV.format(f=14) + '[shortcut]\nfrom=5\n' + HEAD.format(f=14), 11,
     ['from=5 points to layer 5']),
    (CONV.format(f=14) + HEAD.format(f=20), 11, ['has filters=20', 'set filters=14']),
    (CONV.format(f=14) + 'activation leaky\n' + HEAD.format(f=14), 11,
     ['is not a "[section]" or "key=value" line']),
    (CONV.format(f=14) + 'dilation=2\n' + HEAD.format(f=14), 11,
     ['dilated convolutions are not supported']),
    (CONV.format(f=14).replace('leaky', 'tanh') + HEAD.format(f=14), 10,
     ["activation 'tanh' is not supported", 'use one of']),
    (CONV.format(f=14) + '[yolo\nmask=0\n', 11, ['has no closing "]"']),
])
def test_bad_cfg_is_refused_with_file_line_and_fix(tmp_path, body, line, needles):
    path = _write(tmp_path, NET + body)
    with pytest.raises(UserInputError) as error:
        parse_model_cfg(path)
    message = str(error.value)
    assert message.startswith(f'{path} line {line}:'), message
    for needle in needles:
        assert needle in message
    assert '\n' not in message


@pytest.mark.parametrize('text, needle', [
    ('', 'no sections found'),
    ('# only a comment\n', 'no sections found'),
    ('[net]\nwidth=64\n', 'no layers'),
    (CONV.format(f=14), 'starts with [net]'),
    ('width=64\n' + NET, 'comes before any [section]'),
])
def test_cfg_without_structure_is_refused(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(UserInputError, match='bad.cfg'):
        parse_model_cfg(path)
    with pytest.raises(UserInputError) as error:
        parse_model_cfg(path)
    assert needle in str(error.value)


def test_missing_and_binary_cfg_are_refused(tmp_path):
    with pytest.raises(UserInputError, match='cfg file not found'):
        parse_model_cfg(str(tmp_path / 'none.cfg'))
    binary = tmp_path / 'x.cfg'
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(UserInputError, match='cannot read as a text cfg'):
        parse_model_cfg(str(binary))


def test_model_refuses_shapes_that_cannot_connect(tmp_path):
    # different widths are a partial residual (tests/test_partial_residual.py); different
    # spatial sizes cannot be added
    shortcut = (NET + CONV.format(f=14) + CONV.format(f=14).replace('stride=1', 'stride=2')
                + '[shortcut]\nfrom=-2\n' + HEAD.format(f=14))
    with pytest.raises(UserInputError, match=r'layer 2 \[shortcut\]: adds layer 0 to layer 1, '
                                             'whose outputs differ in spatial size'):
        Darknet(_write(tmp_path, shortcut))
    groups = NET + CONV.format(f=15) + '[route]\nlayers=-1\ngroups=2\ngroup_id=0\n' + HEAD.format(f=14)
    with pytest.raises(UserInputError, match=r'layer 1 \[route\]: groups=2 does not divide'):
        Darknet(_write(tmp_path, groups))
    strided = Darknet(_write(tmp_path, NET + CONV.format(f=14).replace('stride=1', 'stride=2')
                             + HEAD.format(f=14)))
    assert strided.stride == 2
    with pytest.raises(UserInputError, match='input size 32x33: both sides must be multiples of 2'):
        strided(torch.zeros(1, 3, 33, 32))


def test_derived_cfg_has_new_heads_and_scaled_widths(tmp_path):
    hyperparams, layers = parse_model_cfg(os.path.join(ROOT, 'cfg', 'yolov3.cfg'))
    new_hyper, new_layers = derive_cfg(hyperparams, layers, classes=1, width=0.25, img_size=96)
    assert new_hyper['width'] == new_hyper['height'] == 96
    for old, new in zip(layers, new_layers):
        if new['type'] == 'yolo':
            assert new['classes'] == 1  # anchors follow the input: 96 / 608 of the old
            assert new['anchors'] == [round(a * 96 / 608, 2) for a in old['anchors']]
        elif new['type'] == 'convolutional' and new.get('activation') == 'linear':
            assert new['filters'] == 3 * 6
        elif new['type'] == 'convolutional':
            assert new['filters'] % 8 == 0 and new['filters'] >= 8
            assert abs(new['filters'] - old['filters'] / 4) <= 4
    model = Darknet((new_hyper, new_layers))
    assert model.num_classes == 1 and len(model.yolo_layers) == len(
        [layer for layer in layers if layer['type'] == 'yolo'])


def test_data_cfg_resolves_paths_from_cwd_then_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / 'set'
    folder.mkdir()
    (folder / 'train.txt').write_text('')
    (folder / 'names.txt').write_text('a\nb\n\n')
    (tmp_path / 'valid.txt').write_text('')
    data = folder / 'my.data'
    data.write_text('classes = 2\ntrain = train.txt\nvalid=valid.txt\nnames=names.txt\n'
                    'backup=backup/\n')
    monkeypatch.chdir(tmp_path)
    options = parse_data_cfg(str(data))
    assert options['classes'] == 2
    assert options['train'] == str(folder / 'train.txt')
    assert options['valid'] == 'valid.txt'
    assert load_class_names(options['names']) == ['a', 'b']
    with pytest.raises(UserInputError, match="no 'test=' line"):
        require_data_key(options, 'test', str(data))


@pytest.mark.parametrize('text, needle', [
    ('train=a.txt\n', "no 'classes=' line"),
    ('classes=two\n', "classes='two' is not a valid int"),
    ('classes=0\n', 'must be at least 1'),
    ('classes=2\nvalid a.txt\n', 'line 2'),
    ('classes=2\nvalidate=a.txt\n', "did you mean 'valid'?"),
])
def test_bad_data_cfg_is_refused(tmp_path, text, needle):
    path = _write(tmp_path, text, 'bad.data')
    with pytest.raises(UserInputError) as error:
        parse_data_cfg(path)
    assert needle in str(error.value) and 'bad.data' in str(error.value)
