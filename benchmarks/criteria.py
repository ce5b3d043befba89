"""Channel selection on models that were NOT fully sparsified: which criterion to use.

    python benchmarks/criteria.py sweep       # every criterion, pruned + BN-recalibrated
    python benchmarks/criteria.py finetune    # the finalists and the control, fine-tuned
    python benchmarks/criteria.py report      # benchmarks/criteria.md, .png and .json

Models (trained here with train.py when missing from --work-dir; the demo models are
those in weights/), each pruned in its family's main mode:
- yolov3-base, tiny-base: the shipped baseline demo models, never sparsity-trained;
- tiny-short-sparse: tiny-base after 4 epochs of sparsity training (`-sr --s 0.005`);
- tinyfull-sparse: an over-parameterised model, full-width YOLOv3-tiny (8.7M
  parameters, derive_cfg.py of cfg/yolov3-tiny.cfg) trained 30 epochs on the shapes
  set, then 4 sparsity epochs;
- yolov3-sparse, tiny-sparse: the fully sparsified demo models (pruned rows only).

`sweep`: for each model, each target share of parameters removed (--targets) and each
candidate (criterion x cost x per-layer ceiling), the percent --target-params finds,
then mAP@0.5 of the compact model right after the cut and after BatchNorm
recalibration on --calibrate training images, of the running means (the prune
scripts' default) and of the means and variances. `ceilings`: the same for one
criterion at other per-layer ceilings. `finetune`: for the --finalists and each
target, the recalibrated model fine-tuned for --finetune-epochs (the last epoch's mAP),
and the control: the unpruned model fine-tuned the same way. Every result is cached in
--work-dir/criteria.json, so each command can be run in parts (--models) and resumed.
"""
import argparse
import copy
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)
from prune_results import finetune, map50  # noqa: E402

from cli import demo  # noqa: E402
from cli.prune import write_outputs  # noqa: E402
from darknet.model import Darknet  # noqa: E402
from darknet.weights import load_weights  # noqa: E402
from pruning.calibration import calibration_batches  # noqa: E402
from pruning.calibration import recalibrate_bn  # noqa: E402
from pruning.plan import find_percent, rank_channels  # noqa: E402
from pruning.surgery import prune  # noqa: E402
from train import main as train_main  # noqa: E402
from utils.fileio import atomic_write_text  # noqa: E402
from utils.plots import pyplot, save_figure  # noqa: E402
from utils.torch_utils import count_parameters  # noqa: E402

# name -> (cfg, weights or the training that makes them, prune mode)
MODELS = {
    'yolov3-base': (demo.YOLOV3['cfg'], demo.YOLOV3['weights'], 'shortcut'),
    'tiny-base': (demo.TINY['cfg'], demo.TINY['weights'], 'tiny'),
    'tiny-short-sparse': (demo.TINY['cfg'], 'train:tiny-short-sparse', 'tiny'),
    'tinyfull-sparse': ('{work}/yolov3-tiny-full.cfg', 'train:tinyfull-sparse', 'tiny'),
    'yolov3-sparse': (demo.YOLOV3['cfg'], demo.YOLOV3['sparse_weights'], 'shortcut'),
    'tiny-sparse': (demo.TINY['cfg'], demo.TINY['sparse_weights'], 'tiny'),
}
UNDER_SPARSIFIED = ('yolov3-base', 'tiny-base', 'tiny-short-sparse', 'tinyfull-sparse')
# criterion, cost, largest share of a layer cut (1 = no ceiling)
CANDIDATES = [('gamma', None, 0.99), ('uniform', None, 1.0)] + [
    (criterion, cost, 0.9) for criterion in ('gamma-mean', 'gamma-max', 'gamma-l2', 'lamp',
                                             'consumer', 'taylor')
    for cost in (None, 'params')]


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('step', choices=('sweep', 'ceilings', 'finetune', 'report'))
    parser.add_argument('--models', default=','.join(MODELS))
    parser.add_argument('--targets', default='0.6,0.85')
    parser.add_argument('--calibrate', type=int, default=128, help='images for BN recalibration')
    parser.add_argument('--finalists', default='gamma/none/0.99,uniform/none/1,consumer/params/0.9',
                        help='criterion/cost/ceiling of the fine-tuned rows')
    parser.add_argument('--ceiling-criterion', default='consumer/params',
                        help='criterion/cost whose per-layer ceiling `ceilings` sweeps')
    parser.add_argument('--finetune-epochs', type=int, default=6)
    parser.add_argument('--finetune-lr', type=float, default=0.005)
    parser.add_argument('--work-dir', default='runs/bench11')
    parser.add_argument('--output', default='benchmarks/criteria')
    return parser


