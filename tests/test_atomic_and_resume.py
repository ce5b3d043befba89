"""No run can lose a user's files: writes are atomic, and a killed training resumes.

Atomic writes: child processes write large JSON, `.weights` and `.pt` files over and
over through the project's writers while this test SIGKILLs them at random moments;
the file on disk must always be a whole old or a whole new version. A naive writer
killed the same way leaves torn files, which shows the check can see one. A SIGKILL
mid-write may leave the killed writer's hidden temporary file `.NAME.tmpPID` beside
the target (nothing runs after SIGKILL to remove it); the test allows exactly those.

Resume: train.py is stopped by SIGTERM, SIGINT and SIGKILL partway, then continued
with --resume; the run must end with every epoch counted once (results.csv rows 1..N,
last.pt at epoch N) and a loadable best.pt. SIGTERM/SIGINT save last.pt before exiting.
Kills just before and just after the last.pt save, and signals arriving while the
epoch's files are written, are reproduced exactly in-process.

Child processes run with one OpenMP thread: these models are tiny, and two threads
spinning against other work on a 2-core machine make each step many times slower.
"""
import ast
import csv
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TEST_CFGS

from darknet.model import Darknet
from darknet.weights import conv_layers, darknet_tensors, load_weights

CFG = os.path.join(TEST_CFGS, 'small_detector.cfg')
BIG_CFG = os.path.join(ROOT, 'cfg', 'yolov3-tiny.cfg')  # 8.9M parameters: 35 MB per write
CHILD_ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


def _wait_for(condition, timeout=120, what='condition'):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out waiting for {what}')
        time.sleep(0.02)


# ---------------------------------------------------------------- atomic writes

WRITER = r'''
import json, os, sys
root, kind, path, cfg, first = sys.argv[1:6]
sys.path.insert(0, root)
if kind == 'naive-json':
    def write(i):
        with open(path, 'w') as f:   # truncates first, then streams: what not to do
            json.dump({'i': i, 'payload': [i] * 300000}, f)
elif kind == 'json':
    from utils.fileio import atomic_output
    def write(i):
        with atomic_output(path, 'w') as f:
            json.dump({'i': i, 'payload': [i] * 300000}, f)
else:
    import torch
    from darknet.model import Darknet
    from darknet.weights import save_model_weights, save_weights
    model = Darknet(cfg)
    def write(i):
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.fill_(i)
        if i % 2:
            save_weights(model, path + '.weights')
        else:
            save_model_weights(model, path + '.pt')
i = int(first)
while True:
    write(i)
    if i == int(first) + 1:  # one file of each kind is whole on disk
        print('ready', flush=True)
    i += 1
'''


def _check_json(path):
    """The JSON file is one whole version: parses, and its payload matches its index."""
    with open(path) as f:
        data = json.load(f)
    assert data['payload'] == [data['i']] * 300000


def _check_weights(path, cfg):
    """A whole version: loads with its exact size check, and every float is the same."""
    model = load_weights(Darknet(cfg), path)
    values = torch.cat([t.detach().reshape(-1) for _, block in conv_layers(model)
                        for t in darknet_tensors(block)])
    assert torch.all(values == values[0])


def _kill_writers(kind, folder, kills, seed, max_delay):
    """Start a writer child `kills` times, SIGKILL it after a random delay; returns
    ([torn file messages], {temporary files left}, [pids])."""
    rng = random.Random(seed)
    path = os.path.join(folder, 'out.json' if 'json' in kind else 'model')
    torn, pids = [], []
    for k in range(kills):
        child = subprocess.Popen([sys.executable, '-c', WRITER, ROOT, kind, path, BIG_CFG,
                                  str(10 * k)], stdout=subprocess.PIPE, env=CHILD_ENV)
        pids.append(child.pid)
        assert child.stdout.readline() == b'ready\n'
        time.sleep(rng.uniform(0, max_delay))
        child.kill()
        child.wait()
        child.stdout.close()
        try:
            if 'json' in kind:
                _check_json(path)
            else:
                _check_weights(path + '.weights', BIG_CFG)
                _check_weights(path + '.pt', BIG_CFG)
        except Exception as e:  # noqa: BLE001 - any failure to read back is a torn file
            torn.append(f'kill {k}: {e.__class__.__name__}: {str(e)[:200]}')
    targets = {os.path.basename(path)} if 'json' in kind else {'model.weights', 'model.pt'}
    left = set(os.listdir(folder)) - targets
    return torn, left, pids


@pytest.mark.parametrize('kind, kills, max_delay', [('json', 12, 0.15), ('model', 4, 0.6)])
def test_killed_writer_leaves_the_old_or_the_new_file(tmp_path, kind, kills, max_delay):
    torn, left, pids = _kill_writers(kind, str(tmp_path), kills, seed=1, max_delay=max_delay)
    assert torn == []
    names = ('out.json',) if kind == 'json' else ('model.weights', 'model.pt')
    allowed = {f'.{name}.tmp{pid}' for name in names for pid in pids}
    assert left <= allowed, f'unexpected files: {left - allowed}'


