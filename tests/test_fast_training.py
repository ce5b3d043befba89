"""Issue 26's training speed features that a CPU can check: bfloat16 autocast against
float32, float32 checkpoints under --amp, channels-last against the usual layout, a
non-finite loss and running out of memory stopping with one line, and --cache giving
the same items as decoding each time."""
import os

import numpy as np
import pytest
import torch
from conftest import TEST_CFGS, randomize_weights

import train
from darknet.loss import compute_loss
from darknet.model import Darknet
from data import cache as cache_module
from data.datasets import LoadImagesAndLabels, create_dataloader, default_workers
from training import engine
from utils.errors import UserInputError, run_cli

CFG = os.path.join(TEST_CFGS, 'small_detector.cfg')


def _args(data, folder, epochs, *flags):
    return ['--cfg', CFG, '--data', data, '--batch-size', '4', '--img-size', '32',
            '--workers', '0', '--epochs', str(epochs), '--output-dir', str(folder), *flags]


def _train_list(data):
    return os.path.join(os.path.dirname(data), 'train.txt')


# ---------------------------------------------------------------- precision and layout

def test_precision_defaults_and_types(monkeypatch):
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    assert engine.choose_precision(None, cpu).dtype is None  # off on the CPU
    assert engine.choose_precision(True, cpu).dtype == torch.bfloat16
    assert not engine.choose_precision(True, cpu).scaler.is_enabled()
    assert not engine.choose_precision(None, cpu).channels_last
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)
    assert engine.choose_precision(None, cuda).dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: False)
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else _nothing():
        precision = engine.choose_precision(None, cuda)
    assert precision.dtype == torch.float16 and precision.channels_last
    assert engine.choose_precision(False, cuda).dtype is None


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_one_bfloat16_step_gives_the_float32_loss_and_gradients(features_cfg):
    model = randomize_weights(Darknet(features_cfg), 2).train()
    imgs = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[0, 1, 0.3, 0.4, 0.2, 0.3], [1, 0, 0.7, 0.6, 0.5, 0.4]])
    results = []
    for amp in (False, True):
        precision = engine.choose_precision(amp, torch.device('cpu'))
        model.zero_grad()
        with precision.autocast(torch.device('cpu')):
            heads = model(imgs)
        assert heads[0].dtype == (torch.bfloat16 if amp else torch.float32)
        loss, items = compute_loss([h.float() for h in heads], targets, model)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((items, grad))
        assert all(p.dtype == torch.float32 for p in model.parameters())
    (items32, grad32), (items16, grad16) = results
    torch.testing.assert_close(items16, items32, rtol=0.03, atol=1e-3)
    # bfloat16 keeps 8 bits of mantissa: the gradient's direction, not its digits
    assert torch.cosine_similarity(grad16, grad32, 0) > 0.9


def test_checkpoints_saved_under_amp_are_float32(shapes16, tmp_path):
    train.main(_args(shapes16, tmp_path / 'run', 1, '--amp'))
    last = torch.load(tmp_path / 'run' / 'last.pt', weights_only=True)
    assert last['args']['amp'] is True
    for state in (last['model'], last['ema']['live_model']):
        floats = [v for v in state.values() if v.is_floating_point()]
        assert floats and all(v.dtype == torch.float32 for v in floats)
    assert all(v.dtype == torch.float32 for s in last['optimizer']['state'].values()
               for v in s.values() if torch.is_tensor(v) and v.is_floating_point())


def test_channels_last_model_gives_the_same_heads_and_loss(features_cfg):
    model = randomize_weights(Darknet(features_cfg), 3).train()
    imgs = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[0, 1, 0.3, 0.4, 0.2, 0.3], [1, 0, 0.7, 0.6, 0.5, 0.4]])
    plain = model(imgs)
    fast = model.to(memory_format=torch.channels_last)(
        imgs.to(memory_format=torch.channels_last))
    assert model.module_list[0].Conv2d.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(plain, fast):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compute_loss(fast, targets, model)[1],
                               compute_loss(plain, targets, model)[1], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- failures

