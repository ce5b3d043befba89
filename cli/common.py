"""Chores every script does the same way, written once.

- `use_demo`: a run without --cfg takes the shipped demo model, data and input size.
- `require_weights`: a run with --cfg needs its --weights.
- `add_model_args`, `add_data_args`, `add_output_dir_arg`: the flags every script shares
  (--cfg, --weights, --img-size, --device; --data, --batch-size, --workers;
  --output-dir), defined once with the script's own help where it differs.
- `choose_img_size`: the one input size of a run: --img-size, else the size a .pt was
  trained at, else the cfg's width; printed with its reason as the run's first line.
- `anchor_size_warning`: a line when a cfg's anchors look sized for another input size.
The check that an output does not land on an input is `utils.fileio.refuse_overwrite`;
the prune scripts' closing measure, write and print is `cli.prune.close_run`.
"""
import argparse
import os
import warnings

import torch

from cli import demo
from darknet.cfg import parse_model_cfg
from darknet.weights import TORCH_LOAD_ERRORS, is_checkpoint_path
from data.datasets import check_img_size
from utils.errors import UserInputError

# the largest anchor of a Darknet cfg is 0.6-0.9 of the input side it was made for
# (yolov3.cfg: 373 px at 416-608; the demo cfgs: 106 px at 128); outside these shares
# of the training side, the anchors look made for another input size
ANCHOR_SHARE = (0.15, 1.5)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserInputError: one line, exit 2, like every other
    refusal (argparse itself prints the whole usage first)."""

    def error(self, message):
        raise UserInputError(f'{self.prog}: {message} (see --help)')


def use_demo(args, model=demo.YOLOV3, weights='weights', data=True):
    """Fill in a zero-argument run (call it when --cfg is absent): the demo `model`'s cfg,
    its `weights` file (a key of the demo dict; None: no weights) and the demo data set
    (generated on first use) unless `data` is False. Flags the user gave are kept. The
    input size follows the rule of every run (choose_img_size): the demo cfgs' width is
    the demo's size."""
    args.cfg = model['cfg']
    if weights:
        args.weights = args.weights or demo.require_demo_weights(model[weights])
    if data:
        args.data = args.data or demo.ensure_demo_data()


def require_weights(args, kind='trained'):
    """--cfg without --weights: refused, naming the `kind` of weights the script wants."""
    if args.weights is None:
        raise UserInputError(f'--weights is required with --cfg: pass the {kind} .weights '
                             'or .pt')


def add_model_args(parser, cfg_help='model definition (.cfg)',
                   weights_help='model weights (.weights or .pt)',
                   img_size_help="input side in pixels (default: the cfg's width)", device=True):
    """--cfg, --weights, --img-size and (unless `device` is False) --device."""
    parser.add_argument('--cfg', help=cfg_help)
    parser.add_argument('--weights', help=weights_help)
    parser.add_argument('--img-size', type=int, help=img_size_help)
    if device:
        parser.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    return parser


def add_data_args(parser, data_help='data set description (.data)', batch_help='images per batch',
                  loader=True):
    """--data and (unless `loader` is False) --batch-size and --workers."""
    parser.add_argument('--data', help=data_help)
    if loader:
        parser.add_argument('--batch-size', type=int, default=16, help=batch_help)
        parser.add_argument('--workers', type=int, default=2, help='data loading processes')
    return parser


def add_output_dir_arg(parser, default, help_text):
    parser.add_argument('--output-dir', default=default, help=help_text)
    return parser


