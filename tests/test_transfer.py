"""Transfer learning: weights of an 80-class model into 1-, 3- and 80-class cfgs
(.weights and .pt), the source layout inferred or refused, backbone files (--cutoff,
convert_weights.py --cutoff), the seed project's files and flags, and run folders."""
import copy
import math
import os

import numpy as np
import pytest
import torch
from conftest import (TEST_CFGS, assert_same_detections, opencv_detections, our_detections,
                      randomize_weights)

from darknet.cfg import parse_model_cfg, write_cfg
from darknet.model import Darknet
from darknet.transfer import transfer_weights, with_classes
from darknet.weights import (conv_layers, darknet_tensors, load_weights, save_model_weights,
                             save_weights)
from utils.errors import UserInputError

SMALL = os.path.join(TEST_CFGS, 'small_detector.cfg')  # 4 classes, heads at layers 9 and 16


@pytest.fixture(scope='module')
def coco_like(tmp_path_factory):
    """A small synthetic "COCO" model: small_detector.cfg with 80 classes, random weights,
    saved as .weights and .pt; cfgs of the same topology for 1, 3 and 80 classes."""
    folder = tmp_path_factory.mktemp('coco_like')
    hyperparams, layers = parse_model_cfg(SMALL)
    cfgs = {}
    for classes in (1, 3, 7, 80):
        cfgs[classes] = str(folder / f'small-{classes}.cfg')
        write_cfg(cfgs[classes], hyperparams, with_classes(layers, classes))
    source = randomize_weights(Darknet(cfgs[80]), seed=11)
    weights, pt = str(folder / 'coco.weights'), str(folder / 'coco.pt')
    save_weights(source, weights)
    save_model_weights(source, pt)
    return {'cfgs': cfgs, 'source': source, 'weights': weights, 'pt': pt, 'folder': folder}


def _head_convs(model):
    return [i - 1 for i, layer in enumerate(model.module_defs) if layer['type'] == 'yolo']


def _block_tensors(model, i):
    return [t.detach() for t in darknet_tensors(model.module_list[i])]


def _rescaled_copy(target, source, i):
    """Conv block `i` of `target` is block `i` of `source` with its weight scaled down to
    the norm of a fresh init and its running statistics with it: the same function, in
    train mode (batch statistics) and in eval mode."""
    # copies: a train-mode forward updates the running statistics (`source` is shared)
    ours, theirs = copy.deepcopy(target.module_list[i]), copy.deepcopy(source.module_list[i])
    weight = ours.Conv2d.weight.detach()
    assert torch.isclose(weight.norm(), torch.tensor((weight.numel() / (3 * weight[0].numel()))
                                                     ** 0.5))
    assert weight.norm() < theirs.Conv2d.weight.norm()
    x = torch.randn(2, weight.shape[1], 8, 8, generator=torch.Generator().manual_seed(i))
    for train in (False, True):
        ours.train(train), theirs.train(train)
        with torch.no_grad():
            assert torch.allclose(ours(x), theirs(x), atol=1e-4), (i, train)
    return True


