"""Review a finished run folder: rewrite its review figures on the test split, or predict one image."""
import argparse
import sys
import warnings

from cifar_fa.cli import one_line_errors, positive
from cifar_fa.runs import load_run, predict_image, review_run

p = argparse.ArgumentParser(description=__doc__,
                            epilog="RUN_DIR/model.pkl is a pickle and loading it runs code from it: review only run "
                                   "folders you trust, or pass --weights to load plain weights instead.")
p.add_argument('run_dir', help='a run folder (runs/... or results/...) holding model.pkl and config.json')
p.add_argument('--k', type=positive(int), default=16, help='how many top losses to plot')
p.add_argument('--data', help="CIFAR-10 folder or .tgz (default: the run's own data)")
p.add_argument('--tta', action='store_true', help='also print the test accuracy with flip test-time augmentation')
p.add_argument('--gradcam', action='store_true',
               help='also write gradcam.png: the misclassified grid with each Grad-CAM map for the predicted class')
p.add_argument('--gradcam-layer', metavar='NAME', help="the module whose output Grad-CAM uses (default: the map "
                                                       "entering global average pooling); implies --gradcam")
p.add_argument('--image', help='predict this one image and print the top-3 classes instead')
p.add_argument('--weights',
               help='a .pth of plain weights (e.g. RUN_DIR/checkpoints/last.pth) to load instead of model.pkl')
args = p.parse_args()
warnings.formatwarning = lambda msg, *_, **__: f'warning: {msg}\n'  # one line, not the source line
try:
    with one_line_errors():
        if args.image:
            for label, prob in predict_image(load_run(args.run_dir, args.weights, args.data), args.image):
                print(f'{label:12s} {prob:.3f}')
        else:
            m = review_run(args.run_dir, args.k, args.data, args.weights, args.tta,
                           args.gradcam or bool(args.gradcam_layer), args.gradcam_layer)
            print(f"test accuracy {100 * m['test_accuracy']:.2f} % on {m['n_test']} images")
            if args.tta: print(f"with flip TTA {100 * m['flip_tta_test_accuracy']:.2f} %")
            print('\n'.join(f'  {c:12s} {100 * a:.1f} %' for c, a in m['per_class_accuracy'].items()))
            print('most confused (true, predicted, count):', *m['most_confused'], sep='\n  ')
except FileNotFoundError as e:
    sys.exit(print(f'error: {e.filename} does not exist; pass a finished run folder, or --weights '
                   'RUN_DIR/checkpoints/last.pth for an unfinished one', file=sys.stderr) or 2)
