"""Optimizer wrappers a run can ask for on top of `OPTIMIZERS`."""
from __future__ import annotations

from functools import partial
from typing import Callable

from fastai.optimizer import Lookahead, Optimizer, average_grad, l2_reg, weight_decay

__all__ = ['SavableLookahead', 'lookahead', 'nesterov_sgd', 'nesterov_step']


def nesterov_step(p, lr: float, mom: float, grad_avg, **kwargs) -> None:
    """Nesterov's momentum step, as `torch.optim.SGD(nesterov=True)`: along the gradient plus `mom` times its updated
    average."""
    p.data.add_(p.grad.data.add(grad_avg, alpha=mom), alpha=-lr)


def nesterov_sgd(params, lr: float, mom: float = .9, wd: float = 0., decouple_wd: bool = False) -> Optimizer:
    """fastai's momentum `SGD` with Nesterov's step; the one cycle schedules its `mom` as it does `SGD`'s."""
    return Optimizer(params, [weight_decay if decouple_wd else l2_reg, average_grad, nesterov_step], lr=lr, mom=mom,
                     wd=wd)


class SavableLookahead(Lookahead):
    """fastai's `Lookahead` whose state (the slow weights) is plain lists of tensors, so that a checkpoint loads with
    `torch.load(weights_only=True)`, as `Learner.load` does."""

    def state_dict(self) -> dict:
        """The wrapped optimizer's state, the step count and the slow weights."""
        slow = None if self.slow_weights is None else [list(pg) for pg in self.slow_weights]
        return {**self.opt.state_dict(), 'count': self.count, 'slow_weights': slow}


def _wrapped(opt_func: Callable[..., Optimizer], params, k: int, alpha: float, **kwargs) -> SavableLookahead:
    return SavableLookahead(opt_func(params, **kwargs), k=k, alpha=alpha)


def lookahead(opt_func: Callable[..., Optimizer], k: int = 6, alpha: float = .5) -> Callable[..., SavableLookahead]:
    """`opt_func` wrapped in Lookahead (Zhang et al. 2019): every `k` steps the weights move `alpha` of the way from
    where they were `k` steps ago to where the optimizer took them, and go on from there."""
    return partial(_wrapped, opt_func, k=k, alpha=alpha)
