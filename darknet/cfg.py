"""Darknet .cfg and .data files: parse into typed values, check, write back exactly.

`parse_model_cfg(path)` returns `(hyperparams, layers)`: the `[net]` block and one dict
per layer block, each dict holding `type` plus the keys written in the file, typed
(int, float, list of ints or floats, or string). Defaults are not filled in here: the
model builder applies them, so `write_cfg` can reproduce the file's keys exactly and
`parse(write(x)) == x`.

Every key Darknet (pjreddie and AlexeyAB) reads for a supported layer type is known,
including those only its own trainer uses (jitter, ignore_thresh, iou_loss, ...): they
are kept and written back. Keys that would change inference in a way this project does
not implement are refused with the reason, rather than silently ignored.
"""
import difflib
import os
import sys

from darknet.layers import (ACTIVATIONS, FLOAT, FLOATS, INT, INTS, LAYER_TYPES, SECTION_ALIASES,
                            STR, layer_type)
from utils.errors import UserInputError
from utils.fileio import atomic_write_text

# Keys of the [net] block: all only matter to Darknet's own trainer and data loader,
# except width, height and channels, which set the default input.
NET_KEYS = {
    'batch': INT, 'subdivisions': INT, 'width': INT, 'height': INT, 'channels': INT,
    'momentum': FLOAT, 'decay': FLOAT, 'angle': FLOAT, 'saturation': FLOAT,
    'exposure': FLOAT, 'hue': FLOAT, 'learning_rate': FLOAT, 'burn_in': INT,
    'max_batches': INT, 'policy': STR, 'steps': INTS, 'scales': FLOATS, 'step': INT,
    'gamma': FLOAT, 'power': FLOAT, 'mosaic': INT, 'mixup': INT, 'cutmix': INT,
    'letter_box': INT, 'blur': INT, 'flip': INT, 'gaussian_noise': INT,
    'mosaic_bound': INT, 'adam': INT, 'B1': FLOAT, 'B2': FLOAT, 'eps': FLOAT,
    'max_crop': INT, 'min_crop': INT, 'aspect': FLOAT, 'ema_alpha': FLOAT,
    'loss_scale': FLOAT, 'dynamic_minibatch': INT, 'optimized_memory': INT,
    'workspace_size_limit_MB': INT, 'label_smooth_eps': FLOAT, 'track': INT,
    'time_steps': INT, 'augment_speed': INT, 'random': FLOAT, 'seq_scales': FLOATS,
    'burn_in_power': FLOAT, 'sgdr_cycle': INT, 'sgdr_mult': INT, 'rgb': INT,
    'max_chart_loss': FLOAT, 'inputs': INT, 'contrastive': INT,
    'unsupervised': INT, 'equidistant_point': INT, 'adversarial_lr': FLOAT,
    'attention': INT, 'show_receptive_field': INT, 'label_smooth': FLOAT,
}

# Per layer type: the keys accepted, with their types (darknet/layers.py). A type's
# `unsupported` keys are known to Darknet but change the layer's output in ways this
# project does not build; they are accepted only at the value that means "off".
LAYER_KEYS = {name: t.keys for name, t in LAYER_TYPES.items()}
UNSUPPORTED = {(name, key): value for name, t in LAYER_TYPES.items()
               for key, value in t.unsupported.items()}
NET_SECTIONS = ('net', 'network')


def _parse_value(text, kind):
    """Typed value of `text`, or raise ValueError with what was expected."""
    if kind == STR:
        return text
    if kind in (INTS, FLOATS):
        items = [t.strip() for t in text.split(',')]
        if items and items[-1] == '':  # Darknet tolerates a trailing comma
            items.pop()
        if not items:
            raise ValueError('an empty list')
        return [_parse_value(t, INT if kind == INTS else FLOAT) for t in items]
    if kind == INT:
        return int(text)
    return float(text)


def _format_value(value):
    if isinstance(value, list):
        return ','.join(_format_value(v) for v in value)
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith('.0') else text
    return str(value)


def _read_blocks(path):
    """[(section name, header line no, [(key, value text, line no), ...]), ...]."""
    if not os.path.isfile(path):
        raise UserInputError(f'{path}: cfg file not found; check the --cfg path')
    try:
        # utf-8-sig drops the byte-order mark Windows editors put first; universal
        # newlines read LF, CRLF and CR-only files alike
        with open(path, encoding='utf-8-sig') as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f'{path}: cannot read as a text cfg ({e.__class__.__name__}); '
                             'pass a Darknet .cfg file') from None
    blocks = []
    for number, raw in enumerate(lines, 1):
        line = raw.split('#', 1)[0].split(';', 1)[0].strip()
        if not line:
            continue
        if line.startswith('['):
            if not line.endswith(']'):
                raise UserInputError(f'{path} line {number}: section header {line!r} '
                                     'has no closing "]"')
            blocks.append((line[1:-1].strip().lower(), number, []))
        elif '=' in line:
            if not blocks:
                raise UserInputError(f'{path} line {number}: {line!r} comes before '
                                     'any [section]; the file must start with [net]')
            key, value = (part.strip() for part in line.split('=', 1))
            blocks[-1][2].append((key, value, number))
        else:
            raise UserInputError(f'{path} line {number}: {line!r} is not a "[section]" '
                                 'or "key=value" line; fix it or comment it out with #')
    return blocks


