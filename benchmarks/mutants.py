"""One-line mutants of the core library, each run against the tests that should kill it.

    python benchmarks/mutants.py                       # every mutant, about 4 minutes
    python benchmarks/mutants.py fold-centre-tap shortcut-constant-drops-other
    python benchmarks/mutants.py --list

The repository (tracked and untracked, not ignored, files) is copied to a temporary
folder once; the named tests first run there unchanged (a failing baseline would make
every mutant look killed). Then, for each mutant, its one snippet is replaced in the
copy, its tests run with `python -m pytest -q -x -p no:cacheprovider` under this
interpreter, and the file is put back. A mutant is killed when a test fails;
it SURVIVED when they all pass (a missing test); STALE when its snippet no longer occurs
exactly once in its file (refresh it after changing that code); ERROR when pytest could
not run the tests (collection error, no test selected); TIMEOUT past --timeout seconds.
The exit status is 1 unless every mutant is killed.

Run it before you stop when you change the library: a surviving mutant is a missing test.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

from terminaltables import AsciiTable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Mutant(NamedTuple):
    name: str
    file: str           # relative to the repository root
    original: str       # must occur exactly once in `file`
    replacement: str
    tests: tuple        # pytest arguments: node ids, or a file then '-k', 'expression'


METRICS = 'evaluation/metrics.py'
LAYERS = 'darknet/layers.py'
FOLD_TESTS = ('tests/test_fold_exact.py',)

MUTANTS = [
    # ---- the three that survived the first mutation run (issue 17)
    Mutant('fold-centre-tap', 'pruning/surgery.py',
           'weight = conv.weight.detach().sum((2, 3))  # (out, in)',
           'weight = conv.weight.detach()[:, :, conv.kernel_size[0] // 2, '
           'conv.kernel_size[1] // 2]  # (out, in)',
           FOLD_TESTS),
    Mutant('shortcut-constant-drops-other', 'pruning/surgery.py',
           '        return a + b\n', '        return a\n',
           FOLD_TESTS),
    Mutant('sparsity-overwrites-loss-gradient', 'training/sparsity.py',
           'bn.weight.grad.add_(step, alpha=s)', 'bn.weight.grad.copy_(s * step)',
           ('tests/test_training_rules.py', '-k', 'sparsity_gradient')),
    # ---- the fourteen it saw caught, each run here against a quick test that kills it
    Mutant('fold-skipped', 'pruning/surgery.py',
           '    fold_constants(pruned, constants)\n', '    pass\n',
           FOLD_TESTS),
    Mutant('fold-beta-not-act-beta', 'pruning/surgery.py',
           'out[~masks[i]] = act(beta[~masks[i]])', 'out[~masks[i]] = beta[~masks[i]]',
           FOLD_TESTS),
    Mutant('shortcut-group-scored-by-one-branch', 'pruning/criteria.py',
           'return stack_unit(values).max(0).values', 'return values[0]',
           ('tests/test_prune.py::test_shortcut_groups_keep_one_width_from_the_union_of_masks',)),
    Mutant('weights-gamma-beta-swapped', 'darknet/weights.py',
           'return [bn.bias, bn.weight, bn.running_mean, bn.running_var, conv.weight]',
           'return [bn.weight, bn.bias, bn.running_mean, bn.running_var, conv.weight]',
           ('tests/test_models_conformance.py',)),
    Mutant('sparsity-sign-flipped', 'training/sparsity.py',
           'bn.weight.grad.add_(step, alpha=s)', 'bn.weight.grad.add_(step, alpha=-s)',
           ('tests/test_prune_graph.py::test_sparsity_gradient_is_s_times_sign',)),
    Mutant('ap-without-envelope', METRICS,
           'mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))', 'mpre = mpre',
           ('tests/test_metrics.py::test_map_agrees_with_pycocotools',)),
    Mutant('anchor-w-h-swapped', LAYERS,
           'pairs = [(anchors[2 * m], anchors[2 * m + 1]) for m in layer[\'mask\']]',
           'pairs = [(anchors[2 * m + 1], anchors[2 * m]) for m in layer[\'mask\']]',
           ('tests/test_models_conformance.py',)),
    Mutant('route-group-id-ignored', LAYERS,
           'parts = [p[:, group_slice(p.shape[1], self.groups, self.group_id)] for p in inputs]',
           'parts = [p[:, group_slice(p.shape[1], self.groups, 0)] for p in inputs]',
           ('tests/test_models_conformance.py',)),
    Mutant('percent-finder-not-minimal', 'pruning/plan.py',
           '    while high - low > 1:\n', '    while high - low > 4:\n',
           ('tests/test_percent_finder.py', '-k', 'smallest')),
    Mutant('safe-limit-counts-the-limit', 'pruning/plan.py',
           'return int((ordered < limit).sum())', 'return int((ordered <= limit).sum())',
           ('tests/test_prune_graph.py::test_sparsity_report_matches_a_brute_force_search',)),
    Mutant('upsample-feeders-pruned', 'pruning/graph.py',
           'kept_whole = info.upsample_feeders | info.sliced_convs | info.unfoldable',
           'kept_whole = info.sliced_convs | info.unfoldable',
           ('tests/test_prune_graph.py', '-k', 'tiny_models or yolov3_sets')),
    Mutant('absolute-refs-renumbered-as-relative', 'pruning/layer_prune.py',
           'layer[key] = [t - new_index[i] if ref < 0 else t',
           'layer[key] = [t - new_index[i] if ref < 0 else t - new_index[i]',
           ('tests/test_layer_prune.py::'
            'test_removes_exactly_the_chosen_blocks_and_reindexes_every_reference',)),
    Mutant('absolute-refs-not-renumbered', 'pruning/layer_prune.py',
           'layer[key] = [t - new_index[i] if ref < 0 else t',
           'layer[key] = [t - new_index[i] if ref < 0 else ref',
           ('tests/test_layer_prune.py::'
            'test_removes_exactly_the_chosen_blocks_and_reindexes_every_reference',)),
    Mutant('weights-written-in-place', 'darknet/weights.py',
           "    with atomic_output(path) as f:\n        np.array([0, 2, 5], dtype='<i4').tofile(f)",
           "    with open(path, 'wb') as f:\n        np.array([0, 2, 5], dtype='<i4').tofile(f)",
           ('tests/test_atomic_and_resume.py::'
            'test_every_file_the_project_writes_goes_through_atomic_output',)),
    Mutant('letterbox-left-aligned', 'data/datasets.py',
           'left, top = (new_w - w) // 2, (new_h - h) // 2', 'left, top = 0, 0',
           ('tests/test_metrics.py', '-k', 'letterboxed')),
    # ---- more: the gaps issue 17 lists, and other one-line slips
    Mutant('fold-into-bias-subtracted', 'pruning/surgery.py',
           '                conv.bias.add_(offset)', '                conv.bias.sub_(offset)',
           FOLD_TESTS),
    Mutant('fold-running-mean-added', 'pruning/surgery.py',
           'block.BatchNorm2d.running_mean.sub_(offset)',
           'block.BatchNorm2d.running_mean.add_(offset)',
           FOLD_TESTS),
    Mutant('shortcut-constant-without-activation', 'pruning/surgery.py',
           'activate=lambda name, values: ACTIVATIONS[name].function(values))',
           'activate=lambda name, values: values)',
           FOLD_TESTS),
    Mutant('batchnorm-decayed', 'training/engine.py',
           'no_decay += [module.weight, module.bias]', 'decay += [module.weight, module.bias]',
           ('tests/test_training_rules.py', '-k', 'weight_decay')),
    Mutant('conv-bias-decayed', 'training/engine.py',
           'no_decay.append(module.bias)', 'decay.append(module.bias)',
           ('tests/test_training_rules.py', '-k', 'weight_decay')),
    Mutant('warm-up-starts-at-zero', 'training/engine.py',
           'min(1.0, (step + 1) / warmup_steps)', 'min(1.0, step / warmup_steps)',
           ('tests/test_training_rules.py', '-k', 'warm_up')),
    Mutant('cosine-without-floor', 'training/engine.py',
           'lr = lr0 * (final_ratio + (1 - final_ratio) * 0.5',
           'lr = lr0 * (0 + (1 - final_ratio) * 0.5',
           ('tests/test_training_rules.py', '-k', 'cosine')),
    Mutant('step-schedule-late', 'training/engine.py',
           'for f in (0.8, 0.9))', 'for f in (0.85, 0.9))',
           ('tests/test_training_rules.py', '-k', 'step_schedule')),
    Mutant('prune-flags-swapped', 'train.py',
           "PRUNE_MODES = {'0': 'normal', '1': 'shortcut', '2': 'tiny',",
           "PRUNE_MODES = {'0': 'shortcut', '1': 'normal', '2': 'tiny',",
           ('tests/test_training_rules.py', '-k', 'prune_flag')),
    Mutant('training-ignores-prune-flag', 'training/engine.py',
           'mode = settings.prune', "mode = 'normal'",
           ('tests/test_training_rules.py', '-k', 'training_penalises')),
    Mutant('boxes-mapped-back-with-width-ratio', METRICS,
           'y[:, [1, 3]] = ((y[:, [1, 3]] - top) / rh).clip(0, h0)',
           'y[:, [1, 3]] = ((y[:, [1, 3]] - top) / rw).clip(0, h0)',
           ('tests/test_metrics.py', '-k', 'letterboxed')),
    Mutant('boxes-mapped-back-without-padding', METRICS,
           'y[:, [0, 2]] = ((y[:, [0, 2]] - left) / rw).clip(0, w0)',
           'y[:, [0, 2]] = (y[:, [0, 2]] / rw).clip(0, w0)',
           ('tests/test_metrics.py', '-k', 'letterboxed')),
    Mutant('onnx-anchors-reversed', 'deploy/onnx_export.py',
           "'anchors': json.dumps([y.anchors.tolist() for y in model.yolo_layers])",
           "'anchors': json.dumps([y.anchors.flip(0).tolist() for y in model.yolo_layers])",
           ('tests/test_export.py', '-k', 'metadata')),
    Mutant('onnx-scale-x-y-dropped', 'deploy/onnx_export.py',
           "'scale_x_y': json.dumps([y.scale_x_y for y in model.yolo_layers])",
           "'scale_x_y': json.dumps([1.0 for y in model.yolo_layers])",
           ('tests/test_export.py', '-k', 'metadata')),
    Mutant('shortcut-activation-before-sum', LAYERS,
           'total = x + other[:, :summed]', 'total = self.activation(x) + other[:, :summed]',
           ('tests/test_models_conformance.py',)),
    Mutant('yolo-scale-x-y-offset-doubled', LAYERS,
           'xy = (torch.sigmoid(raw[..., :2]) * s - (s - 1) / 2 + grid) * stride',
           'xy = (torch.sigmoid(raw[..., :2]) * s - (s - 1) + grid) * stride',
           ('tests/test_models_conformance.py',)),
    Mutant('iou-union-plus-intersection', METRICS,
           'union = area1[:, None] + area2[None, :] - inter',
           'union = area1[:, None] + area2[None, :] + inter',
           ('tests/test_metrics.py::test_box_iou_matches_slow_version',)),
    Mutant('loss-ciou-alpha-sign', 'darknet/loss.py',
           '    return diou - alpha * v', '    return diou + alpha * v',
           ('tests/test_loss.py::test_overlaps_match_slow_per_box_version',)),
    Mutant('atomic-output-never-renames', 'utils/fileio.py',
           '        os.replace(tmp, path)', '        shutil_copy = None',
           ('tests/test_models_conformance.py::test_save_then_load_is_bit_exact',)),
    # ---- channel criteria, costs and recalibration (pruning/criteria.py)
    Mutant('cost-counts-bn-statistics', 'pruning/costs.py',
           "extra = (2 if hasattr(block, 'BatchNorm2d') else 1) if measure == 'params' else 0",
           "extra = (4 if hasattr(block, 'BatchNorm2d') else 1) if measure == 'params' else 0",
           ('tests/test_criteria.py', '-k', 'channel_cost')),
    Mutant('consumer-ignores-next-bn-scale', 'pruning/graph.py',
           'weight = weight / std.view(-1, 1, 1, 1)', 'weight = weight',
           ('tests/test_criteria.py', '-k', 'rescaled_layer_as_before and consumer')),
    Mutant('taylor-squares-each-conv-before-summing', 'pruning/criteria.py',
           'for i in unit]).sum(0)\n                totals[u] += change ** 2',
           'for i in unit]).pow(2).sum(0)\n                totals[u] += change',
           ('tests/test_criteria.py', '-k', 'taylor_is_the_derivative')),
    Mutant('lamp-tail-from-the-wrong-end', 'pruning/criteria.py',
           'tails = squares[order].flip(0).cumsum(0).flip(0)',
           'tails = squares[order].cumsum(0)',
           ('tests/test_criteria.py', '-k', 'lamp_scores_by_hand')),
    Mutant('recalibration-keeps-momentum', 'pruning/calibration.py',
           '        bn.momentum = None\n', '        pass\n',
           ('tests/test_criteria.py', '-k', 'first_bn_holds')),
    Mutant('recalibration-always-keeps-variances', 'pruning/calibration.py',
           '            if not variances:\n', '            if True:\n',
           ('tests/test_criteria.py', '-k', 'first_bn_holds')),
    # ---- partial residuals (the layer-type registry's proof)
    Mutant('partial-residual-adds-nothing', LAYERS,
           'total = torch.cat((x[:, :summed] + other, x[:, summed:]), 1)',
           'total = torch.cat((x[:, :summed], x[:, summed:]), 1)',
           ('tests/test_models_conformance.py', '-k', 'partial_residual')),
    Mutant('partial-residual-graph-sums-the-previous-width', LAYERS,
           'summed = min(len(previous), len(other))\n', 'summed = len(previous)\n',
           ('tests/test_partial_residual.py',)),
]


# ---------------------------------------------------------------- running

def repository_files(root):
    """Tracked and untracked, not ignored, files of the work tree that exist."""
    listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others',
                             '--exclude-standard'], cwd=root, capture_output=True,
                            check=True).stdout.decode().split('\0')
    return sorted({p for p in listed if p and os.path.isfile(os.path.join(root, p))})


def copy_repository(root, target):
    for path in repository_files(root):
        os.makedirs(os.path.join(target, os.path.dirname(path)), exist_ok=True)
        shutil.copy2(os.path.join(root, path), os.path.join(target, path))


def run_tests(folder, tests, timeout):
    """(status, seconds, output tail): 'passed', 'failed', 'error' or 'timeout'."""
    command = [sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider', *tests]
    # no .pyc files: a restored source of the mutant's size and second would reuse them
    env = {**os.environ, 'PYTHONDONTWRITEBYTECODE': '1'}
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True,
                                timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return 'timeout', time.perf_counter() - start, ''
    seconds = time.perf_counter() - start
    status = {0: 'passed', 1: 'failed'}.get(result.returncode, 'error')
    return status, seconds, (result.stdout + result.stderr)[-2000:]


def run_mutant(folder, mutant, timeout):
    """(result, seconds, output tail) of one mutant applied in `folder`, the file
    restored after."""
    path = os.path.join(folder, mutant.file)
    if not os.path.isfile(path):
        return 'STALE', 0.0, f'{mutant.file}: no such file'
    with open(path, encoding='utf-8') as f:
        original = f.read()
    count = original.count(mutant.original)
    if count != 1:
        return 'STALE', 0.0, f'{mutant.file}: the snippet occurs {count} times'
    with open(path, 'w', encoding='utf-8') as f:
        f.write(original.replace(mutant.original, mutant.replacement))
    try:
        status, seconds, tail = run_tests(folder, mutant.tests, timeout)
    finally:
        with open(path, 'w', encoding='utf-8') as f:
            f.write(original)
    result = {'failed': 'killed', 'passed': 'SURVIVED', 'error': 'ERROR',
              'timeout': 'TIMEOUT'}[status]
    return result, seconds, tail


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('names', nargs='*', help='run only these mutants (default: all)')
    parser.add_argument('--list', action='store_true', help='print the mutants and exit')
    parser.add_argument('--timeout', type=float, default=300, help='seconds per mutant')
    parser.add_argument('--no-baseline', action='store_true',
                        help='skip running the tests unchanged first')
    return parser


def select(names):
    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f'unknown mutant(s): {", ".join(unknown)}; see --list')
    return [known[n] for n in names] if names else MUTANTS


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    mutants = select(args.names)
    if args.list:
        for m in mutants:
            print(f'{m.name:40s} {m.file:24s} {" ".join(m.tests)}')
        return 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='mutants-') as folder:
        copy_repository(ROOT, folder)
        if not args.no_baseline:
            for tests in dict.fromkeys(m.tests for m in mutants):
                status, seconds, tail = run_tests(folder, tests, args.timeout)
                if status != 'passed':
                    print(f'baseline: {" ".join(tests)} {status} unchanged; fix the tests '
                          f'first\n{tail}')
                    return 1
            print(f'baseline: the tests pass unchanged ({time.perf_counter() - start:.0f} s)',
                  flush=True)
        rows, bad = [['mutant', 'file', 'result', 'seconds']], 0
        for mutant in mutants:
            result, seconds, tail = run_mutant(folder, mutant, args.timeout)
            rows.append([mutant.name, mutant.file, result, f'{seconds:.1f}'])
            if result != 'killed':
                bad += 1
                print(f'{mutant.name}: {result}\n{tail}', flush=True)
    print(AsciiTable(rows).table)
    print(f'{len(mutants) - bad} of {len(mutants)} killed in {time.perf_counter() - start:.0f} s')
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
