"""deploy/inference.py: the prepared model (fused, fp16, channels_last, CUDA-graph replay)
against the eager model it came from, and the scripts' --half refusal on the CPU."""
import os

import pytest
import torch
from conftest import TEST_CFGS, randomize_weights

from darknet.model import Darknet
from deploy.inference import check_half, prepare
from utils.errors import UserInputError

CFG = os.path.join(TEST_CFGS, 'small_detector.cfg')
CUDA = torch.cuda.is_available()


def model_and_input(batch=2, size=64):
    model = randomize_weights(Darknet(CFG)).eval()
    return model, torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def share_of_scale(ours, reference):
    """Per output part (boxes, scores) max|difference| / max|reference|, the largest."""
    parts = [(ours[..., :4], reference[..., :4]), (ours[..., 4:], reference[..., 4:])]
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in parts)


@pytest.mark.parametrize('channels_last', [False, True])
def test_prepared_fp32_equals_the_eager_model(channels_last):
    model, x = model_and_input()
    run = prepare(model, 'cpu', channels_last=channels_last, graph=True)
    assert run.mode == 'eager'  # nothing to capture on the CPU
    with torch.no_grad():
        reference = model(x)
    out = run(x)
    assert out.dtype == torch.float32 and out.shape == reference.shape
    assert share_of_scale(out, reference) <= 1e-5


def test_prepared_fp16_is_within_half_precision_of_fp32():
    """fp16 keeps 11 significant bits: boxes and scores within 1e-2 of their scale (the
    fp16 export's bound too); and it is really fp16, not fp32 again."""
    model, x = model_and_input()
    run = prepare(model, 'cpu', half=True)
    assert all(p.dtype == torch.float16 for p in run.parameters())
    with torch.no_grad():
        reference = model(x)
    out = run(x)
    assert out.dtype == torch.float32
    assert 0 < share_of_scale(out, reference) <= 1e-2


def test_preparing_leaves_the_model_untouched():
    model, x = model_and_input()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare(model, 'cpu', half=True, channels_last=True)(x)
    assert model.training and next(model.parameters()).dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_half_is_refused_off_the_gpu():
    check_half(False, torch.device('cpu'))
    with pytest.raises(UserInputError, match='--device cuda'):
        check_half(True, torch.device('cpu'))
    with pytest.raises(UserInputError, match='export.py --half'):
        check_half(True, torch.device('cpu'), exported=True)


def test_test_py_refuses_half_on_the_cpu_in_one_line(capsys, tmp_path):
    import test

    from darknet.weights import save_weights
    from utils.errors import run_cli
    weights = str(tmp_path / 'model.pt')
    save_weights(Darknet(CFG), weights)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(test.main, ['--cfg', CFG, '--weights', weights, '--data', 'missing.data',
                            '--half'])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert '--half needs --device cuda' in err and len(err.splitlines()) == 1


@pytest.mark.skipif(not CUDA, reason='CUDA-graph replay needs a GPU')
@pytest.mark.parametrize('half', [False, True])
def test_graph_replay_equals_eager_on_cuda(half):
    """Replayed graphs give the eager output of the same prepared net (1e-4 of the scale),
    follow new inputs of the captured shape, and capture a second shape separately."""
    model, x = model_and_input()
    run = prepare(model, 'cuda', half=half, channels_last=True, graph=True)
    eager = prepare(model, 'cuda', half=half, channels_last=True, graph=False)
    assert run.mode == 'cuda-graph'
    for inputs in (x, torch.rand_like(x), torch.rand(1, 3, 96, 96)):
        assert share_of_scale(run(inputs.cuda()), eager(inputs.cuda())) <= 1e-4
    assert len(run.captures) == 2
