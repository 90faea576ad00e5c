"""S7: four conv blocks with max-pools between them, dilated and depthwise-separable convs, < 1,000,000 parameters."""
from cifar_fa import Recipe, main
from cifar_fa.assignments import S7
from cifar_fa.augment import A

# blocks C1..C4 (C2a, C2b, ... belong to block C2); /dw = depthwise-separable, /d2 = dilation 2, +P1 adds P1's output
SPEC = ('C1a:64 C1b:128 P1 '
        'C2a:128 C2b:128+P1 C2c:192 P2 '
        'C3a:192/dw C3b:192/dw/d2+P2 C3c:320/dw P3 '
        'C4a:320/dw C4b:320/dw+P3 GAP O')

AUGS = [
    A.PadIfNeeded(40, 40, border_mode=4),  # reflect-pad 4 px, then a random 32x32 crop
    A.RandomCrop(32, 32),
    A.HorizontalFlip(),
]

HPARAMS = dict(norm='bn', epochs=20, bs=128, opt='sgd', lr=0.1, wd=5e-4, label_smoothing=0.1)

# S7's rules (cifar_fa.assignments): blocks C1 P1 C2 P2 C3 P3 C4 GAP + 1x1 head, a dilated and a depthwise-separable
# conv, RF > 44, < 1,000,000 parameters; <= 20 epochs is our goal's cap
RECIPE = Recipe('s7', SPEC, AUGS, defaults=HPARAMS, tta=True, constraints=S7)

if __name__ == '__main__':
    main(RECIPE)