def _one_line_error(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(train.main, argv)
    err = capsys.readouterr().err  # the progress bar's lines, then the error
    errors = [line for line in err.replace('\r', '\n').splitlines() if line.strip()
              and not line.startswith('epoch ')]
    assert stop.value.code == 2 and len(errors) == 1 and 'Traceback' not in err
    return errors[0]


def test_a_non_finite_loss_stops_naming_epoch_and_batch(shapes16, tmp_path, monkeypatch,
                                                        capsys):
    calls, real = [], engine.compute_loss

    def poisoned(heads, targets, model, hyp=None):
        loss, items = real(heads, targets, model, hyp)
        calls.append(1)
        if len(calls) == 4 + 3:  # epoch 2 (4 batches an epoch), batch 3
            return loss * float('nan'), items * float('nan')
        return loss, items

    monkeypatch.setattr(engine, 'compute_loss', poisoned)
    err = _one_line_error(_args(shapes16, tmp_path / 'run', 3), capsys)
    assert 'epoch 2, batch 3' in err and 'nan' in err and 'keeps epoch 1' in err
    last = torch.load(tmp_path / 'run' / 'last.pt', weights_only=True)
    assert last['epoch'] == 0  # epoch 1's, untouched
    assert all(torch.isfinite(v).all() for v in last['model'].values() if v.is_floating_point())


@pytest.mark.parametrize('where', ['training', 'validation'])
def test_out_of_memory_ends_with_one_line_of_advice(shapes16, tmp_path, monkeypatch, capsys,
                                                    where):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')

    monkeypatch.setattr(engine, 'compute_loss' if where == 'training' else 'evaluate',
                        out_of_memory)
    err = _one_line_error(_args(shapes16, tmp_path / 'run', 1), capsys)
    assert f'out of memory in {where} at --batch-size 4, --img-size 32' in err
    assert '--batch-size 2 --accumulate 2' in err and 'smaller --img-size' in err
    assert not os.path.exists(tmp_path / 'run' / 'last.pt')


# ---------------------------------------------------------------- data

@pytest.mark.parametrize('augment', [False, True])
def test_cached_items_equal_decoded_ones(shapes16, augment):
    plain = LoadImagesAndLabels(_train_list(shapes16), 32, 4, augment=augment)
    cached = LoadImagesAndLabels(_train_list(shapes16), 32, 4, augment=augment, cache=True)
    assert len(cached.images) == len(plain) == 16
    for i in range(len(plain)):
        torch.manual_seed(i)  # the same augmentation on both roads
        a = plain[i]
        torch.manual_seed(i)
        b = cached[i]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[3] == b[3]
    # augmentation (HSV works in place) has left the cached images as decoded
    for i in range(len(plain)):
        assert np.array_equal(cached.images[i][0], plain.letterboxed(i)[0])


def test_cache_prints_its_estimate_and_refuses_what_does_not_fit(shapes16, monkeypatch, capsys):
    LoadImagesAndLabels(_train_list(shapes16), 32, 4, cache=True)
    assert f'caching 16 decoded images, {16 * 32 * 32 * 3 / 2 ** 30:.2f} GiB' in \
        capsys.readouterr().out
    monkeypatch.setattr(cache_module, 'available_memory', lambda: 16 * 32 * 32 * 3 - 1)
    with pytest.raises(UserInputError, match='--cache: .* without --cache'):
        LoadImagesAndLabels(_train_list(shapes16), 32, 4, cache=True)
    assert cache_module.available_memory.__module__  # patched; the real one below
    monkeypatch.undo()
    assert cache_module.available_memory() > 0


def test_train_with_cache_and_the_worker_default(shapes16, tmp_path):
    train.main(_args(shapes16, tmp_path / 'run', 1, '--cache'))
    assert os.path.isfile(tmp_path / 'run' / 'last.pt')
    loader, _ = create_dataloader(_train_list(shapes16), 32, 16, None, workers=None)
    assert loader.num_workers == min(default_workers(), os.cpu_count()) == \
        min(8, os.cpu_count())