def test_a_naive_writer_killed_the_same_way_leaves_torn_files(tmp_path):
    """The control: the check above does see torn files when writes are not atomic."""
    torn, _, _ = _kill_writers('naive-json', str(tmp_path), 5, seed=2, max_delay=0.15)
    assert torn


def _inside_atomic_output(node, parents):
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.With) and any(
                isinstance(item.context_expr, ast.Call)
                and getattr(item.context_expr.func, 'id', None) == 'atomic_output'
                for item in node.items):
            return True
    return False


# image and label files of a generated data set: its list files are written last
# (atomically), so a cut generation leaves no list file and is run again from scratch
NON_ATOMIC_ALLOWED = {('data/make_shapes.py', 'write_bytes'), ('data/make_shapes.py', 'write_text'),
                      ('data/make_digits.py', 'write_bytes'), ('data/make_digits.py', 'write_text'),
                      ('utils/fileio.py', 'open')}
WRITERS = {'save', 'savefig', 'tofile', 'write_text', 'write_bytes', 'imwrite', 'dump'}


def test_every_file_the_project_writes_goes_through_atomic_output():
    """Checkpoints, weights, cfgs, JSON, CSV and plots: each write call in the project's
    code sits inside `with atomic_output(...)` (or `atomic_write_text`, which uses it)."""
    sources = [p for p in glob.glob(os.path.join(ROOT, '**', '*.py'), recursive=True)
               if not os.path.relpath(p, ROOT).startswith(('tests', 'benchmarks', '.venv'))]
    offenders = []
    for source in sources:
        rel = os.path.relpath(source, ROOT)
        tree = ast.parse(open(source).read())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, 'attr', None) or getattr(node.func, 'id', None)
            if name == 'open':
                mode = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == 'mode'), None)
                writes = isinstance(mode, ast.Constant) and set(str(mode.value)) & set('wax+')
                writes = writes or (mode is not None and not isinstance(mode, ast.Constant))
            else:
                writes = name in WRITERS
            if writes and (rel, name) not in NON_ATOMIC_ALLOWED \
                    and not _inside_atomic_output(node, parents):
                offenders.append(f'{rel}:{node.lineno}: {name}(...)')
    assert offenders == []
    assert len(sources) > 10  # the scan saw the project


# ---------------------------------------------------------------- resume

def _args(data, folder, epochs, batch_size=4, img_size=32):
    """An epoch takes about 60 ms (4 steps at 32x32); batch 1 at 64x64 about 1 s."""
    return ['--cfg', CFG, '--data', data, '--batch-size', str(batch_size), '--img-size',
            str(img_size), '--workers', '0', '--epochs', str(epochs), '--output-dir', folder]


def _start_train(args, folder):
    """train.py in a child process; stdout and stderr go to files in `folder`."""
    os.makedirs(folder, exist_ok=True)
    out = open(os.path.join(folder, 'stdout.txt'), 'w')
    err = open(os.path.join(folder, 'stderr.txt'), 'w')
    child = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *args],
                             cwd=ROOT, stdout=out, stderr=err, env=CHILD_ENV)
    out.close()
    err.close()
    return child


def _rows(folder):
    path = os.path.join(folder, 'results.csv')
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [row['epoch'] for row in csv.DictReader(f)]


def _epoch_of(path):
    return torch.load(path, map_location='cpu', weights_only=True)['epoch']


def _finish_with_resume(data, folder, epochs, **kw):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'),
                             *_args(data, folder, epochs, **kw), '--resume'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=CHILD_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _rows(folder) == [str(e) for e in range(1, epochs + 1)]
    assert _epoch_of(os.path.join(folder, 'last.pt')) == epochs - 1
    best = os.path.join(folder, 'best.pt')
    load_weights(Darknet(CFG), best)
    assert 0 <= _epoch_of(best) < epochs
    return result.stdout


def _leftovers(folder):
    return sorted(set(os.listdir(folder)) - {'last.pt', 'best.pt', 'results.csv',
                                              'bn_gammas.png', 'stdout.txt', 'stderr.txt'})


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_last_pt_and_resume_finishes(shapes16, tmp_path, signum):
    """Stopped during its first epoch, before any checkpoint existed, the run writes
    last.pt at once (epoch -1: nothing done) and exits 130; --resume runs all epochs."""
    folder, epochs = str(tmp_path / 'run'), 2
    slow = _args(shapes16, folder, epochs, batch_size=1, img_size=64)  # 16 steps an epoch
    child = _start_train(slow, folder)
    stdout = os.path.join(folder, 'stdout.txt')
    _wait_for(lambda: 'epochs 1..2' in open(stdout).read(), what='training to start')
    child.send_signal(signum)
    assert child.wait(timeout=120) == 130, open(os.path.join(folder, 'stderr.txt')).read()
    last = os.path.join(folder, 'last.pt')
    load_weights(Darknet(CFG), last)              # loadable right after the signal
    assert _epoch_of(last) == -1 and _rows(folder) == []
    assert 'continue with --resume' in open(stdout).read()
    assert _leftovers(folder) == []
    assert 'epochs 1..2' in _finish_with_resume(shapes16, folder, epochs, batch_size=1,
                                                img_size=64)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGKILL])
