"""S7: four conv blocks with max-pools between them, dilated and depthwise-separable convs, < 1,000,000 parameters.

The defaults' 20 epochs took 58.7 min on one thread of a 2-core CPU, beside another one-thread run
(results/s7: `epoch_seconds` 3,521).
"""
from cifar_fa import Recipe, main
from cifar_fa.assignments import S7
from cifar_fa.augment import A

# blocks C1..C4 (C2a, C2b, ... belong to block C2); /dw = depthwise-separable, /d2 = dilation 2, +P2 adds P2's output.
# full 3x3 convs up to C3 at 8x8, narrow C1 and C2 at 32x32 and 16x16: half the multiply-adds of a layout with
# depthwise-separable C3 and 128 channels at 32x32, for 0.3-0.6 points (JPEG copy, results/TRIALS.md: s7_design_a),
# so that an S7 run fits in an hour on a 2-core CPU
SPEC = 'C1a:32 C1b:64 P1 C2a:64 C2b:192 P2 C3a:192 C3b:192/d2+P2 P3 C4a:192/dw C4b:192/dw+P3 GAP O'

AUGS = [
    A.PadIfNeeded(40, 40, border_mode=4),  # reflect-pad 4 px, then a random 32x32 crop
    A.RandomCrop(32, 32),
    A.HorizontalFlip(),
]

# whiten: the first conv starts as a whitening of the training images' 3x3 patches (airbench): +0.87 on the 10-epoch
# hold-out, more than twice the seed spread (results/TRIALS.md)
HPARAMS = dict(norm='bn', epochs=20, bs=128, opt='sgd', lr=0.1, wd=5e-4, label_smoothing=0.1, whiten=True)

# S7's rules (cifar_fa.assignments): blocks C1 P1 C2 P2 C3 P3 C4 GAP + 1x1 head, a dilated and a depthwise-separable
# conv, RF > 44, < 1,000,000 parameters; <= 20 epochs is our goal's cap
RECIPE = Recipe('s7', SPEC, AUGS, defaults=HPARAMS, tta=True, constraints=S7)

if __name__ == '__main__':
    main(RECIPE)
