"""Time loading and saving the full YOLOv3 .weights layout (62M parameters, 248 MB).

    python benchmarks/weights_io.py [--cfg cfg/yolov3.cfg] [--repeat 3]

The file is made from random weights in a temporary folder. Side by side in one run:
a bare np.fromfile of the same file (the disk's floor), our checked loader, and
OpenCV's reader (which checks nothing), so the ratios hold on a noisy machine.
"""
import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from darknet.model import Darknet  # noqa: E402
from darknet.weights import load_darknet_weights, save_weights  # noqa: E402
from utils.torch_utils import median_seconds  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cfg', default='cfg/yolov3.cfg', help='model definition (.cfg)')
    parser.add_argument('--repeat', type=int, default=3)
    args = parser.parse_args(argv)
    import cv2
    model = Darknet(args.cfg)
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'random.weights')
        save = median_seconds(lambda: save_weights(model, path), args.repeat)
        size = os.path.getsize(path)
        rows = [('np.fromfile (floor)', median_seconds(
                    lambda: np.fromfile(path, dtype='<f4', offset=20), args.repeat)),
                ('load_darknet_weights', median_seconds(
                    lambda: load_darknet_weights(model, path), args.repeat)),
                ('Darknet(cfg) + load', median_seconds(
                    lambda: load_darknet_weights(Darknet(args.cfg), path), args.repeat)),
                ('cv2.dnn.readNetFromDarknet', median_seconds(
                    lambda: cv2.dnn.readNetFromDarknet(args.cfg, path), args.repeat)),
                ('save_weights', save)]
    print(f'{args.cfg}: {params / 1e6:.1f}M parameters, {size / 1e6:.0f} MB, '
          f'median of {args.repeat}')
    floor = rows[0][1]
    for name, seconds in rows:
        print(f'  {name:28s} {seconds:6.2f} s  ({seconds / floor:5.1f}x the bare read)')


if __name__ == '__main__':
    main()
