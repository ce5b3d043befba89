"""Train a Darknet detector, optionally with sparsity training for channel pruning.

    python train.py --cfg cfg/yolov3-shapes.cfg --data data/shapes.data --epochs 30 \
        -sr --s 0.001 --prune shortcut --output-dir runs/sparse

Sparsity training (-sr) adds an L1 penalty on the BatchNorm gammas of the convs a prune
mode will cut (--prune normal, shortcut or tiny; 0, 1, 2 as in the seed project): s * sign(gamma) joins
their gradients once per optimizer step; --penalty group|scaled, --proximal and --s-schedule
change how (training/sparsity.py). The loop itself is training/engine.py. With --target-params F (or --target-gmacs F,
--target-percent P) each epoch also reports the mAP of the model pruned to that target
(the prune script's defaults, BN recalibrated), logs it in results.csv, plots it in
pruned_map.png and keeps the best such checkpoint as best_pruned.pt. Several processes:
`torchrun --nproc_per_node=2 train.py ... --sparsity 0.001` (gloo on CPU, nccl on CUDA;
torchrun refuses the short --s); rank 0 evaluates and saves. Each epoch writes last.pt
(and best.pt, by mAP@0.5) and a row of results.csv; the run ends with a histogram of the
prunable gammas. --resume continues a stopped run; a fresh run into a folder that holds
another run's last.pt/best.pt is refused unless --exist-ok says to replace it.

--weights may come from another cfg (transfer learning): every conv whose shapes fit
--cfg is loaded, the rest (the heads, for another class count) re-initialised, and one
line says which. A Darknet file's layout is inferred (this cfg with another classes=,
or its first layers as `darknet partial` cuts them) or given by --weights-cfg:

    python train.py --cfg cfg/yolov3-hand.cfg --data data/hand.data --weights yolov3.weights

Fine-tuning a pruned model is training from its files, optionally taught by the model
it was pruned from (knowledge distillation, `training/distill.py`):

    python train.py --cfg runs/prune/m-shortcut-0.8.cfg --weights runs/prune/m-shortcut-0.8.weights \
        --epochs 10 --teacher-cfg cfg/yolov3-shapes.cfg --teacher-weights sparse.pt
"""
import argparse
import os

from cli.common import (ArgumentParser, add_data_args, add_model_args, add_output_dir_arg,
                        training_img_size, use_demo)
from cli.demo import ensure_demo_data
from darknet.transfer import shell
from training.engine import TrainSettings, monitor_target, train
from training.sparsity import PENALTIES, S_SCHEDULES, TARGET_FLAGS
from utils.errors import UserInputError, run_cli
from utils.fileio import output_lock, overwritten_input, require_output_dir, resolved_inputs

# --prune: the seed project's numbers, and the prune scripts' modes they stand for
PRUNE_MODES = {'0': 'normal', '1': 'shortcut', '2': 'tiny', 'normal': 'normal',
               'regular': 'normal', 'shortcut': 'shortcut', 'tiny': 'tiny'}


def prune_mode(text):
    """--prune's value as a prune mode: its name, or the seed project's number."""
    if text not in PRUNE_MODES:
        raise argparse.ArgumentTypeError(f'{text!r}: use normal, regular, shortcut or tiny '
                                         '(or 0, 1, 2)')
    return PRUNE_MODES[text]