# ---------------------------------------------------------------- models

def train_runs(work):
    """The trainings behind the models that are not shipped: (folder, argv) in order."""
    full_cfg = os.path.join(work, 'yolov3-tiny-full.cfg')
    return {
        'tiny-short-sparse': [('tiny-short-sparse', [
            '--cfg', demo.TINY['cfg'], '--weights', demo.TINY['weights'], '--epochs', '4',
            '-sr', '--s', '0.005', '--prune', '2'])],
        'tinyfull-sparse': [('tinyfull-base', ['--cfg', full_cfg, '--epochs', '30']),
                            ('tinyfull-sparse', [
                                '--cfg', full_cfg, '--weights',
                                os.path.join(work, 'tinyfull-base', 'last.pt'), '--epochs', '4',
                                '-sr', '--s', '0.005', '--prune', '2'])],
    }


def model_files(name, work):
    cfg, weights, mode = MODELS[name]
    cfg = cfg.format(work=work)
    if not os.path.isfile(cfg):
        from derive_cfg import main as derive_main
        derive_main(['--cfg', 'cfg/yolov3-tiny.cfg', '--classes', '4', '--img-size',
                     str(demo.IMG_SIZE), '--output', cfg])
    if weights.startswith('train:'):
        for folder, argv in train_runs(work)[name]:
            folder = os.path.join(work, folder)
            if not os.path.isfile(os.path.join(folder, 'last.pt')):
                print(f'training {folder}', flush=True)
                train_main(argv + ['--output-dir', folder])
        weights = os.path.join(folder, 'last.pt')
    return cfg, weights, mode


def load(cfg, weights):
    return load_weights(Darknet(cfg), weights).eval()


# ---------------------------------------------------------------- cache

def load_cache(path):
    return json.load(open(path, encoding='utf-8')) if os.path.isfile(path) else {}


def save_cache(path, cache):
    atomic_write_text(path, json.dumps(cache, indent=1) + '\n')


def candidate_key(name, target, criterion, cost, ceiling):
    return f'{name}|{target:g}|{criterion}|{cost or "none"}|{ceiling:g}'


def parse_candidate(text):
    criterion, cost, ceiling = text.split('/')
    return criterion, None if cost == 'none' else cost, float(ceiling)


# ---------------------------------------------------------------- steps

def prune_candidate(model, mode, target, criterion, cost, ceiling, batches):
    """(compact model recalibrated, figures) for one candidate at one target."""
    ranking = rank_channels(model, mode, criterion, cost, demo.IMG_SIZE, batches)
    layer_keep = 1 - ceiling if ceiling < 1 else None
    percent, plan, share = find_percent(model, mode, target, 'params', demo.IMG_SIZE,
                                        layer_keep, ranking=ranking)
    compact = prune(model, plan)[1]
    kept = [int(plan.masks[i].sum()) for unit in plan.units for i in unit]
    widths = [len(plan.masks[i]) for unit in plan.units for i in unit]
    row = {'percent': percent, 'removed': share, 'map_cut': map50(compact),
           'fewest_kept': min(kept), 'smallest_share_kept': min(k / w for k, w in zip(kept, widths))}
    row['map_recal_full'] = map50(recalibrate_bn(copy.deepcopy(compact), batches, variances=True))
    recalibrate_bn(compact, batches)  # the prune scripts' default: running means only
    row['map_calibrated'] = map50(compact)
    return compact, row