@pytest.mark.parametrize('ext', ['weights', 'pt'])
@pytest.mark.parametrize('classes', [1, 3, 80])
def test_transfer_copies_matching_convs_bit_exact_and_reinitialises_heads(coco_like, classes,
                                                                          ext):
    source = coco_like['source']
    target = randomize_weights(Darknet(coco_like['cfgs'][classes]), seed=5)
    summary = transfer_weights(target, coco_like[ext], img_size=64)
    heads = _head_convs(target)
    for i, _ in conv_layers(target):
        if i in heads and classes != 80:
            continue
        if classes != 80 and i > heads[0]:  # after the first fresh head: rescaled
            assert _rescaled_copy(target, source, i)
            continue
        for ours, theirs in zip(_block_tensors(target, i), _block_tensors(source, i)):
            assert torch.equal(ours, theirs), i
    n_convs = len(conv_layers(target))
    if classes == 80:
        assert summary.startswith(f'loaded {n_convs} of {n_convs} convs from coco.{ext}')
        assert 're-initialised' not in summary
        return
    filters = 3 * (5 + classes)  # three anchors per head
    assert summary.startswith(f'loaded {n_convs - 2} of {n_convs} convs from coco.{ext}')
    assert summary.endswith(f're-initialised layers {heads[0]}, {heads[1]} '
                            f'([yolo] heads: 255 -> {filters} filters)')
    if ext == 'weights':
        assert '(read as classes=80)' in summary
    # each re-initialised head starts at the priors: log(8 objects / cells) in objectness,
    # log(0.6 / (classes - 0.99)) per class; cells = (64 px / stride) ** 2
    for i, stride in zip(heads, (8, 4)):
        bias = target.module_list[i].Conv2d.bias.detach().view(3, -1)
        assert torch.allclose(bias[:, 4], torch.tensor(math.log(8 / (64 / stride) ** 2)))
        assert torch.allclose(bias[:, 5:], torch.tensor(math.log(0.6 / max(classes - 0.99,
                                                                            0.01))))
        weight = target.module_list[i].Conv2d.weight.detach()
        assert weight.shape[0] == filters and weight.abs().max() < 1  # fresh, not random+-3


def test_source_class_count_is_inferred_from_the_size(coco_like):
    source = randomize_weights(Darknet(coco_like['cfgs'][7]), seed=2)
    path = str(coco_like['folder'] / 'seven.weights')
    save_weights(source, path)
    summary = transfer_weights(Darknet(coco_like['cfgs'][1]), path)
    assert '(read as classes=7)' in summary and '([yolo] heads: 36 -> 18 filters)' in summary


def test_a_file_that_fits_no_layout_is_refused_with_integer_sizes(coco_like, tmp_path):
    path = tmp_path / 'cut.weights'
    path.write_bytes(open(coco_like['weights'], 'rb').read()[:-40])  # 10 floats short
    with pytest.raises(UserInputError) as error:
        transfer_weights(Darknet(coco_like['cfgs'][3]), str(path))
    message = str(error.value)
    floats = (os.path.getsize(path) - 20) // 4
    assert message.startswith(f'{path}: holds {floats} weights') and '--weights-cfg' in message
    assert 'e+' not in message
    with pytest.raises(UserInputError) as error:  # the strict load names integers too
        load_weights(Darknet(coco_like['cfgs'][3]), coco_like['weights'])
    assert f'the file has {(os.path.getsize(coco_like["weights"]) - 20) // 4} (' in str(error.value)


def test_a_size_that_fits_two_readings_is_refused_as_ambiguous(tmp_path):
    """Both head convs read 65 values per filter (64 inputs + bias) once layer 14 has
    64 filters, so 7 -> 1 classes removes 6 x 3 x 65 x 2 = 2340 floats: exactly the last
    head conv (3 x 12 x 65) that a backbone of layers 0..14 lacks."""
    hyperparams, layers = parse_model_cfg(SMALL)
    layers = with_classes(layers, 7)
    layers[14] = dict(layers[14], filters=layers[7]['filters'])
    cfg = str(tmp_path / 'seven.cfg')
    write_cfg(cfg, hyperparams, layers)
    path = str(tmp_path / 'backbone.weights')
    save_weights(Darknet(cfg), path, cutoff=15)
    with pytest.raises(UserInputError) as error:
        transfer_weights(Darknet(cfg), path)
    message = str(error.value)
    assert 'as classes=1 or as a backbone: layers 0..14' in message
    assert '--weights-cfg' in message and '--cutoff' in message
    # saying which resolves it
    summary = transfer_weights(Darknet(cfg), path, cutoff=15)
    assert summary.startswith(f'loaded {len(conv_layers(Darknet(cfg))) - 1} of')


