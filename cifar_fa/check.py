"""Check any `nn.Module` against an assignment's rules: `python -m cifar_fa.check FILE.py:NAME --assignment s8`.

The receptive-field table is traced from a real forward pass of one 3x32x32 image: every conv and pooling op in
execution order, as a module or a functional call, and residual additions take the larger RF of their inputs."""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .assignments import ASSIGNMENTS
from .constraints import Constraints
from .models import count_params
from .receptive_field import RF_COLUMNS

__all__ = ['Layer', 'Trace', 'trace', 'violations', 'check_model', 'load_model', 'main']

# torch calls by name: nn modules reach them through torch._C, functional code through torch.nn.functional
_MAXPOOL, _GAP = {'max_pool2d', 'max_pool2d_with_indices'}, {'adaptive_avg_pool2d', 'mean'}


@dataclass
class Layer:
    """One conv or pooling op of the traced forward pass, with the RF recurrence's columns."""
    layer: str
    block: str
    kind: str  # conv, depthwise, pointwise, maxpool, avgpool, gap, classifier
    n_in: int
    k: int
    p: int
    s: int
    dilation: int
    n_out: int
    jump: int
    rf: int
    groups: int = 1
    separable: bool = False  # a depthwise conv (kernel > 1) whose output feeds a 1x1 conv


@dataclass
class _Info:
    rf: int = 1
    jump: int = 1
    after_gap: bool = False
    depthwise: Layer | None = None  # the depthwise conv this tensor comes from, until a conv reads it


@dataclass
class Trace:
    """What a forward pass of one 3x32x32 image ran: its layers, the blocks and the output."""
    layers: list[Layer] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)  # top-level children in the order they ran
    out_shape: tuple = ()

    @property
    def rf(self) -> int:
        """RF of the last feature map before global average pooling."""
        before = [l for l in self.layers if l.kind not in ('gap', 'classifier')]
        return before[-1].rf if before else 1


def _pair(v) -> int:
    return v[0] if isinstance(v, (tuple, list)) else int(v)


class _Tracer(TorchFunctionMode):
    """Follows RF and jump through every torch call, keyed by the tensors themselves."""

    def __init__(self):
        super().__init__()
        self.info: dict[int, _Info] = {}
        self.keep: list[torch.Tensor] = []  # alive until the trace ends, so that ids stay unique
        self.layers: list[Layer] = []
        self.module, self.block, self.func = '', '', ''

    def _name(self) -> str:
        """The module running the op, or for a functional call the block (or forward) and the function."""
        return self.module or f"{self.block or 'forward'}.{self.func}"

    def _get(self, t: torch.Tensor) -> _Info:
        return self.info.get(id(t), _Info())

    def _set(self, t, info: _Info) -> None:
        if isinstance(t, torch.Tensor):
            self.info[id(t)] = info
            self.keep.append(t)

    def _add(self, kind: str, x: torch.Tensor, out: torch.Tensor, k: int, p: int, s: int, d: int, groups: int = 1):
        src = self._get(x)
        n_in, n_out = x.shape[-1], out.shape[-1]
        k_eff = d * (k - 1) + 1
        rf = src.rf + (k_eff - 1) * src.jump
        layer = Layer(self._name(), self.block, kind, n_in, k, p, s, d, n_out, src.jump * s, rf, groups)
        self.layers.append(layer)
        return layer, _Info(layer.rf, layer.jump, src.after_gap)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if not tensors or not isinstance(out, (torch.Tensor, tuple)): return out
        x, first, name = tensors[0], out[0] if isinstance(out, tuple) else out, getattr(func, '__name__', '')
        self.func = name

        def get(i: int, key: str, default):  # the argument at position `i` or keyword `key`
            return args[i] if len(args) > i else kwargs.get(key, default)
        if name == 'conv2d':
            w = args[1] if len(args) > 1 else kwargs['weight']
            s, d, groups, k = _pair(get(3, 'stride', 1)), _pair(get(5, 'dilation', 1)), get(6, 'groups', 1), w.shape[-1]
            p = get(4, 'padding', 0)
            p = d * (k - 1) // 2 if p == 'same' else 0 if p == 'valid' else _pair(p)
            src = self._get(x)
            if src.after_gap: kind = 'classifier'
            elif groups > 1 and groups == x.shape[1] and w.shape[1] == 1: kind = 'depthwise'
            elif k == 1 and src.depthwise is not None: kind = 'pointwise'
            else: kind = 'conv'
            if kind == 'pointwise': src.depthwise.separable = True
            layer, info = self._add(kind, x, first, k, p, s, d, groups)
            if kind == 'depthwise' and k > 1: info.depthwise = layer
        elif name in _MAXPOOL or name == 'avg_pool2d':
            k = _pair(get(1, 'kernel_size', 1))
            s, p = _pair(get(2, 'stride', None) or k), _pair(get(3, 'padding', 0))
            d = _pair(get(4, 'dilation', 1)) if name in _MAXPOOL else 1
            if name == 'avg_pool2d' and k >= x.shape[-1] and first.shape[-1] == 1: info = self._gap(x, first)
            else: _, info = self._add('maxpool' if name in _MAXPOOL else 'avgpool', x, first, k, p, s, d)
        elif name in _GAP and x.dim() == 4 and first.dim() in (2, 4) and first.shape[2:] in ((), (1, 1)):
            info = self._gap(x, first)
        elif name == 'linear' and self._get(x).after_gap:
            layer = Layer(self._name(), self.block, 'classifier', 1, 1, 0, 1, 1, 1, 1, self._get(x).rf)
            self.layers.append(layer)
            info = _Info(self._get(x).rf, self._get(x).jump, True)
        else:
            srcs = [self._get(t) for t in tensors]
            best = max(srcs, key=lambda i: i.rf)  # a residual addition: the larger RF of its inputs
            # a norm or activation between the depthwise conv and its 1x1 keeps them a pair
            info = _Info(best.rf, best.jump, any(i.after_gap for i in srcs), self._get(x).depthwise)
        for o in (out if isinstance(out, tuple) else (out,)): self._set(o, info)
        return out

    def _gap(self, x: torch.Tensor, out: torch.Tensor) -> _Info:
        src = self._get(x)
        n = x.shape[-1]
        self.layers.append(Layer(self._name(), self.block, 'gap', n, n, 0, 1, 1, 1, src.jump, src.rf))
        return _Info(src.rf, src.jump, True)


