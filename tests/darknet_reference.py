"""A slow, obvious Darknet forward pass in NumPy: the second road for conformance tests.

It reads the .weights file itself (header, then per conv: [beta, gamma, mean, var] or
bias, then weights) and follows Darknet's own formulas (BN divides by sqrt(var) +
1e-6, maxpool pads with -inf, route slices each input before concatenating), sharing
nothing with models.py but the cfg parser.
"""
import numpy as np

from darknet.cfg import parse_model_cfg


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


ACTIVATIONS = {
    'leaky': lambda x: np.where(x > 0, x, 0.1 * x),
    'relu': lambda x: np.maximum(x, 0),
    'logistic': _sigmoid,
    'swish': lambda x: x * _sigmoid(x),
    'mish': lambda x: x * np.tanh(np.log1p(np.exp(x))),
    'linear': lambda x: x,
}


def _read_weights(path):
    with open(path, 'rb') as f:
        major, minor, _ = np.frombuffer(f.read(12), '<i4')
        f.read(8 if major * 10 + minor >= 2 else 4)
        return np.frombuffer(f.read(), '<f4').astype(np.float64)


def _conv(x, w, stride, pad, groups):
    """x (C, H, W), w (F, C/groups, k, k) -> (F, H', W'), zero padding."""
    k = w.shape[-1]
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
    windows = windows[:, ::stride, ::stride]  # (C, H', W', k, k)
    cin, cout = x.shape[0] // groups, w.shape[0] // groups
    out = [np.einsum('chwij,fcij->fhw', windows[g * cin:(g + 1) * cin],
                     w[g * cout:(g + 1) * cout]) for g in range(groups)]
    return np.concatenate(out)


def _maxpool(x, size, stride, padding):
    _, h, w = x.shape
    oh, ow = (h + padding - size) // stride + 1, (w + padding - size) // stride + 1
    lo = padding // 2
    big = np.full((x.shape[0], h + size + padding, w + size + padding), -np.inf)
    big[:, lo:lo + h, lo:lo + w] = x
    out = np.empty((x.shape[0], oh, ow))
    for i in range(oh):
        for j in range(ow):
            out[:, i, j] = big[:, i * stride:i * stride + size,
                               j * stride:j * stride + size].max(axis=(1, 2))
    return out


def darknet_forward(cfg_path, weights_path, image):
    """image (C, H, W) -> (N, 5+C) rows per head in (anchor, row, col) order, pixels."""
    hyper, layers = parse_model_cfg(cfg_path)
    values, pos = _read_weights(weights_path), 0
    x, outputs, channels, heads = image.astype(np.float64), [], hyper.get('channels', 3), []
    for i, layer in enumerate(layers):
        kind = layer['type']
        if kind == 'convolutional':
            f, k, groups = layer['filters'], layer.get('size', 1), layer.get('groups', 1)
            n_w = f * channels // groups * k * k
            if layer.get('batch_normalize', 0):
                beta, gamma, mean, var = values[pos:pos + 4 * f].reshape(4, f)
                pos += 4 * f
            else:
                bias = values[pos:pos + f]
                pos += f
            w = values[pos:pos + n_w].reshape(f, channels // groups, k, k)
            pos += n_w
            pad = k // 2 if layer.get('pad', 0) else layer.get('padding', 0)
            x = _conv(x, w, layer.get('stride', 1), pad, groups)
            if layer.get('batch_normalize', 0):
                x = (x - mean[:, None, None]) / (np.sqrt(var) + 1e-6)[:, None, None]
                x = x * gamma[:, None, None] + beta[:, None, None]
            else:
                x = x + bias[:, None, None]
            x = ACTIVATIONS[layer.get('activation', 'logistic')](x)
        elif kind == 'maxpool':
            stride = layer.get('stride', 1)
            size = layer.get('size', stride)
            x = _maxpool(x, size, stride, layer.get('padding', size - 1))
        elif kind == 'upsample':
            s = layer.get('stride', 2)
            x = x.repeat(s, axis=1).repeat(s, axis=2)
        elif kind == 'route':
            g, gid = layer.get('groups', 1), layer.get('group_id', 0)
            parts = [outputs[r if r >= 0 else i + r] for r in layer['layers']]
            x = np.concatenate([p[gid * p.shape[0] // g:(gid + 1) * p.shape[0] // g]
                                for p in parts])
        elif kind == 'shortcut':
            r = layer['from'][0]
            added = outputs[r if r >= 0 else i + r]
            x = x.copy()
            # as Darknet's shortcut_cpu: over the smaller channel count (a partial
            # residual), the previous layer's other channels unchanged
            for k in range(min(x.shape[0], added.shape[0])):
                x[k] += added[k]
            x = ACTIVATIONS[layer.get('activation', 'linear')](x)
        else:
            heads.append(_decode(x, layer, image.shape[1:]))
        outputs.append(x)
        channels = x.shape[0]
    assert pos == len(values), 'weights file longer than the cfg needs'
    return np.concatenate(heads)


def _decode(x, layer, image_hw):
    anchors = np.array(layer['anchors']).reshape(-1, 2)[layer['mask']]
    na, (_, h, w) = len(anchors), x.shape
    p = x.reshape(na, -1, h, w)
    s = layer.get('scale_x_y', 1.0)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
    out = np.empty((na, h, w, p.shape[1]))
    out[..., 0] = (_sigmoid(p[:, 0]) * s - (s - 1) / 2 + cols) * image_hw[1] / w
    out[..., 1] = (_sigmoid(p[:, 1]) * s - (s - 1) / 2 + rows) * image_hw[0] / h
    out[..., 2] = np.exp(p[:, 2]) * anchors[:, 0, None, None]
    out[..., 3] = np.exp(p[:, 3]) * anchors[:, 1, None, None]
    out[..., 4:] = _sigmoid(p[:, 4:].transpose(0, 2, 3, 1))
    return out.reshape(-1, p.shape[1])
