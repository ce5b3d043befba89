"""The built-in demo: which cfg, weights and data the scripts use when given no arguments.

The demo models are narrow YOLOv3 and YOLOv3-tiny variants made with derive_cfg.py for
the 4-class synthetic shapes set (data/make_shapes.py), trained at 128x128.
"""
import os

from utils.errors import UserInputError

DATA = 'data/shapes.data'
IMG_SIZE = 128
# Sparsity training drives some layers of the demo models to all-zero gammas, which
# caps the safe percent low (about 0.23 for the YOLOv3 demo in shortcut mode); keeping
# one channel of such a layer lets the demo runs prune at any --percent.
LAYER_KEEP = 0.01
YOLOV3 = {'cfg': 'cfg/yolov3-shapes.cfg', 'weights': 'weights/yolov3-shapes.pt',
          'sparse_weights': 'weights/yolov3-shapes-sparse.pt'}
TINY = {'cfg': 'cfg/yolov3-tiny-shapes.cfg', 'weights': 'weights/yolov3-tiny-shapes.pt',
        'sparse_weights': 'weights/yolov3-tiny-shapes-sparse.pt'}


def require_demo_weights(path):
    """`path`, or a clear refusal when the demo model has not been trained yet."""
    if not os.path.isfile(path):
        raise UserInputError(f'{path}: the demo model has not been trained yet; train it '
                             'with the commands in README.md, or pass --cfg and --weights')
    return path


def ensure_demo_data():
    """Generate the shapes set on first use; returns the .data path."""
    from data.make_shapes import ensure_shapes
    return ensure_shapes(DATA)