def test_weights_cfg_names_a_layout_that_cannot_be_inferred(coco_like, tmp_path):
    hyperparams, layers = parse_model_cfg(coco_like['cfgs'][80])
    layers[6] = dict(layers[6], filters=48)  # another width in the middle
    other = str(tmp_path / 'wide.cfg')
    write_cfg(other, hyperparams, layers)
    source = randomize_weights(Darknet(other), seed=3)
    path = str(tmp_path / 'wide.weights')
    save_weights(source, path)
    with pytest.raises(UserInputError, match='no other classes= nor a backbone'):
        transfer_weights(Darknet(coco_like['cfgs'][3]), path)
    target = Darknet(coco_like['cfgs'][3])
    summary = transfer_weights(target, path, source_cfg=other)
    # layer 6 is wider, layers 7 and 11 (through the route) read it: re-initialised, and
    # the heads too
    assert 're-initialised layers 6-7, 11 (other shapes in the file), 8, 15 ([yolo] heads' \
        in summary
    for i in (0, 2, 4):
        assert all(torch.equal(a, b) for a, b in zip(_block_tensors(target, i),
                                                     _block_tensors(source, i)))
    assert _rescaled_copy(target, source, 14)  # loaded after the first fresh conv (6)
    with pytest.raises(UserInputError, match='needs .* weights, the file has'):
        transfer_weights(Darknet(coco_like['cfgs'][3]), path, source_cfg=coco_like['cfgs'][1])


def test_cutoff_reads_the_first_layers_of_a_longer_file(coco_like):
    source = coco_like['source']
    target = Darknet(coco_like['cfgs'][80])
    untouched = _block_tensors(target, 6)
    load_weights(target, coco_like['weights'], cutoff=5)  # layers 0..4: convs 0, 2, 4
    for i in (0, 2, 4):
        assert all(torch.equal(a, b) for a, b in zip(_block_tensors(target, i),
                                                     _block_tensors(source, i)))
    assert all(torch.equal(a, b) for a, b in zip(_block_tensors(target, 6), untouched))
    # into another class count, through transfer (heads beyond the cutoff)
    cut = Darknet(coco_like['cfgs'][1])
    summary = transfer_weights(cut, coco_like['weights'], cutoff=5)
    assert summary.startswith('loaded 3 of 9 convs') and '(from --cutoff 5 on)' in summary
    for i in (0, 2, 4):  # nothing loaded after a fresh conv: as in the file
        assert all(torch.equal(a, b) for a, b in zip(_block_tensors(cut, i),
                                                     _block_tensors(source, i)))
    with pytest.raises(UserInputError, match='--cutoff 40'):
        load_weights(Darknet(coco_like['cfgs'][1]), coco_like['weights'], cutoff=40)


def test_convert_weights_cutoff_writes_a_backbone(coco_like, tmp_path):
    import convert_weights
    out = str(tmp_path / 'small.conv.7')
    convert_weights.main(['--cfg', coco_like['cfgs'][80], '--weights', coco_like['weights'],
                          '--output', out, '--cutoff', '7'])
    source = coco_like['source']
    floats = sum(t.numel() for i, block in conv_layers(source) if i < 7
                 for t in darknet_tensors(block))
    assert os.path.getsize(out) == 20 + 4 * floats
    expected = np.concatenate([t.detach().numpy().ravel() for i, block in conv_layers(source)
                               if i < 7 for t in darknet_tensors(block)])
    assert np.array_equal(np.fromfile(out, dtype='<f4', offset=20), expected)
    summary = transfer_weights(Darknet(coco_like['cfgs'][3]), out)
    assert '(read as a backbone: layers 0..6)' in summary
    with pytest.raises(UserInputError, match='backbone file'):
        convert_weights.main(['--cfg', coco_like['cfgs'][80], '--weights',
                              coco_like['weights'], '--output', str(tmp_path / 'b.pt'),
                              '--cutoff', '7'])


def test_duplicate_key_takes_the_value_opencv_takes(tmp_path, capsys):
    """A conv with filters=8 then filters=16: OpenCV's importer builds 16 (its last
    value); ours must build the same model, and its output must match OpenCV's."""
    text = open(SMALL).read()
    first = text.index('filters=16')
    cfg = tmp_path / 'dup.cfg'
    cfg.write_text(text[:first] + 'filters=8\n' + text[first:])
    line = text[:first].count('\n') + 1
    model = randomize_weights(Darknet(str(cfg)), seed=4)
    warning = capsys.readouterr().err
    assert f"{cfg} line {line + 1}: 'filters' is set again" in warning
    assert f'(first at line {line})' in warning and warning.count('\n') == 1
    assert model.module_list[0].Conv2d.out_channels == 16
    weights = str(tmp_path / 'dup.weights')
    save_weights(model, weights)
    image = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    assert_same_detections(our_detections(model, image),
                           opencv_detections(str(cfg), weights, image, model), opencv=True)
    cfg.write_text(text.replace('filters=16', 'filtres=16', 1))
    with pytest.raises(UserInputError, match="no key 'filtres'"):  # typos stay refused
        Darknet(str(cfg))


