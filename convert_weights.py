"""Convert a model's weights between PyTorch .pt and Darknet .weights.

    python convert_weights.py --cfg cfg/yolov3-shapes.cfg --weights weights/yolov3-shapes.pt \
        --output yolov3-shapes.weights

The format follows each file's extension: .pt/.pth is a PyTorch checkpoint
({'model': state_dict}), anything else Darknet .weights (version 0.2.5).
"""

from models import convert_weights
from utils.errors import ArgumentParser, run_cli


def get_args_parser():
    parser = ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cfg', required=True, help='model definition (.cfg)')
    parser.add_argument('--weights', required=True, help='input weights (.pt or .weights)')
    parser.add_argument('--output', required=True, help='output weights (.pt or .weights)')
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    convert_weights(args.cfg, args.weights, args.output)
    print(f'wrote {args.output}')


if __name__ == '__main__':
    run_cli(main)
