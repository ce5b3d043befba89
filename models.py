"""The Darknet model and its weights, under the names user code imports:

    from models import Darknet, load_weights
    model = load_weights(Darknet('cfg/yolov3-tiny.cfg'), 'yolov3-tiny.weights').eval()

The code lives in the darknet/ package: the model (darknet/model.py), `.weights` and
`.pt` I/O (darknet/weights.py), transfer learning (darknet/transfer.py).
"""
from darknet.model import Darknet
from darknet.transfer import transfer_weights
from darknet.weights import convert_weights, load_weights, save_model_weights, save_weights

__all__ = ['Darknet', 'load_weights', 'save_weights', 'save_model_weights', 'convert_weights',
           'transfer_weights']