def test_seed_checkpoint_with_optimizer_state_loads_but_does_not_resume(coco_like, tmp_path):
    """The ultralytics-era train.py saved epoch, best_fitness, training_results, model and
    optimizer; its weights load, --resume refuses it in one line."""
    import train
    source = coco_like['source']
    optimizer = torch.optim.SGD(source.parameters(), lr=0.01, momentum=0.9)
    for p in source.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    folder = tmp_path / 'seed_run'
    folder.mkdir()
    torch.save({'epoch': 3, 'best_fitness': float('inf'), 'training_results': '0/272 ...',
                'model': source.state_dict(), 'optimizer': optimizer.state_dict()},
               folder / 'last.pt')
    loaded = load_weights(Darknet(coco_like['cfgs'][80]), str(folder / 'last.pt'))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 source.state_dict().values()))
    with pytest.raises(UserInputError, match='ultralytics-era train.py, which this one '
                                             'cannot resume; start a new run from its'):
        train.main(['--cfg', coco_like['cfgs'][80], '--resume', '--output-dir', str(folder)])


def test_test_py_accepts_the_seed_flags():
    import test
    args = test.get_args_parser().parse_args(['--nms-thres', '0.4', '--save-json'])
    assert args.iou_thres == 0.4 and args.save_json == 'results.json'
    args = test.get_args_parser().parse_args(['--save-json', 'x.json', '--iou-thres', '0.3'])
    assert args.iou_thres == 0.3 and args.save_json == 'x.json'


@pytest.fixture(scope='module')
def shapes8(tmp_path_factory):
    from data.make_shapes import generate
    folder = tmp_path_factory.mktemp('shapes8_transfer')
    return str(generate(folder, seed=4, n_train=8, n_valid=4, img_size=64, plain=True,
                        workers=1, progress=False))


def test_train_starts_from_an_80_class_file_freezes_and_keeps_runs_apart(coco_like, shapes8,
                                                                         tmp_path, capsys):
    """train.py --weights with the 80-class file into the 4-class cfg, layers 0..4 frozen
    for the one epoch: they end bit-equal to the file, layer 6 moves. A second fresh run
    into the folder is refused; --exist-ok replaces it (results.csv starts over)."""
    import train
    run = str(tmp_path / 'run')
    argv = ['--cfg', SMALL, '--data', shapes8, '--weights', coco_like['weights'], '--epochs',
            '1', '--batch-size', '4', '--img-size', '64', '--workers', '0', '--output-dir', run,
            '--freeze', '5']
    train.main(argv)
    out = capsys.readouterr().out
    assert 'loaded 7 of 9 convs from coco.weights (read as classes=80); re-initialised ' \
           'layers 8, 15 ([yolo] heads: 255 -> 27 filters)' in out
    trained = load_weights(Darknet(SMALL), os.path.join(run, 'last.pt'))
    source = coco_like['source']
    for i in (0, 2, 4):
        assert all(torch.equal(a, b) for a, b in zip(_block_tensors(trained, i),
                                                     _block_tensors(source, i)))
    assert not torch.equal(_block_tensors(trained, 6)[-1], _block_tensors(source, 6)[-1])
    with pytest.raises(UserInputError, match=r'holds another run \(last.pt, best.pt\); '
                                             'continue it with --resume, replace it with '
                                             '--exist-ok'):
        train.main(argv)
    train.main(argv + ['--exist-ok'])
    rows = open(os.path.join(run, 'results.csv')).read().splitlines()
    assert len(rows) == 2 and rows[1].startswith('1,')
