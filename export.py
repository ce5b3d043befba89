"""Export a Darknet model, pruned or not, to ONNX and check it with onnxruntime.

    python export.py --cfg runs/prune/yolov3-shapes-sparse-shortcut-0.5.cfg \
        --weights runs/prune/yolov3-shapes-sparse-shortcut-0.5.weights --dynamic-batch

Writes <cfg name>.onnx into --output-dir (or --output), never over an input, nor over an
earlier export unless --exist-ok. The
graph takes 'images' (B, C, S, S) float32 in [0, 1], S = --img-size (else the size the
.pt was trained at, else the cfg's width), B = 1 unless
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
The graph holds the inference-ready model: each BatchNorm folded into its conv.
--half writes the weights and activations in fp16 (inputs and outputs stay float32),
for GPU runtimes (TensorRT, onnxruntime's CUDA provider); it is checked against the fp32
model within 1e-2 of the output scale.

--int8 also writes <name>-int8.onnx: static quantisation with onnxruntime.quantization,
QDQ format, int8 per-channel conv weights, uint8 activations whose ranges are the
min/max over --calibrate-images images spread over the train= list of --data
(required); the first conv, the head convs and the decode stay float. It prints the
FP32 and INT8 onnxruntime latency and, when the .data has valid=, the mAP@0.5 of both.
Needs the optional packages onnx and onnxruntime: pip install -r requirements-onnx.txt
"""
import argparse
import os
import time

import numpy as np
import torch

from cli.common import (ArgumentParser, add_data_args, add_exist_ok_arg, add_model_args,
                        add_output_dir_arg, choose_img_size, refuse_existing, require_weights,
                        use_demo)
from darknet.cfg import parse_data_cfg, require_data_key
from darknet.model import Darknet
from darknet.weights import load_weights
from data.datasets import LoadImagesAndLabels, check_classes, create_dataloader
from deploy import onnx_export
from utils.errors import UserInputError, run_cli
from utils.fileio import refuse_overwrite, require_output_dir, require_output_file


def get_args_parser():
    parser = ArgumentParser(description=__doc__.split('\n\n')[0],
                            epilog=__doc__.split('\n\n', 2)[2],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, 'model definition (.cfg), pruned or not',
                   img_size_help='input side in pixels, fixed in the graph (default: the size '
                   "a .pt was trained at, else the cfg's width)", device=False)
    parser.add_argument('--dynamic-batch', action='store_true',
                        help='leave the batch dimension free (default: batch 1)')
    parser.add_argument('--opset', type=int, default=onnx_export.DEFAULT_OPSET,
                        help=f'ONNX opset, {onnx_export.MIN_OPSET} to {onnx_export.MAX_OPSET} '
                             f'(default {onnx_export.DEFAULT_OPSET})')
    parser.add_argument('--raw-heads', action='store_true',
                        help="output each head's raw (B, A, H, W, 5+C) logits instead of the "
                             'decoded (B, N, 5+C) detections; layout below')
    parser.add_argument('--output', help='the ONNX file to write (.onnx); default: '
                                         '<cfg name>.onnx in --output-dir')
    add_output_dir_arg(parser, 'runs/export', 'folder for the ONNX file')
    add_exist_ok_arg(parser, 'the ONNX file(s)')
    parser.add_argument('--half', action='store_true',
                        help='fp16 weights and activations (fp32 inputs and outputs), for GPU '
                             'runtimes; checked against the fp32 model within 1e-2 of the '
                             'output scale')
    parser.add_argument('--int8', action='store_true',
                        help='also write <name>-int8.onnx, statically quantised (QDQ, int8 '
                             'per-channel weights), calibrated on --data train= images')
    parser.add_argument('--calibrate-images', type=int, default=64, metavar='N',
                        help='--int8: images of the train= list to calibrate on (default 64)')
    add_data_args(parser, '--int8: data set description (.data); its train= images '
                  'calibrate, its valid= images give the mAP', loader=False)
    return parser


def output_path(args):
    """The .onnx path to write (default: named after the cfg, which a prune run names
    after its model, mode and percent); refuses one that is an input, not named .onnx,
    or (without --exist-ok) an earlier export."""
    if args.output:
        path = args.output
    else:
        stem = os.path.splitext(os.path.basename(args.cfg))[0]
        path = os.path.join(args.output_dir, stem + ('-raw' if args.raw_heads else '') + '.onnx')
    refuse_overwrite(path, (args.cfg, args.weights), 'choose another --output or --output-dir')
    if not path.endswith('.onnx'):
        raise UserInputError(f'--output {path}: name the ONNX file with a .onnx extension')
    written = [path] + ([path[:-len('.onnx')] + '-int8.onnx'] if args.int8 else [])
    refuse_existing(written, args.exist_ok, 'choose another --output or --output-dir')
    return path