def trace(model: nn.Module, size: int = 32) -> Trace:
    """Run one `size`x`size` RGB image through `model` and record its conv and pooling layers in order."""
    tracer, result, hooks = _Tracer(), Trace(), []

    def enter(name, top):
        def hook(module, inputs):
            tracer.module = name
            if top:
                tracer.block = name
                if not result.blocks or result.blocks[-1] != name: result.blocks.append(name)
        return hook

    def leave(top):
        def hook(module, inputs, output):
            tracer.module = ''
            if top: tracer.block = ''
        return hook

    children = list(model.named_children())
    if len(children) == 1 and isinstance(children[0][1], (nn.Sequential, nn.ModuleDict, nn.ModuleList)):
        children = list(children[0][1].named_children())  # one container (a SpecNet's layers): its children are blocks
    top = {id(m): re.sub(r'^([A-Za-z]+\d+)[a-z]$', r'\1', n) for n, m in children}  # C1a, C1b: block C1
    for name, m in model.named_modules():
        if name and (id(m) in top or not list(m.children())):  # blocks, and the leaf modules that run the ops
            block = top.get(id(m))
            hooks += [m.register_forward_pre_hook(enter(block or name, block is not None)),
                      m.register_forward_hook(leave(block is not None))]
    model.eval()
    try:
        with torch.no_grad(), tracer: out = model(torch.randn(1, 3, size, size))
    finally:
        for h in hooks: h.remove()
    result.layers, result.out_shape = tracer.layers, tuple(out.shape) if isinstance(out, torch.Tensor) else ()
    return result


def _kinds(layers: list[Layer]) -> list[str]:
    """S8's letters: C a 3x3 conv, c a 1x1 conv, P a 2x2 max-pool, GAP, in execution order."""
    letters = {'maxpool': 'P', 'gap': 'GAP'}
    return [letters.get(l.kind) or ('C' if l.k == 3 else 'c' if l.k == 1 else f'k{l.k}') for l in layers]


def violations(t: Trace, params: int, rules: Constraints) -> list[str]:
    """Each rule of `rules` that the traced model breaks, as one line."""
    out, layers = [], t.layers
    gap = next((i for i, l in enumerate(layers) if l.kind == 'gap'), None)
    if rules.max_params is not None and params >= rules.max_params:
        out.append(f'parameters: {params:,}, the assignment allows fewer than {rules.max_params:,}')
    if gap is None: out.append('no global average pooling (GAP) before the classifier')
    elif not any(l.kind == 'classifier' for l in layers[gap:]):
        out.append('no 1x1 conv or linear layer after global average pooling to map it to the classes')
    if rules.min_rf is not None and t.rf <= rules.min_rf:
        out.append(f'receptive field: {t.rf}, the assignment needs more than {rules.min_rf}')
    if rules.need_dilated and not any(l.dilation > 1 and l.k > 1 for l in layers if l.kind in ('conv', 'depthwise')):
        out.append('no dilated conv (dilation > 1, kernel above 1x1)')
    if rules.need_separable and not any(l.separable for l in layers):
        out.append('no depthwise-separable conv (a depthwise conv with a kernel above 1x1, then a 1x1 conv)')
    if rules.blocks:
        before = layers[:gap] if gap is not None else layers
        out_block = layers[gap].block if gap is not None else None  # the output block may start with a conv
        conv_blocks = list(dict.fromkeys(l.block for l in before
                                         if l.kind in ('conv', 'depthwise', 'pointwise') and l.block != out_block))
        need = sum(b.startswith('C') for b in rules.blocks.split())
        if len(conv_blocks) != need or '' in conv_blocks:
            out.append(f"conv blocks before the output block: {', '.join(b or '(forward)' for b in conv_blocks)}; "
                       f"the assignment needs {need} (the model's top-level children)")
        elif rules.block_convs is not None:
            for b in conv_blocks:  # a depthwise conv and its 1x1 count as one conv layer
                n = sum(l.block == b and l.kind in ('conv', 'depthwise') for l in before)
                if n != rules.block_convs:
                    out.append(f'block {b} has {n} conv layers; the assignment needs {rules.block_convs}')
    if rules.skeleton:
        want = [re.sub(r'\d+$', '', n) for n in rules.skeleton.split()]
        want = [{'C': 'C', 'c': 'c', 'P': 'P', 'GAP': 'GAP'}[w] for w in want[:-1]] + ['c']  # C10 is the 1x1 classifier
        got = _kinds(layers)
        if got != want: out.append(f"layers in order: {' '.join(got)}; the assignment's skeleton is {' '.join(want)}")
    return out