def _typed_block(path, section, entries, schema):
    """Dict of typed values for one block; refuses unknown and bad keys, warns on a
    repeated one."""
    typed, seen = {}, {}
    for key, text, number in entries:
        where = f'{path} line {number}'
        if key not in schema:
            close = difflib.get_close_matches(key, schema, n=1)
            hint = f"did you mean '{close[0]}'?" if close else 'remove it'
            raise UserInputError(f"{where}: [{section}] has no key '{key}'; {hint}")
        if key in seen:
            # real cfgs repeat keys (the seed's yolov3-tiny-hand.cfg sets batch twice);
            # OpenCV's Darknet importer keeps the last value (Darknet itself the first)
            print(f"warning: {where}: '{key}' is set again in this [{section}] (first at "
                  f'line {seen[key]}); using this later value, as OpenCV does', file=sys.stderr)
        seen[key] = number
        try:
            value = _parse_value(text, schema[key])
        except ValueError:
            raise UserInputError(f"{where}: {key}={text!r} is not a valid {schema[key]}; "
                                 'fix the value') from None
        off, reason = UNSUPPORTED.get((section, key), (value, None))
        if value != off:
            raise UserInputError(f'{where}: {key}={text} in [{section}]: {reason}; '
                                 f'remove the key{"" if off is None else f" or set {off}"}')
        if key == 'activation' and value not in ACTIVATIONS:
            raise UserInputError(f"{where}: activation '{value}' is not supported; use one "
                                 f'of {", ".join(ACTIVATIONS)}')
        typed[key] = value
    return typed


def parse_model_cfg(path):
    """Read a Darknet model cfg into (hyperparams dict, list of typed layer dicts)."""
    blocks = _read_blocks(path)
    if not blocks:
        raise UserInputError(f'{path}: no sections found; a Darknet cfg starts with [net]')
    name, number, entries = blocks[0]
    if name not in NET_SECTIONS:
        raise UserInputError(f'{path} line {number}: the first section is [{name}]; '
                             'a Darknet cfg starts with [net]')
    hyperparams = _typed_block(path, 'net', entries, NET_KEYS)
    layers, lines = [], []
    for name, number, entries in blocks[1:]:
        kind = SECTION_ALIASES.get(name)
        if kind not in LAYER_KEYS:
            raise UserInputError(f'{path} line {number}: layer type [{name}] is not '
                                 f'supported; supported: {", ".join(LAYER_KEYS)}')
        layers.append({'type': kind, **_typed_block(path, kind, entries, LAYER_KEYS[kind])})
        lines.append(number)
    if not layers:
        raise UserInputError(f'{path}: the cfg has a [net] section but no layers')
    check_layers(layers, lambda i: f'{path} line {lines[i]}')
    return hyperparams, layers


def check_layers(layers, where=None):
    """Refuse what each layer type's `check` refuses (references outside the network,
    heads that do not fit their classes, missing keys). `where(i)` names layer i for
    messages (file and line when parsed from a file)."""
    where = where or (lambda i: f'layer {i}')
    for i, layer in enumerate(layers):
        layer_type(layer).check(layers, i, where)


def write_cfg(path, hyperparams, layers):
    """Write a cfg from typed values (atomically); parse_model_cfg reads it back equal."""
    parts = ['[net]'] + [f'{k}={_format_value(v)}' for k, v in hyperparams.items()]
    for layer in layers:
        parts += ['', f'[{layer["type"]}]']
        parts += [f'{k}={_format_value(v)}' for k, v in layer.items() if k != 'type']
    atomic_write_text(path, '\n'.join(parts) + '\n')


DATA_KEYS = {'classes': INT, 'train': STR, 'valid': STR, 'names': STR, 'backup': STR,
             'eval': STR, 'test': STR, 'results': STR}
DATA_PATH_KEYS = ('train', 'valid', 'names', 'test', 'backup')


def parse_data_cfg(path):
    """Read a .data file: typed `classes`, and paths resolved to existing files.

    A relative path is looked up from the current folder first, then from the .data
    file's own folder; when neither exists, the current-folder reading is kept and the
    reader of that file reports it missing.
    """
    if not os.path.isfile(path):
        raise UserInputError(f'{path}: data file not found; check the --data path')
    entries = []
    with open(path, encoding='utf-8-sig', errors='replace') as f:
        for number, raw in enumerate(f, 1):
            line = raw.split('#', 1)[0].strip()
            if not line:
                continue
            if '=' not in line:
                raise UserInputError(f'{path} line {number}: {line!r} is not a key=value line')
            key, value = (part.strip() for part in line.split('=', 1))
            entries.append((key, value, number))
    options = _typed_block(path, 'data', entries, DATA_KEYS)
    if 'classes' not in options:
        raise UserInputError(f"{path}: no 'classes=' line; add the number of classes")
    if options['classes'] < 1:
        raise UserInputError(f'{path}: classes={options["classes"]} must be at least 1')
    folder = os.path.dirname(os.path.abspath(path))
    for key in DATA_PATH_KEYS:
        if key in options and not os.path.isabs(options[key]):
            local = options[key]
            beside = os.path.join(folder, local)
            options[key] = local if os.path.exists(local) or not os.path.exists(beside) \
                else beside
    return options


def require_data_key(options, key, path):
    """The value of `key` in parsed .data options, or a clear refusal."""
    if key not in options:
        raise UserInputError(f"{path}: no '{key}=' line; add the path of the {key} list")
    return options[key]


def load_class_names(path):
    """Class names, one per line, from a .names file."""
    if not os.path.isfile(path):
        raise UserInputError(f'{path}: names file not found; fix names= in the .data file')
    with open(path, encoding='utf-8-sig', errors='replace') as f:
        return [line.strip() for line in f if line.strip()]
