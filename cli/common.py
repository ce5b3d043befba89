"""Chores every script does the same way, written once.

- `use_demo`: a run without --cfg takes the shipped demo model, data and input size.
- `require_weights`: a run with --cfg needs its --weights.
- `add_model_args`, `add_data_args`, `add_output_dir_arg`: the flags every script shares
  (--cfg, --weights, --img-size, --device; --data, --batch-size, --workers;
  --output-dir), defined once with the script's own help where it differs.
The check that an output does not land on an input is `utils.fileio.refuse_overwrite`;
the prune scripts' closing measure, write and print is `cli.prune.close_run`.
"""
import argparse

from cli import demo
from utils.errors import UserInputError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserInputError: one line, exit 2, like every other
    refusal (argparse itself prints the whole usage first)."""

    def error(self, message):
        raise UserInputError(f'{self.prog}: {message} (see --help)')


def use_demo(args, model=demo.YOLOV3, weights='weights', data=True):
    """Fill in a zero-argument run (call it when --cfg is absent): the demo `model`'s cfg,
    its `weights` file (a key of the demo dict; None: no weights), the demo data set
    (generated on first use) unless `data` is False, and the demo input size. Flags the
    user gave are kept."""
    args.cfg = model['cfg']
    if weights:
        args.weights = args.weights or demo.require_demo_weights(model[weights])
    if data:
        args.data = args.data or demo.ensure_demo_data()
    args.img_size = args.img_size or demo.IMG_SIZE


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