def sweep(args, candidates):
    cache_path = os.path.join(args.work_dir, 'criteria.json')
    cache = load_cache(cache_path)
    for name in args.models.split(','):
        cfg, weights, mode = model_files(name, args.work_dir)
        model = load(cfg, weights)
        batches = calibration_batches(demo.DATA, demo.IMG_SIZE, args.calibrate, 16, model.stride)
        if f'{name}|unpruned' not in cache:
            cache[f'{name}|unpruned'] = {'map': map50(model), 'params': count_parameters(model),
                                         'mode': mode}
        for target in (float(t) for t in args.targets.split(',')):
            for criterion, cost, ceiling in candidates:
                key = candidate_key(name, target, criterion, cost, ceiling)
                if key in cache:
                    continue
                started = time.time()
                try:
                    _, row = prune_candidate(model, mode, target, criterion, cost, ceiling,
                                             batches)
                except Exception as e:  # an unreachable target is a row too
                    row = {'error': str(e).splitlines()[0]}
                row['seconds'] = time.time() - started
                cache[key] = row
                save_cache(cache_path, cache)
                print(key, {k: round(v, 4) if isinstance(v, float) else v
                            for k, v in row.items()}, flush=True)


def finetune_rows(args):
    cache_path = os.path.join(args.work_dir, 'criteria.json')
    cache = load_cache(cache_path)
    finalists = [parse_candidate(t) for t in args.finalists.split(',')]
    for name in args.models.split(','):
        if name not in UNDER_SPARSIFIED:
            continue
        cfg, weights, mode = model_files(name, args.work_dir)
        model = load(cfg, weights)
        batches = calibration_batches(demo.DATA, demo.IMG_SIZE, args.calibrate, 16, model.stride)
        folder = os.path.join(args.work_dir, 'finetune', name)
        control = f'{name}|control'
        if control not in cache:
            cache[control] = {'map_finetuned': finetune(cfg, weights, os.path.join(folder, 'control'),
                                                        args)}
            save_cache(cache_path, cache)
            print(control, cache[control], flush=True)
        for target in (float(t) for t in args.targets.split(',')):
            for criterion, cost, ceiling in finalists:
                key = candidate_key(name, target, criterion, cost, ceiling)
                if 'map_finetuned' in cache.get(key, {}) or 'error' in cache.get(key, {}):
                    continue
                compact, row = prune_candidate(model, mode, target, criterion, cost, ceiling,
                                               batches)
                run = os.path.join(folder, key.split('|', 1)[1].replace('|', '-'))
                files = os.path.join(run, 'pruned.cfg'), os.path.join(run, 'pruned.weights')
                write_outputs(compact, *files, run)
                started = time.time()
                row['map_finetuned'] = finetune(*files, os.path.join(run, 'finetune'), args)
                row['finetune_seconds'] = time.time() - started
                cache[key] = {**cache.get(key, {}), **row}
                save_cache(cache_path, cache)
                print(key, row, flush=True)


# ---------------------------------------------------------------- report

def label(criterion, cost, ceiling):
    return (criterion + (f' per {cost}' if cost else '') +
            (f', max {ceiling:g}/layer' if ceiling < 0.99 else ''))