def add_sparsity_args(parser):
    """-sr and what belongs to it: rate, penalised set, penalty, schedule, monitor."""
    parser.add_argument('-sr', '--sr', action='store_true', help='sparsity training on BN gammas')
    # torchrun's own parser takes a bare --s for an ambiguous prefix of its options
    parser.add_argument('--s', '--sparsity', dest='s', type=float, default=0.001,
                        help='sparsity rate, L1 on gammas (under torchrun write --sparsity)')
    parser.add_argument('--prune', type=prune_mode, default='normal', metavar='MODE',
                        help='gammas penalised: the set the prune script of MODE cuts, normal '
                        '(also regular), shortcut or tiny; 0, 1, 2 are the same')
    parser.add_argument('--penalty', choices=PENALTIES, default='l1',
                        help='with -sr: l1 (s * |gamma|), group (group lasso over the convs of '
                        'a shortcut group, --prune 1) or scaled (|gamma| weighted by the '
                        'consumer criterion\'s reach); see docs/training.md')
    parser.add_argument('--proximal', action='store_true', help='with -sr: apply the penalty '
                        'as soft-thresholding after each optimizer step (exact zeros)')
    parser.add_argument('--s-schedule', choices=S_SCHEDULES, default='constant',
                        help='with -sr: constant; warmup (s ramps up over the first 20%% of '
                        'the epochs); decay (from half the epochs on, 1%% of s on the '
                        'channels a --target-* keeps)')
    target = parser.add_mutually_exclusive_group()
    target.add_argument('--target-params', type=float, metavar='F',
                        help='with -sr: after each epoch, the mAP of the model pruned (the '
                        "prune script's defaults for --prune's mode, BN recalibrated) to "
                        'remove the share F of the parameters (0.6: 60%%); best_pruned.pt '
                        'keeps the best')
    target.add_argument('--target-gmacs', type=float, metavar='F',
                        help='the same, removing the share F of the multiply-accumulates')
    target.add_argument('--target-percent', type=float, metavar='P',
                        help="the same, cutting the share P of the prunable channels (the "
                        "prune scripts' --percent)")
    parser.add_argument('--monitor-every', type=int, default=1, metavar='K',
                        help='measure the --target-* every K epochs (and after the last)')


def get_args_parser():
    parser = ArgumentParser(description=__doc__.split('\n\n')[0])
    add_model_args(parser, 'model definition (.cfg); default: the demo YOLOv3',
                   'initial weights (.weights, .pt or a backbone file)',
                   "training side in pixels (default: cfg's width)")
    add_data_args(parser, 'data set description (.data); default: the demo set',
                  'images per step and process')
    parser.add_argument('--cutoff', type=int, help='load only layers 0..N-1 of --weights, a '
                        'backbone file or a longer one (the N of darknet53.conv.74, '
                        'yolov3-tiny.conv.15)')
    parser.add_argument('--weights-cfg', metavar='CFG', help='the cfg a Darknet --weights file '
                        'was trained with, when its layout cannot be inferred (transfer '
                        'learning loads every conv that fits --cfg)')
    parser.add_argument('--freeze', type=int, default=0, metavar='N',
                        help='keep layers 0..N-1 fixed (weights and BN statistics) for the '
                        'first --freeze-epochs epochs')
    parser.add_argument('--freeze-epochs', type=int, default=1, metavar='E')
    parser.add_argument('--epochs', type=int, default=30)
    parser.add_argument('--accumulate', type=int, default=1, help='batches per optimizer step')
    parser.add_argument('--multi-scale', action='store_true', help='vary the size per batch, 0.5x-1.5x')
    parser.add_argument('--augment', action=argparse.BooleanOptionalAction, default=True,
                        help='random affine, HSV and flip augmentation')
    parser.add_argument('--optimizer', choices=('sgd', 'adam'), default='sgd')
    parser.add_argument('--lr', type=float, default=0.01, help='initial learning rate')
    parser.add_argument('--momentum', type=float, default=0.937)
    parser.add_argument('--weight-decay', type=float, default=5e-4)
    parser.add_argument('--schedule', choices=('cos', 'step'), default='cos')
    parser.add_argument('--warmup-epochs', type=float, default=1.0)
    add_output_dir_arg(parser, 'runs/train', 'folder for checkpoints and logs')
    parser.add_argument('--resume', action='store_true', help='continue from --output-dir/last.pt')
    parser.add_argument('--exist-ok', action='store_true', help='start a fresh run in an '
                        '--output-dir that holds another run, replacing its files')
    add_sparsity_args(parser)
    parser.add_argument('--teacher-cfg', help='knowledge distillation from this model (the '
                        'unpruned one) while fine-tuning a pruned --cfg/--weights')
    parser.add_argument('--teacher-weights', help="the teacher's .weights or .pt")
    parser.add_argument('--distill-weight', type=float, default=1.0,
                        help='gain of the distillation loss (per image, like box/obj/cls)')
    parser.add_argument('--seed', type=int, default=0)
    add_speed_args(parser)
    return parser


