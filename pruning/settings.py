"""How a prune run chooses its channels, as data: `PruneSettings`.

The prune scripts build one from their flags, train.py's sparsity monitor and detect.py's
demo build one directly; `resolve(mode)` fills every default that depends on the mode and
the criterion and refuses values out of range, once. The library reads the resolved
settings and never an argparse Namespace.
"""
import dataclasses
from dataclasses import dataclass

from pruning.costs import COSTS
from pruning.criteria import CRITERIA, get_criterion
from utils.errors import UserInputError

AUTO = 'auto'  # --criterion auto: try the criteria, keep the plan that scores best
DEFAULT_CRITERION = AUTO
# what auto falls back to without training images to score on: the best data-free
# criterion of benchmarks/criteria.py on the COCO-pretrained models
FALLBACK_CRITERION = 'lamp'
ALLOCATIONS = ('threshold', 'sensitivity')  # one global threshold, or measured per unit
HELD_OUT_IMAGES = 128  # training images auto scores its candidates on, apart from calibration
DEFAULT_PERCENT = 0.5
CALIBRATION_IMAGES = 128  # BatchNorm recalibration, when training images are at hand
# Kept widths rounded up to multiples of 8 (regular mode: powers of two): measured the
# fastest or near it in PyTorch and ONNX Runtime for every mode (benchmarks/speed.py)
DEFAULT_ROUND_TO = 8
TARGETS = ('params', 'gmacs', 'latency')  # --target-params/-gmacs/-latency: shares removed
# the cost a target ranks channels by unless --cost says otherwise
TARGET_COSTS = {'params': 'params', 'gmacs': 'macs', 'latency': 'latency'}


@dataclass(frozen=True)
class PruneSettings:
    """Channel selection for one prune run. None means "the default" until `resolve`."""
    criterion: str = DEFAULT_CRITERION
    allocate: str = 'threshold'     # or 'sensitivity' (pruning/sensitivity.py)
    cost: str = None                # 'params', 'macs' or 'none' (rank by score alone)
    max_layer_prune: float = None   # cut at most this share of any unit ...
    layer_keep: float = None        # ... or keep at least this share (1 - the same)
    round_to: int = None            # kept widths rounded up to multiples; 1: none
    calibrate: int = None           # training images for BatchNorm recalibration; 0: off
    calibrate_variances: bool = False
    percent: float = None           # the share of prunable channels to cut ...
    allow_capped: bool = False      # ... even when the floors keep some of that share
    target: tuple = None            # ... or (kind in TARGETS, share to remove)

    def resolve(self, mode, has_train=False):
        """A copy with every default filled for `mode`; `has_train`: training images are
        at hand (a .data file with a train= list), so recalibration is on by default."""
        if self.allocate not in ALLOCATIONS:
            raise UserInputError(f'--allocate {self.allocate}: choose one of '
                                 f'{", ".join(ALLOCATIONS)}')
        if self.allocate == 'sensitivity' and not has_train:
            raise UserInputError('--allocate sensitivity measures each layer\'s loss on '
                                 'training images: pass --data with a train= list')
        if self.criterion == AUTO and not has_train:
            # nothing to score candidates on: the data-free criterion
            return dataclasses.replace(self, criterion=FALLBACK_CRITERION).resolve(mode)
        kind = None if self.criterion == AUTO else get_criterion(self.criterion)
        layer_keep = self.layer_keep
        if self.max_layer_prune is not None:
            if not 0 < self.max_layer_prune <= 1:
                raise UserInputError(f'--max-layer-prune {self.max_layer_prune}: must be in '
                                     '(0, 1], the largest share of a layer to cut')
            layer_keep = 1 - self.max_layer_prune if self.max_layer_prune < 1 else None
        elif layer_keep is None and kind and kind.default_max_layer_prune is not None:
            layer_keep = 1 - kind.default_max_layer_prune
        cost = self.cost
        if cost is None and kind:
            cost = ('none' if kind.default_cost is None else
                    TARGET_COSTS[self.target[0]] if self.target else kind.default_cost)
        allowed = COSTS + ('none',) + (() if kind else (None,))  # auto: None tries both
        if cost not in allowed:
            raise UserInputError(f'--cost {cost}: choose one of {", ".join(COSTS)}, none')
        round_to = self.round_to
        if round_to is None and mode != 'regular':
            round_to = DEFAULT_ROUND_TO
        calibrate = self._calibration_images(has_train)
        percent = self.percent
        if self.target is not None:
            if percent is not None:
                raise UserInputError(f'--percent and --target-{self.target[0]}: pass one of '
                                     'them')
            if self.target[0] not in TARGETS:
                raise ValueError(f'unknown target {self.target[0]!r}')
        elif percent is None:
            percent = DEFAULT_PERCENT
        return dataclasses.replace(self, cost=cost, layer_keep=layer_keep, round_to=round_to,
                                   calibrate=calibrate, percent=percent)

    def _calibration_images(self, has_train):
        if self.calibrate is not None and self.calibrate < 0:
            raise UserInputError(f'--calibrate {self.calibrate}: a number of images, 0 for '
                                 'none')
        if self.calibrate and not has_train:
            raise UserInputError(f'--calibrate {self.calibrate}: needs --data with a train= '
                                 'list to take the images from')
        if self.calibrate is None:
            return CALIBRATION_IMAGES if has_train else 0
        return self.calibrate

    def candidates(self, mode, has_train):
        """What resolved `auto` settings try: every registered criterion (those scoring on
        data only with training images), ranked by score alone and per the target's
        measure (or only the --cost given), and the sensitivity allocation; each resolved
        with its own defaults and the floors given."""
        assert self.criterion == AUTO
        measure = TARGET_COSTS[self.target[0]] if self.target else 'params'
        costs = (self.cost,) if self.cost else ('none', measure)
        names = [n for n, kind in CRITERIA.items() if has_train or not kind.needs_data]
        tried = [dataclasses.replace(self, criterion=n, cost=c) for n in names for c in costs]
        if measure != 'latency':  # the allocation's costs are counted, not measured
            tried.append(dataclasses.replace(self, criterion=FALLBACK_CRITERION, cost=measure,
                                             allocate='sensitivity'))
        return [t.resolve(mode, has_train) for t in tried]

    @property
    def ranking_cost(self):
        """The cost channels are ranked per: None, 'params' or 'macs'."""
        return None if self.cost == 'none' else self.cost

    def training_images(self):
        """How many training images the run reads: for recalibration, and for a criterion
        that scores on data."""
        if self.criterion == AUTO:
            return self.calibrate + HELD_OUT_IMAGES
        needs = get_criterion(self.criterion).needs_data or self.allocate == 'sensitivity'
        return self.calibrate or (CALIBRATION_IMAGES if needs else 0)