def test_training_killed_partway_resumes_to_the_same_epoch_count(shapes16, tmp_path, signum):
    folder, epochs = str(tmp_path / 'run'), 30
    child = _start_train(_args(shapes16, folder, epochs), folder)
    last = os.path.join(folder, 'last.pt')
    _wait_for(lambda: os.path.isfile(last), what='the first last.pt')
    time.sleep(random.Random(signum).uniform(0, 0.3))  # somewhere in epochs 2 to 7
    child.send_signal(signum)
    code = child.wait(timeout=120)
    assert code == (130 if signum == signal.SIGTERM else -signal.SIGKILL)
    done = _epoch_of(last) + 1
    load_weights(Darknet(CFG), last)
    assert 1 <= done < epochs, 'the kill came too late to test a resume'
    assert _rows(folder)[:done] == [str(e) for e in range(1, done + 1)]
    if signum == signal.SIGTERM:
        assert _leftovers(folder) == []
    else:  # at most the killed writer's temporary file
        # the run's .lock stays too, released by the kernel: the next run takes it
        assert all(name.endswith(f'.tmp{child.pid}') or name == '.lock'
                   for name in _leftovers(folder))
    assert f'epochs {done + 1}..{epochs}' in _finish_with_resume(shapes16, folder, epochs)


class Killed(BaseException):
    """Stands in for SIGKILL in-process: nothing in train.py catches it."""



@pytest.mark.parametrize('stop, when', [(Killed, 'before'), (Killed, 'after'),
                                        ('Stop', 'before'), ('Stop', 'after')])
def test_stop_around_the_last_pt_save_resumes_to_the_same_epoch_count(
        shapes16, tmp_path, monkeypatch, one_thread, stop, when):
    """The run is cut right before or right after epoch 2's last.pt is written, by a
    kill (nothing saved afterwards) or by SIGTERM (train.py's Stop: it saves last.pt
    with the epochs it knows are done, so epoch 2 repeats). Either way --resume must end
    with each of the 3 epochs counted once."""
    import train
    from training import engine
    folder = str(tmp_path / 'run')
    real_save = engine.save_checkpoint
    error = engine.Stop if stop == 'Stop' else Killed

    def save_checkpoint(path, model, optimizer, epoch, best_fitness, args):
        if path.endswith('last.pt') and epoch == 1 and not getattr(save_checkpoint, 'cut', 0):
            save_checkpoint.cut = 1
            if when == 'after':
                real_save(path, model, optimizer, epoch, best_fitness, args)
            raise error()
        real_save(path, model, optimizer, epoch, best_fitness, args)

    monkeypatch.setattr(engine, 'save_checkpoint', save_checkpoint)
    with pytest.raises(SystemExit if stop == 'Stop' else Killed):
        train.main(_args(shapes16, folder, 3))
    monkeypatch.undo()
    last = os.path.join(folder, 'last.pt')
    assert _epoch_of(last) == (1 if (stop, when) == (Killed, 'after') else 0)
    train.main(_args(shapes16, folder, 3) + ['--resume'])
    assert _rows(folder) == ['1', '2', '3']
    assert _epoch_of(last) == 2
    load_weights(Darknet(CFG), os.path.join(folder, 'best.pt'))


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_checkpoint_writes_waits_for_them(
        shapes16, tmp_path, monkeypatch, one_thread, signum):
    """SIGTERM or Ctrl-C arriving while epoch 2's files are written is acted on once
    they are complete (an exception raised inside torch.save would break its zip writer
    and end in a traceback): the run stops with 2 epochs done, exit 130."""
    import train
    from training import engine
    folder = str(tmp_path / 'run')
    real_save, sent = engine.save_checkpoint, []

    def save_checkpoint(path, model, optimizer, epoch, best_fitness, args):
        if path.endswith('last.pt') and epoch == 1 and not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)  # handled at the next bytecode, inside the writes
        real_save(path, model, optimizer, epoch, best_fitness, args)

    monkeypatch.setattr(engine, 'save_checkpoint', save_checkpoint)
    with pytest.raises(SystemExit) as stop:
        train.main(_args(shapes16, folder, 3))
    assert sent and stop.value.code == 130
    assert _epoch_of(os.path.join(folder, 'last.pt')) == 1 and _rows(folder) == ['1', '2']
    assert _leftovers(folder) == []
