"""Fuzzing the readers users feed files to: mutated cfgs and mutated weights files.

Hypothesis mutates valid files (delete, duplicate or swap lines, change numbers, insert
garbage characters, truncate; for weights: truncate, flip bytes, rewrite the header,
append) and feeds them to `parse_model_cfg` + `Darknet(...)` + one forward pass, and to
`load_weights`. Each case must either succeed or raise `UserInputError` (the one error
`run_cli` turns into a one-line message); anything else is a crash the user would see
as a traceback. Every case runs under a hard time limit (SIGALRM), so a hang fails
instead of stalling CI, and with warnings as errors. CI runs the same cases every time
(`derandomize=True`); FUZZ_EXAMPLES=N runs N new ones per test.
"""
import contextlib
import os
import re
import signal
import warnings

import pytest
import torch
from conftest import TEST_CFGS, randomize_weights
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from darknet.model import Darknet
from darknet.weights import load_weights, save_model_weights, save_weights
from utils.errors import UserInputError

CFGS = [os.path.join(TEST_CFGS, name) for name in
        ('small_detector.cfg', 'features.cfg', 'route_groups2.cfg')]
CASE_SECONDS = 10   # hard limit per case: far above the ~10 ms a case takes
# CI runs the same 150 cases per test; FUZZ_EXAMPLES=5000 searches longer, with new cases
EXAMPLES = int(os.environ.get('FUZZ_EXAMPLES', 150))
FUZZ = settings(max_examples=EXAMPLES, derandomize='FUZZ_EXAMPLES' not in os.environ,
                deadline=2000, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


class Hang(Exception):
    """A case ran past CASE_SECONDS."""


@contextlib.contextmanager
def guarded(seconds=CASE_SECONDS):
    """Fail a case that runs past `seconds` (SIGALRM) or warns: a warning would be a
    second stderr line next to the one-line error."""
    def expire(signum, frame):
        raise Hang(f'no answer within {seconds} s')
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- cfg mutations

# small replacement numbers only: a cfg asking for filters=10**7 is a (legitimate)
# out-of-memory, not what this test looks for
NUMBERS = st.sampled_from(['-9', '-2', '-1', '0', '1', '2', '3', '4', '5', '7', '8', '13',
                           '16', '27', '33', '64', '0.5', '1e3', '-0', '+1', ' ', '', 'nan',
                           'inf', '0x10', '1,2', ',', '2,,3'])
GARBAGE = st.text(alphabet='[]=#;,.-+ \t\x00\xa0é1aZ\\"\'', min_size=1, max_size=4)


@st.composite
def mutation(draw, n_lines):
    kind = draw(st.sampled_from(['delete', 'duplicate', 'swap', 'number', 'garbage',
                                 'truncate']))
    i = draw(st.integers(0, n_lines - 1))
    if kind == 'swap':
        return kind, i, draw(st.integers(0, n_lines - 1))
    if kind == 'number':
        return kind, i, draw(NUMBERS)
    if kind in ('garbage', 'truncate'):
        return kind, i, (draw(st.integers(0, 40)), draw(GARBAGE))
    return kind, i, None


def apply_mutation(lines, change):
    kind, i, arg = change
    lines = list(lines)
    i = min(i, len(lines) - 1)
    if i < 0:
        return lines
    if kind == 'delete':
        del lines[i]
    elif kind == 'duplicate':
        lines.insert(i, lines[i])
    elif kind == 'swap':
        j = min(arg, len(lines) - 1)
        lines[i], lines[j] = lines[j], lines[i]
    elif kind == 'number':
        numbers = list(re.finditer(r'-?\d+(\.\d+)?', lines[i]))
        if numbers:
            m = numbers[0]
            lines[i] = lines[i][:m.start()] + arg + lines[i][m.end():]
    elif kind == 'garbage':
        at, text = arg
        at = min(at, len(lines[i]))
        lines[i] = lines[i][:at] + text + lines[i][at:]
    else:  # truncate the file inside line i
        at = min(arg[0], len(lines[i]))
        lines = lines[:i] + [lines[i][:at]]
    return lines


@st.composite
def mutated_cfg(draw):
    cfg = draw(st.sampled_from(CFGS))
    lines = open(cfg).read().splitlines()
    for _ in range(draw(st.integers(1, 3))):
        if lines:
            lines = apply_mutation(lines, draw(mutation(len(lines))))
    return cfg, '\n'.join(lines) + '\n'


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp('fuzz')


def _edited(cfg, old, new):
    text = open(cfg).read()
    assert old in text
    return cfg, text.replace(old, new, 1)


SMALL, FEATURES = CFGS[0], CFGS[1]
# cases longer fuzzing found (each crashed before its fix), kept as fixed examples
FOUND = [
    _edited(SMALL, '[maxpool]\nsize=2\nstride=2', '[maxpool]\nsize=2\nstride=0'),
    _edited(SMALL, '[upsample]\nstride=2', '[upsample]\nstride=0'),
    _edited(SMALL, 'channels=3', 'channels=0'),
    _edited(SMALL, '[maxpool]\nsize=2\nstride=2', '[maxpool]\nsize=2\nstride=2\npadding=-3'),
    # the conv before the shortcut loses pad=1: its output no longer fits the sum
    _edited(FEATURES, 'size=3\nstride=1\npad=1\nactivation=leaky\n\n[shortcut]',
            'size=3\nstride=1\nactivation=leaky\n\n[shortcut]'),
]


def with_found_examples(test):
    for found in FOUND:
        test = example(case=found)(test)
    return test


@FUZZ
@given(case=mutated_cfg())
@with_found_examples
def test_mutated_cfg_builds_or_is_refused(scratch, case):
    """parse + build + one forward pass at the model's own size: success or UserInputError."""
    _, text = case
    path = str(scratch / 'mutated.cfg')
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)
    with guarded():
        try:
            model = Darknet(path).eval()
            side = model.stride * max(1, -(-64 // model.stride))  # >= 64, fits the stride
            channels = model.hyperparams.get('channels', 3)
            if side <= 512:  # mutated strides can multiply up to huge inputs: build only
                with torch.no_grad():
                    model(torch.zeros(1, channels, side, side))
        except UserInputError as e:
            assert str(e) and '\n' not in str(e)


# ---------------------------------------------------------------- weights mutations

class Files(dict):
    """(cfg, extension) -> bytes; a short repr keeps hypothesis' failure reports readable."""

    def __repr__(self):
        return f'<{len(self)} valid weights files>'


@pytest.fixture(scope='module')
def weights_files(scratch):
    """Valid .weights and .pt files of each cfg, as bytes."""
    files = Files()
    for cfg in CFGS:
        model = randomize_weights(Darknet(cfg), seed=1)
        for ext in ('.weights', '.pt'):
            path = str(scratch / f'valid{ext}')
            (save_weights if ext == '.weights' else save_model_weights)(model, path)
            files[cfg, ext] = open(path, 'rb').read()
    return files


@st.composite
def byte_mutation(draw):
    kind = draw(st.sampled_from(['truncate', 'flip', 'header', 'append', 'splice']))
    if kind == 'truncate':
        return kind, draw(st.floats(0, 1)), None
    if kind == 'flip':
        return kind, draw(st.floats(0, 1)), draw(st.integers(1, 255))
    if kind == 'header':  # one int32 of the 20-byte header: major, minor, revision, seen
        return kind, draw(st.integers(0, 4)), draw(st.sampled_from(
            [-1, 0, 1, 2, 3, 5, 10, 999, 1000, 2 ** 31 - 1, -2 ** 31]))
    if kind == 'append':
        return kind, None, draw(st.binary(min_size=1, max_size=64))
    return kind, draw(st.floats(0, 1)), draw(st.binary(min_size=1, max_size=16))


def apply_byte_mutation(data, change):
    kind, where, arg = change
    at = min(int(where * len(data)), max(len(data) - 1, 0)) if where is not None else 0
    if kind == 'truncate':
        return data[:at]
    if kind == 'flip':
        return data[:at] + bytes([data[at] ^ arg]) + data[at + 1:] if data else data
    if kind == 'header':
        return data[:4 * where] + int(arg).to_bytes(4, 'little', signed=True) + data[4 * where + 4:]
    if kind == 'append':
        return data + arg
    return data[:at] + arg + data[at + len(arg):]  # overwrite a few bytes anywhere


@st.composite
def mutated_weights(draw, ext):
    cfg = draw(st.sampled_from(CFGS))
    changes = draw(st.lists(byte_mutation(), min_size=1, max_size=3))
    return cfg, changes


def _check_load(scratch, weights_files, case, ext):
    cfg, changes = case
    data = weights_files[cfg, ext]
    for change in changes:
        data = apply_byte_mutation(data, change)
    path = str(scratch / f'mutated{ext}')
    with open(path, 'wb') as f:
        f.write(data)
    with guarded():
        try:
            load_weights(Darknet(cfg), path)
        except UserInputError as e:
            assert str(e) and '\n' not in str(e)


@FUZZ
@given(case=mutated_weights('.weights'))
def test_mutated_darknet_weights_load_or_are_refused(scratch, weights_files, case):
    _check_load(scratch, weights_files, case, '.weights')


@FUZZ
@given(case=mutated_weights('.pt'))
def test_mutated_checkpoints_load_or_are_refused(scratch, weights_files, case):
    _check_load(scratch, weights_files, case, '.pt')
