"""Darknet .weights and .pt checkpoints: header variants, exact size checks, refusals."""
import os

import numpy as np
import pytest
import torch
from conftest import TEST_CFGS, randomize_weights

from darknet.cfg import parse_model_cfg
from darknet.model import Darknet
from darknet.weights import (conv_layers, convert_weights, darknet_float_count, darknet_tensors,
                             load_darknet_weights, load_weights, save_model_weights, save_weights)
from utils.errors import UserInputError

CFG = os.path.join(TEST_CFGS, 'features.cfg')
OTHER_CFG = os.path.join(TEST_CFGS, 'route_groups2.cfg')


@pytest.fixture
def model():
    return randomize_weights(Darknet(CFG), seed=7)


def _same_tensors(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _floats(model):
    """All weights in .weights order, gathered independently of save_weights."""
    return np.concatenate([t.detach().numpy().ravel() for _, block in conv_layers(model)
                           for t in darknet_tensors(block)])


def test_old_header_with_int32_seen_loads_the_same_floats(model, tmp_path):
    """Darknet before 0.2 wrote `seen` as int32: the floats start 4 bytes earlier."""
    floats = _floats(model)
    old = tmp_path / 'old.weights'
    with open(old, 'wb') as f:
        np.array([0, 1, 0, 4321], dtype='<i4').tofile(f)
        floats.astype('<f4').tofile(f)
    loaded = load_darknet_weights(Darknet(CFG), str(old))
    assert _same_tensors(loaded, model)
    assert loaded.seen == 4321 and loaded.version == (0, 1, 0)
    assert os.path.getsize(old) == 16 + 4 * darknet_float_count(model)


@pytest.mark.parametrize('edit, needles', [
    (lambda b: b[:-4], ['needs', 'the file has', 'truncated or belongs to another cfg']),
    (lambda b: b + b'\0' * 8, ['needs', 'the file has']),
    (lambda b: b[:20], ['needs', 'the file has 0 (20 bytes)']),
    (lambda b: b[:10], ['too short for a Darknet .weights header']),
    (lambda b: b'', ['the weights file is empty']),
    (lambda b: b'PK\x03\x04' + b[4:], ['not a Darknet .weights file']),
    (lambda b: b'[net]\nwidth=416\nheight=416\n' * 10, ['not a Darknet .weights file']),
])
def test_bad_weights_file_is_refused_with_sizes(model, tmp_path, edit, needles):
    good = tmp_path / 'good.weights'
    save_weights(model, str(good))
    bad = tmp_path / 'bad.weights'
    bad.write_bytes(edit(good.read_bytes()))
    with pytest.raises(UserInputError) as error:
        load_darknet_weights(Darknet(CFG), str(bad))
    message = str(error.value)
    assert message.startswith(str(bad))
    for needle in needles:
        assert needle in message
    if 'needs' in needles:
        expected = 20 + 4 * darknet_float_count(model)
        assert f'({expected} bytes)' in message and f'({len(bad.read_bytes())} bytes)' in message


def test_weights_of_another_cfg_are_refused(model, tmp_path):
    path = str(tmp_path / 'other.weights')
    save_weights(Darknet(OTHER_CFG), path)
    with pytest.raises(UserInputError, match='belongs to another cfg'):
        load_darknet_weights(Darknet(CFG), path)


def test_backbone_file_loads_only_below_cutoff(model, tmp_path):
    cutoff = 10  # layers 0..9: the convs before the second stride-2 conv
    backbone = str(tmp_path / 'features.conv.10')
    save_weights(model, backbone, cutoff=cutoff)
    fresh = Darknet(CFG)
    untouched = fresh.module_list[10].Conv2d.weight.clone()
    load_weights(fresh, backbone, cutoff=cutoff)
    for i in range(cutoff):
        for a, b in zip(model.module_list[i].state_dict().values(),
                        fresh.module_list[i].state_dict().values()):
            assert torch.equal(a, b)
    assert torch.equal(fresh.module_list[10].Conv2d.weight, untouched)
    with pytest.raises(UserInputError, match=r'needs \d+ weights'):
        load_weights(Darknet(CFG), backbone)  # a backbone is not a whole model


def test_pt_dict_and_bare_state_dict_and_ddp_prefix_load(model, tmp_path):
    forms = {'dict.pt': {'model': model.state_dict(), 'epoch': 3},
             'bare.pt': model.state_dict(),
             'ddp.pt': {'model': {f'module.{k}': v for k, v in model.state_dict().items()}}}
    for name, content in forms.items():
        torch.save(content, tmp_path / name)
        assert _same_tensors(load_weights(Darknet(CFG), str(tmp_path / name)), model), name


def test_pt_of_another_cfg_names_first_mismatched_layer(tmp_path):
    hyper, layers = parse_model_cfg(CFG)
    layers[2] = dict(layers[2], filters=10)  # layer 2's conv narrower, layer 3's input too
    path = tmp_path / 'narrow.pt'
    torch.save({'model': Darknet((hyper, layers)).state_dict()}, path)
    with pytest.raises(UserInputError, match=r'layer 2 \[convolutional\]: module_list.2.Conv2d'
                       r'.weight has shape \(10, 24, 1, 1\) in the file but \(12, 24, 1, 1\)'):
        load_weights(Darknet(CFG), str(path))
    torch.save({'model': Darknet(OTHER_CFG).state_dict()}, path)
    with pytest.raises(UserInputError, match='checkpoint is for another cfg'):
        load_weights(Darknet(CFG), str(path))


@pytest.mark.parametrize('content, needle', [
    (b'', 'empty'),
    (b'not a checkpoint at all' * 50, 'not a readable PyTorch checkpoint'),
    (None, 'holds no model state dict'),
])
def test_garbage_pt_is_refused(tmp_path, content, needle):
    path = tmp_path / 'bad.pt'
    if content is None:
        torch.save({'model': [1, 2, 3]}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserInputError, match=needle):
        load_weights(Darknet(CFG), str(path))


def test_missing_files_are_refused(tmp_path):
    for name in ('none.weights', 'none.pt'):
        with pytest.raises(UserInputError, match='not found'):
            load_weights(Darknet(CFG), str(tmp_path / name))


def test_convert_round_trip_is_bit_exact(model, tmp_path):
    weights, pt, back = (str(tmp_path / n) for n in ('a.weights', 'a.pt', 'b.weights'))
    model.seen = 77
    save_weights(model, weights)
    convert_weights(CFG, weights, pt)
    assert _same_tensors(load_weights(Darknet(CFG), pt), model)
    convert_weights(CFG, pt, back)
    assert _same_tensors(load_weights(Darknet(CFG), back), model)
    with pytest.raises(UserInputError, match='would overwrite an input file'):
        convert_weights(CFG, pt, pt)


def test_saved_pt_is_a_state_dict_under_model(model, tmp_path):
    path = str(tmp_path / 'm.pt')
    save_model_weights(model, path)
    content = torch.load(path, weights_only=True)
    assert set(content) == {'model'} and content['model'].keys() == model.state_dict().keys()
