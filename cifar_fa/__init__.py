"""fastai training recipes for compact CNNs on CIFAR-10."""
import warnings

# fastai 2.8 calls torch.jit.script at import, which torch 2.14 marks deprecated: noise for every user of a recipe
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)

from .cli import main
from .config import Recipe, RunConfig
from .constraints import ConstraintError, Constraints
from .data import CIFAR_MEAN_RGB, CIFAR_STATS, AlbumentationsTransform, DataError, cifar10_path, cifar_dls
from .layers import ACTIVATIONS, NORMS, ConvBlock, activation, norm_layer
from .models import SpecNet, count_params
from .receptive_field import rf_table, total_rf
from .spec import parse_spec
from .train import build_learner, build_model, run

__all__ = ['ConstraintError', 'Constraints', 'CIFAR_MEAN_RGB', 'CIFAR_STATS', 'AlbumentationsTransform', 'DataError',
           'cifar10_path', 'cifar_dls', 'NORMS', 'ConvBlock', 'norm_layer', 'ACTIVATIONS', 'activation', 'SpecNet',
           'count_params', 'parse_spec', 'rf_table', 'total_rf', 'Recipe', 'RunConfig', 'build_learner', 'build_model',
           'run', 'main']
__version__ = '0.1.0'
