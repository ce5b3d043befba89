"""Export a Darknet model, pruned or not, to ONNX and check it with onnxruntime.

    python export.py --cfg runs/prune/yolov3-shapes-sparse-shortcut-0.5.cfg \
        --weights runs/prune/yolov3-shapes-sparse-shortcut-0.5.weights --dynamic-batch

Writes <weights name>.onnx into --output-dir (or --output), never over an input. The
graph takes 'images' (B, C, S, S) float32 in [0, 1], S = --img-size, B = 1 unless
--dynamic-batch, and gives by default 'detections' (B, N, 5+C), our eval-mode output:
x, y, w, h in input pixels, objectness and class scores, heads in cfg order, each in
(anchor, row, col) order. With --raw-heads it gives 'head0', 'head1', ... in cfg order,
(B, A, H, W, 5+C) each (A the head's anchors in mask order, H = W = S / stride): tx, ty,
tw, th, objectness and class logits before sigmoid or exp; the file's metadata holds each
head's stride, anchors and scale_x_y for the decode.

The file is written under a temporary name, checked with onnxruntime against the PyTorch
model on one random input (and at batch 2 with --dynamic-batch), and only then renamed.
The check prints the largest difference as a share of the output scale, max|onnx -
torch| / max|torch| per output part (decoded boxes and scores, or each raw head); above
1e-4 the export fails and leaves no file. With no arguments it exports the demo YOLOv3.
Needs the optional packages onnx and onnxruntime: pip install -r requirements-onnx.txt
"""
import argparse
import os
import time

from models import Darknet, load_weights
from utils import demo, onnx_utils
from utils.datasets import check_img_size
from utils.errors import ArgumentParser, UserInputError, run_cli


def get_args_parser():
    parser = ArgumentParser(description=__doc__.split('\n\n')[0],
                            epilog=__doc__.split('\n\n', 2)[2],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--cfg', help='model definition (.cfg), pruned or not')
    parser.add_argument('--weights', help='model weights (.weights or .pt)')
    parser.add_argument('--img-size', type=int,
                        help="input side in pixels, fixed in the graph (default: the cfg's width)")
    parser.add_argument('--dynamic-batch', action='store_true',
                        help='leave the batch dimension free (default: batch 1)')
    parser.add_argument('--opset', type=int, default=onnx_utils.DEFAULT_OPSET,
                        help=f'ONNX opset, {onnx_utils.MIN_OPSET} to {onnx_utils.MAX_OPSET} '
                             f'(default {onnx_utils.DEFAULT_OPSET})')
    parser.add_argument('--raw-heads', action='store_true',
                        help="output each head's raw (B, A, H, W, 5+C) logits instead of the "
                             'decoded (B, N, 5+C) detections; layout below')
    parser.add_argument('--output', help='the ONNX file to write (.onnx); default: '
                                         '<weights name>.onnx in --output-dir')
    parser.add_argument('--output-dir', default='runs/export', help='folder for the ONNX file')
    return parser


def output_path(args):
    """The .onnx path to write; refuses one that is an input or not named .onnx."""
    if args.output:
        path = args.output
    else:
        stem = os.path.splitext(os.path.basename(args.weights))[0]
        path = os.path.join(args.output_dir, stem + ('-raw' if args.raw_heads else '') + '.onnx')
    inputs = {os.path.realpath(p) for p in (args.cfg, args.weights)}
    if os.path.realpath(path) in inputs:
        raise UserInputError(f'{path}: would overwrite an input file; choose another '
                             '--output or --output-dir')
    if not path.endswith('.onnx'):
        raise UserInputError(f'--output {path}: name the ONNX file with a .onnx extension')
    return path


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    onnx_utils.require_onnx()
    onnx_utils.check_opset(args.opset)
    if args.cfg is None:
        args.cfg = demo.YOLOV3['cfg']
        args.weights = args.weights or demo.require_demo_weights(demo.YOLOV3['weights'])
        args.img_size = args.img_size or demo.IMG_SIZE
    if args.weights is None:
        raise UserInputError('--weights is required with --cfg: pass the trained or pruned '
                             '.weights or .pt')
    path = output_path(args)
    model = load_weights(Darknet(args.cfg), args.weights).eval()
    img_size = args.img_size or model.hyperparams.get('width') or 416
    check_img_size(img_size, model.stride)
    start = time.perf_counter()
    try:
        difference = onnx_utils.export_onnx(model, path, img_size, args.dynamic_batch,
                                            args.opset, args.raw_heads)
    except onnx_utils.OnnxCheckError as e:
        raise SystemExit(f'error: {e}') from None
    batches = 'batch 1 and 2' if args.dynamic_batch else 'batch 1'
    outputs = 'raw heads' if args.raw_heads else 'decoded detections'
    print(f'exported {args.cfg} + {args.weights} at {img_size}x{img_size}, opset {args.opset}, '
          f'{outputs}, {"dynamic" if args.dynamic_batch else "fixed"} batch, in '
          f'{time.perf_counter() - start:.1f} s')
    print(f'onnxruntime vs PyTorch ({batches}): largest difference {difference:.2e} of the '
          f'output scale (limit {onnx_utils.MAX_DIFFERENCE:g})')
    print(f'wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)')
    return {'path': path, 'difference': difference, 'img_size': img_size}


if __name__ == '__main__':
    run_cli(main)
