"""BatchNorm recalibration: a cut changes what every later layer sees, so the running
statistics measured before it no longer fit; they are re-estimated on a few training
images (adaptive BN: Li et al., EagleEye, ECCV 2020).
"""
import torch


def recalibrate_bn(model, batches, variances=False):
    """Re-estimate every BatchNorm's running mean (and with `variances` its running
    variance) on `batches`, a list of (images, targets); no labels or gradients are used.
    Each statistic becomes the equal-weight average over the batches, as after a
    train-mode pass with momentum None. A cut changes what every later layer sees, so
    statistics measured before it no longer fit (adaptive BN: Li et al., EagleEye, ECCV
    2020). The variances are kept by default: folding already moved each consumer's mean
    by the cut channels' constant output, and renormalising the variance scales the kept
    channels up to fill the variance of the cut ones, which cost mAP on most rows of
    benchmarks/criteria.py. Returns the model in eval mode."""
    device = next(model.parameters()).device
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [(bn.momentum, bn.running_var.clone()) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    try:
        with torch.no_grad():
            for imgs, _ in batches:
                model(imgs.to(device))
    finally:
        for bn, (momentum, var) in zip(bns, saved):
            bn.momentum = momentum
            if not variances:
                bn.running_var.copy_(var)
        model.eval()
    return model