def add_speed_args(parser):
    """--amp, --ema, --cache and the loader's worker default."""
    parser.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                        help='mixed precision: bfloat16 autocast where the device has it, '
                        'else float16 with loss scaling; the loss, the sparsity step and '
                        'the weights stay float32 (default: on for CUDA, off on the CPU)')
    parser.add_argument('--ema', action=argparse.BooleanOptionalAction, default=True,
                        help='validate and save an exponential moving average of the '
                        'weights (last.pt also keeps the live ones for --resume)')
    parser.add_argument('--cache', action='store_true', help='keep the decoded, letterboxed '
                        'training images in memory (the estimate is printed first; refused '
                        'when it would not fit)')
    parser.set_defaults(workers=None)  # None: data.datasets.default_workers()


def check_args(args):
    for name in ('epochs', 'batch_size', 'accumulate'):
        if getattr(args, name) < 1:
            raise UserInputError(f'--{name.replace("_", "-")} {getattr(args, name)}: use 1 or more')
    if args.s < 0 or args.lr <= 0:
        raise UserInputError('--s must be >= 0 and --lr > 0')
    if (args.teacher_cfg is None) != (args.teacher_weights is None):
        raise UserInputError('--teacher-cfg and --teacher-weights go together: pass both '
                             '(the unpruned model) or neither')
    if args.distill_weight < 0:
        raise UserInputError(f'--distill-weight {args.distill_weight}: must be >= 0')
    check_sparsity_args(args)
    if args.cfg is None:
        use_demo(args, weights=None, data=False)
    outputs = resolved_inputs(os.path.join(args.output_dir, n) for n in ('last.pt', 'best.pt'))
    if args.weights and overwritten_input(args.weights, outputs):
        raise UserInputError(f'--weights {args.weights} would be overwritten by this run; '
                             'copy it elsewhere or choose another --output-dir')
    check_transfer_args(args)


def check_sparsity_args(args):
    """The penalty, schedule and monitor flags belong to sparsity training (-sr)."""
    target = monitor_target(args)
    target = target and f'--target-{target[0]} {target[1]:g}'
    if not args.sr:
        given = [flag for flag, on in ((target, target), ('--penalty', args.penalty != 'l1'),
                                       ('--proximal', args.proximal),
                                       ('--s-schedule', args.s_schedule != 'constant')) if on]
        if given:
            raise UserInputError(f'{given[0]}: belongs to sparsity training; add -sr (and '
                                 '--s), or drop it')
    for kind in TARGET_FLAGS:
        value = getattr(args, f'target_{kind}')
        if value is not None and not 0 < value < 1:
            raise UserInputError(f'--target-{kind} {value}: must be in (0, 1), a share (0.6: 60%)')
    if args.monitor_every < 1:
        raise UserInputError(f'--monitor-every {args.monitor_every}: use 1 or more')
    if args.s_schedule == 'decay' and target is None:
        raise UserInputError('--s-schedule decay relaxes the penalty on the channels a target '
                             'keeps: pass --target-params, --target-gmacs or --target-percent')


def check_transfer_args(args):
    """--weights-cfg/--cutoff/--freeze make sense together, and a fresh run never
    replaces another run's checkpoints unasked."""
    if (args.weights_cfg or args.cutoff is not None) and not args.weights:
        raise UserInputError('--weights-cfg and --cutoff describe --weights: pass the '
                             'weights file too')
    if args.freeze < 0 or args.freeze_epochs < 0:
        raise UserInputError('--freeze and --freeze-epochs must be >= 0')
    taken = [n for n in ('last.pt', 'best.pt') if os.path.isfile(os.path.join(args.output_dir, n))]
    if taken and not (args.resume or args.exist_ok):
        raise UserInputError(f'{args.output_dir}: holds another run ({", ".join(taken)}); '
                             'continue it with --resume, replace it with --exist-ok, or '
                             'choose another --output-dir')


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    check_args(args)
    training_img_size(args, quiet=os.environ.get('RANK', '0') != '0')
    require_output_dir(args.output_dir)
    if args.data is None:  # the demo set, generated once the cfg is known to build
        shell(args.cfg)
        args.data = ensure_demo_data()
    # one run per folder; under torchrun only rank 0 writes, so only it takes the lock
    with output_lock(args.output_dir, enabled=os.environ.get('RANK', '0') == '0'):
        return train(TrainSettings.from_namespace(args))


if __name__ == '__main__':
    run_cli(main)
