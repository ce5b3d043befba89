"""Derive a cfg for another class count and/or channel width from any Darknet cfg.

    python derive_cfg.py --cfg cfg/yolov3.cfg --classes 3 --width 0.25 --img-size 128 \
        --output cfg/yolov3-w25-c3.cfg

Every [yolo] head gets the new class count and the conv before it is recomputed to
len(mask) * (5 + classes) filters. A width multiplier scales every other conv's
filters, rounded to a multiple of --divisor (8): convs of equal width stay equal, so
shortcut sums and route groups still fit. --img-size sets the [net] input size and
scales the anchors with it (anchors are in input pixels, and objects shrink or grow
with the letterboxed input).
"""
import copy

from cli.common import ArgumentParser
from darknet.cfg import parse_model_cfg, write_cfg
from utils.errors import UserInputError, run_cli
from utils.fileio import refuse_overwrite, require_output_file


def scaled_width(filters, width, divisor=8):
    return max(divisor, int(round(filters * width / divisor)) * divisor)


def derive_cfg(hyperparams, layers, classes=None, width=None, img_size=None, divisor=8):
    """New (hyperparams, layers) with heads for `classes` and widths scaled by `width`."""
    hyperparams, layers = copy.deepcopy(hyperparams), copy.deepcopy(layers)
    head_convs = {i - 1 for i, layer in enumerate(layers) if layer['type'] == 'yolo'}
    for i, layer in enumerate(layers):
        if layer['type'] == 'yolo':
            if classes is not None:
                layer['classes'] = classes
            if layers[i - 1]['type'] != 'convolutional':
                raise UserInputError(f'layer {i} [yolo] does not follow a conv; cannot '
                                     'recompute its head')
            layers[i - 1]['filters'] = len(layer['mask']) * (5 + layer['classes'])
        elif layer['type'] == 'convolutional' and width is not None and i not in head_convs:
            if layer.get('groups', 1) > 1:
                raise UserInputError(f'layer {i} [convolutional] has groups='
                                     f'{layer["groups"]}; grouped convs cannot be rescaled')
            layer['filters'] = scaled_width(layer['filters'], width, divisor)
    if img_size is not None:
        # anchors are in network-input pixels, and letterboxed objects shrink or grow
        # with the input: scale them with it
        scale = img_size / hyperparams['width'] if hyperparams.get('width') else 1.0
        for layer in layers:
            if layer['type'] == 'yolo':
                layer['anchors'] = [round(a * scale, 2) for a in layer['anchors']]
        hyperparams['width'] = hyperparams['height'] = img_size
    return hyperparams, layers


def get_args_parser():
    parser = ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cfg', required=True, help='source model definition (.cfg)')
    parser.add_argument('--output', required=True, help='new model definition (.cfg)')
    parser.add_argument('--classes', type=int, help='number of classes of every head')
    parser.add_argument('--width', type=float, help='channel-width multiplier, e.g. 0.25')
    parser.add_argument('--divisor', type=int, default=8, help='round widths to multiples of this')
    parser.add_argument('--img-size', type=int, help='set [net] width and height, scaling the anchors')
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.classes is not None and args.classes < 1:
        raise UserInputError(f'--classes {args.classes}: must be at least 1')
    if args.width is not None and args.width <= 0:
        raise UserInputError(f'--width {args.width}: must be positive')
    refuse_overwrite(args.output, (args.cfg,), 'choose another name', '--output')
    require_output_file(args.output)
    hyperparams, layers = derive_cfg(*parse_model_cfg(args.cfg), args.classes, args.width,
                                     args.img_size, args.divisor)
    from darknet.model import Darknet  # the derived cfg must build
    model = Darknet((hyperparams, layers))
    write_cfg(args.output, hyperparams, layers)
    params = sum(p.numel() for p in model.parameters())
    print(f'{args.output}: {len(layers)} layers, {model.num_classes} classes, '
          f'{params / 1e6:.2f}M parameters')


if __name__ == '__main__':
    run_cli(main)
