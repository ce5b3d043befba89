"""Convert a model's weights between PyTorch .pt and Darknet .weights.

    python convert_weights.py --cfg cfg/yolov3-shapes.cfg --weights weights/yolov3-shapes.pt \
        --output yolov3-shapes.weights

The format follows each file's extension: .pt/.pth is a PyTorch checkpoint
({'model': state_dict}), anything else Darknet .weights (version 0.2.5). --cutoff N writes
a backbone of layers 0..N-1, as `darknet partial` does (yolov3-tiny.conv.15: layers 0..14),
for train.py --weights to start another cfg from:

    python convert_weights.py --cfg cfg/yolov3-tiny.cfg --weights yolov3-tiny.weights \
        --output yolov3-tiny.conv.15 --cutoff 15
"""

from cli.common import ArgumentParser
from darknet.weights import convert_weights
from utils.errors import run_cli
from utils.fileio import require_output_file


def get_args_parser():
    parser = ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cfg', required=True, help='model definition (.cfg)')
    parser.add_argument('--weights', required=True, help='input weights (.pt or .weights)')
    parser.add_argument('--output', required=True, help='output weights (.pt or .weights)')
    parser.add_argument('--cutoff', type=int, metavar='N',
                        help='write only layers 0..N-1 (a Darknet backbone file)')
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    require_output_file(args.output)
    convert_weights(args.cfg, args.weights, args.output, args.cutoff)
    print(f'wrote {args.output}')


if __name__ == '__main__':
    run_cli(main)
