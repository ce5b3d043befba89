"""Chores every script does the same way, written once.

- `use_demo`: a run without --cfg takes the shipped demo model, data and input size.
- `require_weights`: a run with --cfg needs its --weights.
- `default_img_size`: --img-size, else the cfg's width; refused unless the model takes it.
- `check_classes`: the model's class count must be the .data file's.
The check that an output does not land on an input is `utils.fileio.refuse_overwrite`;
the prune scripts' closing measure, write and print is `utils.prune_cli.finish`.
"""
from utils import demo
from utils.datasets import check_img_size
from utils.errors import UserInputError


def use_demo(args, model=demo.YOLOV3, weights='weights', data=True):
    """Fill in a zero-argument run (call it when --cfg is absent): the demo `model`'s cfg,
    its `weights` file (a key of the demo dict; None: no weights), the demo data set
    (generated on first use) unless `data` is False, and the demo input size. Flags the
    user gave are kept."""
    args.cfg = model['cfg']
    if weights:
        args.weights = args.weights or demo.require_demo_weights(model[weights])
    if data:
        args.data = args.data or demo.ensure_demo_data()
    args.img_size = args.img_size or demo.IMG_SIZE


def require_weights(args, kind='trained'):
    """--cfg without --weights: refused, naming the `kind` of weights the script wants."""
    if args.weights is None:
        raise UserInputError(f'--weights is required with --cfg: pass the {kind} .weights '
                             'or .pt')


def default_img_size(model, img_size=None):
    """--img-size, else the cfg's [net] width, else 416; refused (naming the two nearest
    sizes it takes) unless a multiple of the model's stride."""
    img_size = img_size or model.hyperparams.get('width') or 416
    check_img_size(img_size, model.stride)
    return img_size


def check_classes(model, options, data, name, fix='pass the matching .data'):
    """Refuse a .data file (parsed: `options`, path: `data`) whose classes= is not the
    class count of `model` (read from `name`); `fix` says what to do."""
    if model.num_classes != options['classes']:
        raise UserInputError(f'{data}: classes={options["classes"]} but {name} detects '
                             f'{model.num_classes}; {fix}')