def trained_img_size(weights):
    """The side a train.py checkpoint (.pt) was trained at, or None: a Darknet .weights
    file carries none, nor does a .pt from before train.py stored it (then its --img-size
    flag, when one was given, stands in)."""
    if not weights or not is_checkpoint_path(weights) or not os.path.isfile(weights):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            # mmap: the tensors stay on disk, so reading two keys costs no second load
            checkpoint = torch.load(weights, map_location='cpu', weights_only=True, mmap=True)
    except TORCH_LOAD_ERRORS:
        return None  # the weights loader reports an unreadable file in its own words
    if not isinstance(checkpoint, dict):
        return None
    args = checkpoint.get('args')
    size = checkpoint.get('img_size') or (args.get('img_size') if isinstance(args, dict)
                                           else None)
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def img_size_reason(given, weights, cfg_width, cfg_name):
    """(side, why) by the rule every script follows: --img-size `given`, else the size
    the .pt `weights` was trained at, else the cfg's width (416 when it has none)."""
    if given:
        return given, '--img-size'
    trained = trained_img_size(weights)
    if trained:
        other = (f"; {os.path.basename(cfg_name)}'s width= is {cfg_width}, --img-size "
                 'overrides' if cfg_width and cfg_width != trained else '')
        return trained, f'from {os.path.basename(weights)}, the size it was trained at{other}'
    what = (f'{os.path.basename(weights)} carries no training size' if weights and
            not is_checkpoint_path(weights) else
            f'{os.path.basename(weights)} does not record its training size' if weights else
            'no weights')
    if cfg_width:
        return cfg_width, f'the width= of {os.path.basename(cfg_name)}; {what}'
    return 416, f'{os.path.basename(cfg_name)} sets no width=; {what}'


def choose_img_size(model, given, weights, cfg_name):
    """The run's input side for `model` (see img_size_reason), checked against its
    stride; prints `image size N (why)`."""
    size, why = img_size_reason(given, weights, model.hyperparams.get('width'), cfg_name)
    check_img_size(size, model.stride)
    print(f'image size {size} ({why})')
    return size


def anchor_size_warning(hyperparams, layers, img_size, cfg_name):
    """A one-line warning (or None) when the largest anchor of the cfg's [yolo] layers,
    in input pixels, is outside ANCHOR_SHARE of `img_size`: the anchors were made for
    another input size, and derive_cfg.py --img-size scales them."""
    sides = [a for layer in layers if layer['type'] == 'yolo' for a in layer['anchors']]
    if not sides or not img_size:
        return None
    largest = max(sides)
    low, high = ANCHOR_SHARE
    if low * img_size <= largest <= high * img_size:
        return None
    width = hyperparams.get('width')
    width = f" (its width= is {width})" if width and width != img_size else ''
    return (f'warning: {os.path.basename(cfg_name)}: its largest anchor ({largest:g} px) is '
            f'{largest / img_size:.2f}x the {img_size} px input, outside {low:g}-{high:g}x: '
            f'the anchors look made for another input size{width}; for {img_size} px inputs '
            f'derive a cfg with scaled anchors: python derive_cfg.py --cfg {cfg_name} '
            f'--img-size {img_size} --output NEW.cfg')


def add_exist_ok_arg(parser, what):
    parser.add_argument('--exist-ok', action='store_true',
                        help=f'replace {what} of an earlier run (default: refuse, as train.py '
                             'refuses a folder that holds another run)')
    return parser


def refuse_existing(paths, exist_ok, fix):
    """An earlier run's outputs are never replaced silently: refuse when one of `paths`
    exists, unless --exist-ok; `fix` names the other way out (another name or folder)."""
    taken = [path for path in paths if os.path.lexists(path)]
    if taken and not exist_ok:
        more = f' (and {len(taken) - 1} more)' if len(taken) > 1 else ''
        raise UserInputError(f'{taken[0]}{more}: exists, from an earlier run; replace it with '
                             f'--exist-ok or {fix}')


def training_img_size(args, quiet=False):
    """train.py's input side by the rule of every script (--img-size, else the size the
    .pt it starts from was trained at (last.pt on --resume), else the cfg's width): set
    into args.img_size and printed with its reason and, when the cfg's anchors look made
    for another size, a warning (`quiet`: neither, for the other torchrun processes)."""
    hyperparams, layers = parse_model_cfg(args.cfg)
    start = os.path.join(args.output_dir, 'last.pt') if args.resume else args.weights
    args.img_size, why = img_size_reason(args.img_size, start, hyperparams.get('width'),
                                         args.cfg)
    warning = anchor_size_warning(hyperparams, layers, args.img_size, args.cfg)
    if not quiet:
        print(f'image size {args.img_size} ({why})')
        if warning:
            print(warning)
    return args.img_size
