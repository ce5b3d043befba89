"""pipeline.py end to end on the tiny demo model and 16 training images: the report
agrees with test.py on the final files, a run cut in two stages (mid-training and while
writing the final files) and run again ends with the same final files, and other
commands and bad inputs are refused before training."""
import os
import shutil
import test as test_script

import pytest

from cli import demo
from cli import pipeline as pipeline_cli
from training import stopping
from utils.errors import UserInputError, run_cli


class Killed(BaseException):
    """Stands in for a kill in-process: nothing in the pipeline catches it."""


def _args(data, folder, *more):
    return ['--cfg', demo.TINY['cfg'], '--weights', demo.TINY['weights'], '--data', data,
            '--target-params', '0.6', '--sparsity-epochs', '2', '--finetune-epochs', '2',
            '--batch-size', '8', '--workers', '2', '--no-latency', '--tolerance', '0',
            '--output-dir', folder, *more]


@pytest.fixture(scope='module')
def full_run(demo_shapes, tmp_path_factory):
    """(folder, the stages' results) of one uninterrupted run."""
    folder = str(tmp_path_factory.mktemp('pipeline') / 'run')
    return folder, pipeline_cli.main(_args(demo_shapes, folder))


def _final_row(report):
    """The '5 final' row of report.md's stage table, as its cells."""
    for line in report.splitlines():
        if line.startswith('| 5 final |'):
            return [cell.strip() for cell in line.strip('|').split('|')]
    raise AssertionError('no final row in report.md')


def test_the_report_gives_the_map_test_py_measures_on_the_final_files(full_run, demo_shapes):
    folder, results = full_run
    for name in ('final.cfg', 'final.weights', 'final.onnx', 'report.md', 'report.png'):
        assert os.path.getsize(os.path.join(folder, name)) > 0
    with open(os.path.join(folder, 'report.md'), encoding='utf-8') as f:
        row = _final_row(f.read())
    independent = test_script.main(['--cfg', os.path.join(folder, 'final.cfg'), '--weights',
                                    os.path.join(folder, 'final.weights'), '--data',
                                    demo_shapes, '--img-size', '128', '--batch-size', '8'])
    assert independent.metrics['map50'] > 0.05  # a detector, not noise
    assert abs(float(row[2]) - independent.metrics['map50']) <= 0.005
    # the final model is the pruned one: at least 60% of the parameters gone
    start = results['1-evaluate']['params']
    assert int(row[4].replace(',', '')) <= 0.4 * start


def test_the_sweep_at_the_target_repeats_the_monitors_figure(full_run):
    """Two roads to one number: the monitor measured the kept checkpoint pruned at the
    target during training; the report prunes the saved file again."""
    folder, results = full_run
    sparse = results['2-sparsity']
    assert sparse['epochs'] >= 1 and sparse['weights'].endswith('best_pruned.pt')
    row = next(r for r in results['6-report']['sweep'] if r['target'] == 0.6)
    assert sparse['pruned_map50'] is not None
    assert row['map50'] == pytest.approx(sparse['pruned_map50'], abs=1e-4)
    assert row['removed'] >= 0.6
    shares = [r['target'] for r in results['6-report']['sweep']]
    assert shares == sorted(shares) and len(shares) >= 3


def _cut(monkeypatch, module, name, when):
    """Replace module.name by a version that does its work, then raises Killed when
    `when(*args)` is true (once)."""
    real = getattr(module, name)

    def cut(*args, **kwargs):
        result = real(*args, **kwargs)
        if when(*args) and not cut.fired:
            cut.fired = True
            raise Killed()
        return result
    cut.fired = False
    monkeypatch.setattr(module, name, cut)


def test_a_run_cut_twice_and_run_again_ends_with_the_same_files(full_run, demo_shapes,
                                                                  tmp_path, monkeypatch,
                                                                  capsys):
    """Cut once after the first fine-tuning epoch's last.pt, then in stage 5 after
    final.cfg and final.weights were written: the same command, run again, finishes byte
    for byte as the uninterrupted run did, without repeating the stages that were done."""
    straight, _ = full_run
    folder = str(tmp_path / 'run')
    from cli import pipeline_stages
    _cut(monkeypatch, stopping, 'train_epoch', lambda run, epoch: not run.settings.sr)
    with pytest.raises(Killed):
        pipeline_cli.main(_args(demo_shapes, folder))
    assert stopping.committed_epochs(os.path.join(folder, '4-finetune')) == 1
    monkeypatch.undo()
    _cut(monkeypatch, pipeline_stages, 'write_outputs', lambda *args, **kwargs: True)
    capsys.readouterr()
    with pytest.raises(Killed):
        pipeline_cli.main(_args(demo_shapes, folder))
    out = capsys.readouterr().out
    assert '[3/6] prune at the target: done earlier, skipped' in out
    assert '[4/6] fine-tune (resumed)' in out and 'epochs 2..2' in out
    assert os.path.isfile(os.path.join(folder, 'final.weights'))  # the partial work
    assert not os.path.exists(os.path.join(folder, '5-final', 'done.json'))
    monkeypatch.undo()
    pipeline_cli.main(_args(demo_shapes, folder))
    out = capsys.readouterr().out
    assert '[4/6] fine-tune: done earlier, skipped' in out and '[5/6] final' in out
    for name in ('final.cfg', 'final.weights', 'final.onnx'):
        with open(os.path.join(folder, name), 'rb') as a, \
                open(os.path.join(straight, name), 'rb') as b:
            assert a.read() == b.read(), name