def int8_inputs(args, model, img_size):
    """(calibration images, the .data options) for --int8, read before anything is
    written; refuses a run without calibration data."""
    if args.data is None:
        raise UserInputError('--int8 needs calibration images: pass --data with a train= list '
                             '(a few dozen images of the deployment domain)')
    if args.raw_heads:
        raise UserInputError('--int8 quantises the decoded-detections export; drop --raw-heads')
    if args.half:
        raise UserInputError('--int8 quantises the fp32 export; drop --half')
    if args.calibrate_images < 1:
        raise UserInputError(f'--calibrate-images {args.calibrate_images}: use 1 or more')
    options = parse_data_cfg(args.data)
    check_classes(model, options, args.data, args.cfg)
    dataset = LoadImagesAndLabels(require_data_key(options, 'train', args.data), img_size,
                                  stride=model.stride, num_classes=options['classes'])
    count = min(args.calibrate_images, len(dataset))
    # spread over the list: its order often follows the source (a camera, a day)
    picks = np.linspace(0, len(dataset) - 1, count).round().astype(int)
    return [dataset[int(k)][0][None].numpy() for k in picks], options


def export_int8(path, args, img_size, images, options):
    """Write the INT8 file beside `path`; print FP32 vs INT8 latency, and mAP@0.5 of
    both on the valid= list when the .data has one."""
    int8_path = path[:-len('.onnx')] + '-int8.onnx'
    start = time.perf_counter()
    onnx_export.quantize_int8(path, int8_path, images)
    print(f'wrote {int8_path} ({os.path.getsize(int8_path) / 1e6:.2f} MB), calibrated on '
          f'{len(images)} images of {args.data} train= in {time.perf_counter() - start:.1f} s')
    result = {'int8_path': int8_path}
    # interleaved rounds, so a slower moment of the machine hits both files alike
    rounds = [[onnx_export.onnx_latency(p, img_size, runs=5) for p in (path, int8_path)]
              for _ in range(3)]
    fp32, int8 = (float(np.median(column)) for column in zip(*rounds))
    print(f'onnxruntime latency, batch 1, {torch.get_num_threads()} threads: FP32 '
          f'{fp32 * 1e3:.2f} ms, INT8 {int8 * 1e3:.2f} ms ({fp32 / int8:.2f}x faster)')
    result.update(fp32_latency=fp32, int8_latency=int8)
    if 'valid' in options:
        from evaluation.evaluate import evaluate
        loader, _ = create_dataloader(options['valid'], img_size, 16, options['classes'])
        maps = [evaluate(onnx_export.OnnxModel(p), loader, options['classes'],
                         progress=False).metrics['map50'] for p in (path, int8_path)]
        print(f'mAP@0.5 on {args.data} valid=: FP32 {maps[0]:.4f}, INT8 {maps[1]:.4f} '
              f'({maps[1] - maps[0]:+.4f})')
        result.update(fp32_map50=maps[0], int8_map50=maps[1])
    return result


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    onnx_export.require_onnx()
    onnx_export.check_opset(args.opset)
    if args.cfg is None:
        use_demo(args, data=False)
    require_weights(args, 'trained or pruned')
    path = output_path(args)
    require_output_file(path) if args.output else require_output_dir(args.output_dir)
    model = load_weights(Darknet(args.cfg), args.weights).eval()
    img_size = choose_img_size(model, args.img_size, args.weights, args.cfg)
    calibration = int8_inputs(args, model, img_size) if args.int8 else None
    start = time.perf_counter()
    try:
        difference = onnx_export.export_onnx(model, path, img_size, args.dynamic_batch,
                                            args.opset, args.raw_heads, half=args.half)
    except onnx_export.OnnxCheckError as e:
        raise SystemExit(f'error: {e}') from None
    batches = 'batch 1 and 2' if args.dynamic_batch else 'batch 1'
    limit = onnx_export.HALF_MAX_DIFFERENCE if args.half else onnx_export.MAX_DIFFERENCE
    outputs = 'raw heads' if args.raw_heads else 'decoded detections'
    print(f'exported {args.cfg} + {args.weights} at {img_size}x{img_size}, opset {args.opset}, '
          f'{outputs}, {"dynamic" if args.dynamic_batch else "fixed"} batch, in '
          f'{time.perf_counter() - start:.1f} s')
    print(f'onnxruntime vs PyTorch ({batches}): largest difference {difference:.2e} of the '
          f'output scale (limit {limit:g}{", fp16 against fp32" if args.half else ""})')
    print(f'wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)')
    result = {'path': path, 'difference': difference, 'img_size': img_size}
    if calibration is not None:
        result.update(export_int8(path, args, img_size, *calibration))
    return result


if __name__ == '__main__':
    run_cli(main)