def check_model(model: nn.Module, rules: Constraints, n_classes: int = 10) -> dict:
    """Params, RF, traced layers and broken rules of `model`; raises ValueError if it does not take a 3x32x32 image
    to `n_classes` logits."""
    try: t = trace(model)
    except Exception as e: raise ValueError(f'the model fails on a 1x3x32x32 input: {type(e).__name__}: {e}') from None
    if t.out_shape != (1, n_classes):
        raise ValueError(f'the model outputs shape {list(t.out_shape)} for one image; '
                         f'it must output {n_classes} logits')
    params = count_params(model)
    found = {'dilated': any(l.dilation > 1 and l.k > 1 for l in t.layers if l.kind != 'gap'),
             'depthwise_separable': any(l.separable for l in t.layers),
             '1x1': sum(l.k == 1 and l.kind in ('conv', 'pointwise', 'classifier') for l in t.layers),
             'maxpool': sum(l.kind == 'maxpool' for l in t.layers), 'gap': any(l.kind == 'gap' for l in t.layers),
             'classifier': any(l.kind == 'classifier' for l in t.layers)}
    return dict(params=params, rf=t.rf, blocks=t.blocks, kinds=found, layers=[asdict(l) for l in t.layers],
                violations=violations(t, params, rules))


def load_model(target: str) -> nn.Module:
    """The module that `FILE.py:NAME` names: an `nn.Module` subclass built with no arguments, or a function returning
    a module. Raises ValueError with one line saying what is wrong."""
    path, _, name = target.rpartition(':')
    if not path or not name: raise ValueError(f'{target!r} is not FILE.py:NAME')
    if not Path(path).is_file(): raise ValueError(f'{path} does not exist')
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    try: spec.loader.exec_module(module)
    except Exception as e: raise ValueError(f'importing {path} failed: {type(e).__name__}: {e}') from None
    obj = getattr(module, name, None)
    if obj is None: raise ValueError(f'{path} has no {name}')
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)) and not callable(obj):
        raise ValueError(f'{name} in {path} is neither an nn.Module subclass nor a function returning one')
    try: model = obj()
    except Exception as e: raise ValueError(f'building {name}() failed: {type(e).__name__}: {e}') from None
    if not isinstance(model, nn.Module): raise ValueError(f'{name}() returned {type(model).__name__}, not an nn.Module')
    return model


def _table(layers: list[dict]) -> str:
    cols = ['block', *RF_COLUMNS, 'kind']
    rows = [[str(l[c] if c != 'layer' else l['layer']) for c in cols] for l in layers]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    return '\n'.join('  '.join(v.rjust(w) for v, w in zip(r, widths)) for r in [cols, *rows])


def main(argv: list[str] | None = None) -> int:
    """Command line: print the report; exit 0 when every rule holds, 1 when one breaks, 2 for bad input."""
    p = argparse.ArgumentParser(prog='python -m cifar_fa.check', description=__doc__.splitlines()[0])
    p.add_argument('target', metavar='FILE.py:NAME', help='an nn.Module subclass (built with no arguments) or a '
                                                         'function returning a module')
    p.add_argument('--assignment', required=True, choices=sorted(ASSIGNMENTS))
    p.add_argument('--json', action='store_true', help='print one JSON object instead of the report')
    a = p.parse_args(argv)
    try: report = check_model(load_model(a.target), ASSIGNMENTS[a.assignment])
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if a.json: print(json.dumps(report))
    else:
        print(f"{a.target}: {report['params']:,} parameters, receptive field {report['rf']}")
        print(_table(report['layers']))
        print('found: ' + ', '.join(f'{k} {v}' for k, v in report['kinds'].items()))
        for v in report['violations']: print(f'broken: {v}')
        if not report['violations']: print(f'every rule of {a.assignment.upper()} holds')
    return 1 if report['violations'] else 0


if __name__ == '__main__':
    sys.exit(main())