def test_another_command_on_a_run_folder_is_refused(full_run, demo_shapes, capsys):
    folder, _ = full_run
    weights = os.path.join(folder, 'final.weights')
    stamp = os.stat(weights).st_mtime_ns
    with pytest.raises(UserInputError, match='--finetune-epochs 2 -> 3'):
        pipeline_cli.main(_args(demo_shapes, folder)[:-2] + ['--finetune-epochs', '3',
                                                             '--output-dir', folder])
    capsys.readouterr()
    pipeline_cli.main(_args(demo_shapes, folder))  # the same command: nothing to do
    assert 'finished earlier' in capsys.readouterr().out
    assert os.stat(weights).st_mtime_ns == stamp


def test_a_model_that_prunes_well_already_skips_sparsity_training(demo_shapes, tmp_path):
    """With the input pruned at the target within --tolerance of its own mAP, stage 2
    trains nothing and stage 3 prunes the input itself."""
    folder = str(tmp_path / 'run')
    args = _args(demo_shapes, folder, '--tolerance', '0.9', '--finetune-epochs', '1')
    results = pipeline_cli.main(args)
    sparse = results['2-sparsity']
    assert sparse['epochs'] == 0 and sparse['weights'] == demo.TINY['weights']
    assert not os.path.exists(os.path.join(folder, '2-sparsity', 'last.pt'))
    assert results['3-prune']['before']['map50'] == pytest.approx(
        results['1-evaluate']['map50'], abs=1e-6)
    with open(os.path.join(folder, 'report.md'), encoding='utf-8') as f:
        assert 'No sparsity training' in f.read()


def _broken_labels(data, tmp_path):
    """A copy of the shapes set (data/make_shapes.py's layout) whose first training label
    has a class past classes=."""
    root, copy = os.path.dirname(data), str(tmp_path / 'shapes')
    shutil.copytree(root, copy)
    with open(os.path.join(copy, 'labels', 'train', '000000.txt'), 'a', encoding='utf-8') as f:
        f.write('\n9 0.5 0.5 0.1 0.1\n')
    new = os.path.join(copy, 'shapes.data')
    with open(new, encoding='utf-8') as f:
        text = f.read().replace(root, copy)
    with open(new, 'w', encoding='utf-8') as f:
        f.write(text)
    return new


@pytest.mark.parametrize('case', ['target', 'epochs', 'unreachable', 'labels', 'weights'])
def test_bad_input_is_refused_in_one_line_before_training(demo_shapes, tmp_path, monkeypatch,
                                                          capsys, case):
    def no_training(*args, **kwargs):
        raise AssertionError('training started')
    monkeypatch.setattr(stopping, 'setup', no_training)
    folder = str(tmp_path / 'run')
    args = {'target': _args(demo_shapes, folder, '--target-params', '1.5'),
            'epochs': _args(demo_shapes, folder, '--sparsity-epochs', '0'),
            'unreachable': _args(demo_shapes, folder, '--target-params', '0.999'),
            'labels': _args(_broken_labels(demo_shapes, tmp_path), folder),
            'weights': _args(demo_shapes, folder, '--weights', str(tmp_path / 'none.pt'))}[case]
    with pytest.raises(SystemExit) as stop:
        run_cli(pipeline_cli.main, args)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and '\n' not in err and 'Traceback' not in err
    assert not os.path.exists(folder) or not os.listdir(folder)


def test_a_changed_input_file_is_named_by_its_flag():
    old = {'finetune_epochs': 2, 'output_dir': 'a', 'weights': '/w.pt',
           'sha256': {'cfg': '1', 'weights': '2'}}
    new = {**old, 'output_dir': 'b', 'sha256': {'cfg': '1', 'weights': '3'}}
    assert pipeline_cli.differences(old, new) == ['--weights /w.pt: its content changed']
    assert pipeline_cli.differences(old, {**old, 'output_dir': 'c', 'argv': 'x'}) == []
