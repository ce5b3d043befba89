"""pipeline.py: from a trained detector to a deployed pruned one in one command.

    python pipeline.py --cfg C --weights W --data D --target-params 0.6

The run folder (--output-dir) holds one sub-folder per stage:

1. `1-evaluate`: the input's mAP@0.5, at the run's one image size (printed first);
2. `2-sparsity`: sparsity training with the monitor at the target, stopped once the
   pruned mAP is within --tolerance of the unpruned one (training/stopping.py);
   `best_pruned.pt` is kept;
3. `3-prune`: the prune script of the mode at the target, default criterion (auto), BN
   recalibrated (cli.prune.main);
4. `4-finetune`: training of the pruned model, taught by stage 2's with --distill;
5. `5-final`: `final.cfg`, `final.weights` and `final.onnx` (checked by onnxruntime)
   written at the top of the run folder and evaluated from the files;
6. `6-report`: `report.md` and `report.png` at the top (cli/pipeline_report.py).

The stages are cli/pipeline_stages.py. A stage is done when its `done.json` exists: it
holds what the stage measured and is written last, atomically. `args.json` holds the
command's arguments and the sha256 of its input files: the same command run again skips
the stages that are done and goes on from the one that was cut (training resumes from its
last.pt and ends with the weights an uninterrupted run gives); another command on that
folder is refused. Everything a user can get wrong is checked before the first stage.
"""
import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass

from cli import demo
from cli.common import ArgumentParser, add_data_args, add_model_args, choose_img_size
from cli.pipeline_report import write_report
from cli.pipeline_stages import (FINAL_FILES, evaluate_input, finalize, finetune, prune_stage,
                                 sparsity)
from darknet.model import Darknet
from darknet.weights import load_weights
from data.datasets import DataFile, check_classes, check_dataset
from deploy.onnx_export import require_onnx
from pruning.graph import MODES
from pruning.selection import choose_plan
from pruning.settings import PruneSettings
from utils.errors import UserInputError
from utils.fileio import atomic_write_text, output_lock, refuse_overwrite, require_output_dir
from utils.torch_utils import select_device

# the demo run (no --cfg): the tiny demo model at this target, with these epoch counts
DEMO_TARGET = ('params', 0.6)
DEMO_EPOCHS = {'sparsity_epochs': 3, 'finetune_epochs': 2}
DEFAULT_EPOCHS = {'sparsity_epochs': 20, 'finetune_epochs': 10}
# what does not change the final files, left out of the comparison on a rerun
NOT_COMPARED = ('argv', 'output_dir', 'latency')


def get_args_parser():
    parser = ArgumentParser(description=__doc__.split('\n\n')[0].split(': ', 1)[1])
    add_model_args(parser, 'model definition (.cfg); default: the tiny demo model',
                   'trained weights (.weights or .pt)',
                   "input side in pixels, the same in every stage (default: the size a .pt "
                   "was trained at, else the cfg's width)")
    add_data_args(parser, 'data set description (.data) with train= and valid= lists; '
                  'default: the demo set', 'images per batch (training and evaluation)')
    target = parser.add_mutually_exclusive_group()
    target.add_argument('--target-params', type=float, metavar='F',
                        help='remove the share F of the parameters (0.6: 60%%)')
    target.add_argument('--target-gmacs', type=float, metavar='F',
                        help='remove the share F of the multiply-accumulates at --img-size')
    parser.add_argument('--mode', choices=MODES, help='prune mode (default: shortcut when the '
                        'cfg has [shortcut] layers, else tiny)')
    parser.add_argument('--sparsity-epochs', type=int, metavar='N',
                        help='at most N epochs of sparsity training; fewer once the pruned mAP '
                             f'is within --tolerance (default {DEFAULT_EPOCHS["sparsity_epochs"]}'
                             f'; the demo: {DEMO_EPOCHS["sparsity_epochs"]})')
    parser.add_argument('--finetune-epochs', type=int, metavar='M',
                        help='epochs of fine-tuning the pruned model (default '
                             f'{DEFAULT_EPOCHS["finetune_epochs"]}; the demo: '
                             f'{DEMO_EPOCHS["finetune_epochs"]})')
    parser.add_argument('--tolerance', type=float, default=0.01,
                        help='sparsity training stops at the first epoch whose pruned mAP@0.5 '
                             'is at most this far below both its unpruned mAP@0.5 and the '
                             "input's (default 0.01)")
    parser.add_argument('--s', type=float, default=0.005,
                        help='sparsity rate, applied as a proximal L1 step on the gammas '
                             '(docs/training.md) (default 0.005)')
    parser.add_argument('--lr', type=float, default=0.002,
                        help='learning rate of both training stages, cosine schedule (default '
                             '0.002: at 0.01 the demo model lost a quarter of its mAP@0.5 in '
                             'one epoch)')
    parser.add_argument('--distill', action='store_true',
                        help='fine-tune with knowledge distillation from the stage 2 model')
    parser.add_argument('--latency', action=argparse.BooleanOptionalAction,
                        help='time the input and pruned models in stage 3 (default: as the '
                             'prune scripts, on for models up to 5 GMACs)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--output-dir', help='the run folder (default: runs/pipeline/<cfg '
                                             'name>); the same command resumes it')
    return parser