def report(args):
    cache = load_cache(os.path.join(args.work_dir, 'criteria.json'))
    targets = [float(t) for t in args.targets.split(',')]
    lines = []
    for name in MODELS:
        if f'{name}|unpruned' not in cache:
            continue
        base = cache[f'{name}|unpruned']
        control = cache.get(f'{name}|control', {}).get('map_finetuned')
        lines += ['', f'**{name}** ({base["mode"]} mode, {base["params"] / 1e6:.2f}M parameters, '
                  f'mAP@0.5 {base["map"]:.3f}' +
                  (f'; control, the unpruned model fine-tuned {args.finetune_epochs} epochs: '
                   f'{control:.3f}' if control is not None else '') + ')', '',
                  '| criterion | ' + ' | '.join(
                      f'{t:.0%}: as cut | BN means | BN means + variances | fine-tuned | fewest kept'
                      for t in targets) + ' |',
                  '|---|' + '---:|' * (5 * len(targets))]
        keys = sorted({k.split('|', 2)[2] for k in cache if k.startswith(name + '|')
                       and k.count('|') == 4})
        for rest in keys:
            criterion, cost, ceiling = rest.split('|')
            cells = []
            for t in targets:
                row = cache.get(f'{name}|{t:g}|{rest}', {})
                if 'error' in row or not row:
                    cells += ['unreachable' if row else '', '', '', '', '']
                    continue
                fine = row.get('map_finetuned')
                cells += [f'{row["map_cut"]:.3f}', f'{row["map_calibrated"]:.3f}',
                          f'{row["map_recal_full"]:.3f}', '' if fine is None else f'{fine:.3f}',
                          str(row['fewest_kept'])]
            lines.append(f'| {label(criterion, None if cost == "none" else cost, float(ceiling))} | '
                         + ' | '.join(cells) + ' |')
    seconds = sum(r.get('seconds', 0) + r.get('finetune_seconds', 0) for r in cache.values())
    header = [f'`python benchmarks/criteria.py sweep`, `ceilings` and `finetune` (defaults: '
              f'--targets {args.targets} --calibrate {args.calibrate} --finetune-epochs '
              f'{args.finetune_epochs} --finetune-lr {args.finetune_lr:g}), then `report`: '
              f'{seconds / 60:.0f} min of pruning, evaluation and fine-tuning on '
              f'{os.cpu_count()} CPU cores, the trainings of the models and the controls apart. '
              f'mAP@0.5 on the {demo.IMG_SIZE}x{demo.IMG_SIZE} shapes validation set (200 '
              'images). As cut: right after pruning; BN means: running means re-estimated on '
              'the training images (the prune scripts\' default); fine-tuned: the BN-means '
              'model trained --finetune-epochs more, last epoch. Fewest kept: the smallest '
              'width any pruned layer keeps. "max F/layer": --max-layer-prune F.']
    text = '\n'.join(header + lines).strip() + '\n'
    print(text)
    atomic_write_text(args.output + '.md', text)
    atomic_write_text(args.output + '.json', json.dumps(cache, indent=1) + '\n')
    plot(cache, targets, args.output + '.png', args.finalists)


def plot(cache, targets, path, finalists):
    plt = pyplot()
    names = [n for n in UNDER_SPARSIFIED if f'{n}|unpruned' in cache]
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), sharey=True,
                                squeeze=False)
    for axis, name in zip(axes[0], names):
        for text in finalists.split(','):
            criterion, cost, ceiling = parse_candidate(text)
            rows = [cache.get(candidate_key(name, t, criterion, cost, ceiling), {})
                    for t in targets]
            x = [100 * r['removed'] for r in rows if 'map_finetuned' in r]
            axis.plot(x, [r['map_finetuned'] for r in rows if 'map_finetuned' in r], '-o',
                      label=f'{label(criterion, cost, ceiling)}: fine-tuned')
            axis.plot(x, [r['map_calibrated'] for r in rows if 'map_finetuned' in r], ':x',
                      color=axis.lines[-1].get_color(), label='  recalibrated, no fine-tune')
        control = cache.get(f'{name}|control', {}).get('map_finetuned')
        if control is not None:
            axis.axhline(control, color='grey', linestyle='--', label='control (unpruned, fine-tuned)')
        axis.set_title(name)
        axis.set_xlabel('parameters removed (%)')
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel('mAP@0.5 (shapes validation set)')
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    started = time.time()
    torch.manual_seed(0)
    if args.step == 'sweep':
        sweep(args, CANDIDATES)
    elif args.step == 'ceilings':
        criterion, cost = args.ceiling_criterion.split('/')
        sweep(args, [(criterion, None if cost == 'none' else cost, c) for c in (0.75, 0.95, 1.0)])
    elif args.step == 'finetune':
        finetune_rows(args)
    else:
        report(args)
    print(f'{args.step}: {time.time() - started:.0f} s')


if __name__ == '__main__':
    main()