@dataclass
class Context:
    """What every stage reads: the checked arguments, the run folder, the input model
    (on the CPU), the data set, and the choices made from them."""
    args: argparse.Namespace
    folder: str
    model: object
    data: DataFile
    mode: str
    target: tuple     # (kind in 'params', 'gmacs'; share removed)
    img_size: int
    train_images: int

    def path(self, *names):
        return os.path.join(self.folder, *names)


def fill_defaults(args):
    """No --cfg: the tiny demo model and data at DEMO_TARGET and DEMO_EPOCHS (flags the
    user gave are kept). With --cfg: --weights, --data and a target are required."""
    demo_run = args.cfg is None
    if demo_run:
        args.cfg = demo.TINY['cfg']
        args.weights = args.weights or demo.require_demo_weights(demo.TINY['weights'])
        args.data = args.data or demo.ensure_demo_data()
        if args.target_params is None and args.target_gmacs is None:
            args.target_params = DEMO_TARGET[1]
    for name, value in (DEMO_EPOCHS if demo_run else DEFAULT_EPOCHS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.weights is None:
        raise UserInputError('--weights is required with --cfg: pass the trained .weights or .pt')
    if args.data is None:
        raise UserInputError('--data is required with --cfg: pass the .data file to train and '
                             'evaluate on')
    if args.target_params is None and args.target_gmacs is None:
        raise UserInputError('pass the size to reach: --target-params F or --target-gmacs F '
                             '(the share removed, e.g. 0.6)')
    if args.output_dir is None:
        stem = os.path.splitext(os.path.basename(args.cfg))[0]
        args.output_dir = os.path.join('runs', 'pipeline', stem)


def check_flags(args):
    """Values out of range, each refused in one line."""
    kind, value = target_of(args)
    if not 0 < value < 1:
        raise UserInputError(f'--target-{kind} {value:g}: must be in (0, 1), the share removed '
                             '(0.6: 60%)')
    for name in ('sparsity_epochs', 'finetune_epochs', 'batch_size'):
        if getattr(args, name) < 1:
            raise UserInputError(f'--{name.replace("_", "-")} {getattr(args, name)}: use 1 '
                                 'or more')
    if args.workers < 0:
        raise UserInputError(f'--workers {args.workers}: use 0 or more')
    if not 0 <= args.tolerance < 1:
        raise UserInputError(f'--tolerance {args.tolerance:g}: an mAP difference in [0, 1)')
    if args.s < 0 or args.lr <= 0:
        raise UserInputError('--s must be >= 0 and --lr > 0')


def target_of(args):
    return (('params', args.target_params) if args.target_params is not None
            else ('gmacs', args.target_gmacs))


def default_mode(model):
    """shortcut for residual models, tiny for the others."""
    return ('shortcut' if any(layer['type'] == 'shortcut' for layer in model.module_defs)
            else 'tiny')


def check_inputs(args):
    """Load and check the model, the data set and the target; returns the Context (its
    folder not yet locked). Prints the run's image size."""
    select_device(args.device)
    require_onnx()  # stage 5 exports: refused now, not after the training
    for name in FINAL_FILES:
        refuse_overwrite(os.path.join(args.output_dir, name), (args.cfg, args.weights),
                         'choose another --output-dir')
    model = load_weights(Darknet(args.cfg), args.weights).eval()
    mode = args.mode or default_mode(model)
    data = DataFile(args.data)
    check_classes(model, data.options, args.data, args.cfg)
    lists = {key: data.options.get(key) for key in ('train', 'valid')}
    for key, path in lists.items():
        if path is None:
            raise UserInputError(f"{args.data}: no '{key}=' line; the pipeline trains on the "
                                 'train= list and evaluates on the valid= list')
    # every image header and label, now: a bad file must not stop the run mid-training
    train_images = len(check_dataset(lists['train'], data.classes).img_files)
    check_dataset(lists['valid'], data.classes)
    img_size = choose_img_size(model, args.img_size, args.weights, args.cfg)
    target = target_of(args)
    # the monitor's plan (data-free, cheap): an unreachable target is refused now
    choose_plan(model, mode, PruneSettings(target=target).resolve(mode), img_size)
    return Context(args, args.output_dir, model, data, mode, target, img_size, train_images)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def run_record(ctx, argv):
    """What args.json holds: every argument that shapes the result (input paths made
    absolute), the resolved mode and image size, the inputs' sha256, and the command."""
    args = ctx.args
    record = {k: v for k, v in vars(args).items() if k not in ('cfg', 'weights', 'data')}
    record.update({k: os.path.abspath(getattr(args, k)) for k in ('cfg', 'weights', 'data')},
                  mode=ctx.mode, img_size=ctx.img_size,
                  sha256={k: sha256(getattr(args, k)) for k in ('cfg', 'weights', 'data')},
                  argv=argv)
    return record


def differences(old, new):
    """'--flag old -> new' for each compared argument that differs."""
    found = []
    for key in sorted(set(old) | set(new)):
        if key in NOT_COMPARED or old.get(key) == new.get(key):
            continue
        if key == 'sha256':
            found += [f'--{k} {new.get(k)}: its content changed' for k in sorted(new[key])
                      if old[key].get(k) != new[key][k]]
        else:
            found.append(f'--{key.replace("_", "-")} {old.get(key)} -> {new.get(key)}')
    return found


def claim_folder(ctx, record):
    """Write args.json in a new run folder, or check it against an earlier run's: the same
    command resumes, another is refused. Returns True when the earlier run is finished."""
    path = ctx.path('args.json')
    if not os.path.isfile(path):
        other = [n for n in os.listdir(ctx.folder) if not n.startswith('.')]
        if other:
            raise UserInputError(f'{ctx.folder}: holds files that are not a pipeline run '
                                 f'({other[0]}); choose another --output-dir')
        atomic_write_text(path, json.dumps(record, indent=1))
        return False
    with open(path, encoding='utf-8') as f:
        old = json.load(f)
    changed = differences(old, record)
    if changed:
        raise UserInputError(f'--output-dir {ctx.folder}: holds a run of another command '
                             f'({"; ".join(changed[:3])}); rerun that command to resume it, or '
                             'choose another --output-dir')
    return os.path.isfile(ctx.path('6-report', 'done.json'))


STAGES = (('1-evaluate', 'evaluate the input', evaluate_input),
          ('2-sparsity', 'sparsity training', sparsity),
          ('3-prune', 'prune at the target', prune_stage),
          ('4-finetune', 'fine-tune', finetune),
          ('5-final', 'final files and ONNX', finalize),
          ('6-report', 'report', write_report))


def run_stages(ctx):
    """Run each stage whose done.json is missing, in order; print a line as each starts
    and ends (or is skipped). Returns {stage name: its results}."""
    done = {}
    for number, (name, title, function) in enumerate(STAGES, 1):
        marker = ctx.path(name, 'done.json')
        head = f'[{number}/{len(STAGES)}] {title}'
        if os.path.isfile(marker):
            with open(marker, encoding='utf-8') as f:
                done[name] = json.load(f)
            print(f'{head}: done earlier, skipped ({marker})', flush=True)
            continue
        folder = ctx.path(name)
        resumed = os.path.isdir(folder) and bool(os.listdir(folder))
        print(f'{head}{" (resumed)" if resumed else ""} -> {folder}', flush=True)
        os.makedirs(folder, exist_ok=True)
        start = time.perf_counter()
        result = function(ctx, done)
        result.update(seconds=time.perf_counter() - start, resumed=resumed)
        atomic_write_text(marker, json.dumps(result, indent=1))
        done[name] = result
        print(f'{head}: done in {result["seconds"]:.0f} s', flush=True)
    return done


def main(argv=None):
    given = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(given)
    fill_defaults(args)
    check_flags(args)
    require_output_dir(args.output_dir)
    ctx = check_inputs(args)
    start = time.perf_counter()
    with output_lock(ctx.folder):
        finished = claim_folder(ctx, run_record(ctx, shlex.join(['pipeline.py', *given])))
        if finished:
            print(f'{ctx.folder}: this command finished earlier; its report is '
                  f'{ctx.path("report.md")}')
        results = run_stages(ctx)
    print(f'pipeline done in {time.perf_counter() - start:.0f} s: ' + ', '.join(
        ctx.path(name) for name in (*FINAL_FILES, 'report.md')))
    return results
