"""The spec language: a network as a string that reads like an assignment's skeleton (`C1:16 C2:32 P1 ... GAP C10`)."""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ['LayerSpec', 'parse_spec']

# far beyond any CIFAR network; a 20-digit width overflows torch's int64 shapes even on the meta device
_MAX_VALUE = 65_536
_TOKEN = re.compile(r'^(?P<name>[A-Za-z]+\d*[a-z]?)(?::(?P<nf>\d+))?'
                    r'(?P<opts>(?:/(?:d\d+|s\d+|k\d+|dw))*)(?:\+(?P<add>\w+))?$')


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a spec: `kind` is 'conv', 'pool', 'gap' or 'head'."""
    name: str
    kind: str
    nf: int | None = None
    ks: int = 3
    stride: int = 1
    dilation: int = 1
    separable: bool = False
    add: str | None = None

    @property
    def padding(self) -> int: return self.dilation * (self.ks - 1) // 2 if self.kind == 'conv' else 0

    @property
    def block(self) -> str:
        """The block a conv belongs to by its name (`C2a`, `c2b` -> `C2`); other layers are their own block."""
        return re.match(r'[A-Za-z]+\d*', self.name)[0].capitalize() if self.kind == 'conv' else self.name


def _parse_token(tok: str, after_gap: bool) -> LayerSpec:
    m = _TOKEN.match(tok)
    if not m: raise ValueError(f"spec token {tok!r} is not NAME[:width][/d2|/s2|/k5|/dw][+SOURCE]")
    name, nf, add = m['name'], m['nf'] and int(m['nf']), m['add']
    opts = [o for o in m['opts'].split('/') if o]
    values = [int(o[1:]) for o in opts if o != 'dw'] + ([] if nf is None else [nf])
    if not all(1 <= v <= _MAX_VALUE for v in values):
        raise ValueError(f"spec token {tok!r}: widths, /d, /s and /k must be from 1 to {_MAX_VALUE:,}")
    pool = name == 'GAP' or (name[0] == 'P' and not after_gap)
    if (pool and (nf or opts or add)) or (after_gap and (opts or add)):
        what = 'P and GAP take no width,' if pool else 'the head takes a width but'
        raise ValueError(f"spec token {tok!r}: {what} no /options and no +SOURCE")
    if name == 'GAP': return LayerSpec(name, 'gap')
    if after_gap: return LayerSpec(name, 'head', nf=nf, ks=1)  # any name: the 1x1 conv to the classes
    if name[0] == 'P': return LayerSpec(name, 'pool', ks=2, stride=2)
    if name[0] not in 'Cc':
        raise ValueError(f"spec token {tok!r}: layers are C (3x3 conv), c (1x1 conv), P (max-pool) or GAP")
    if nf is None: raise ValueError(f"spec token {tok!r} needs a width, e.g. {name}:32")
    kw = dict(ks=3 if name[0] == 'C' else 1)
    for o in opts:
        if o == 'dw': kw['separable'] = True
        else: kw[{'d': 'dilation', 's': 'stride', 'k': 'ks'}[o[0]]] = int(o[1:])
    return LayerSpec(name, 'conv', nf=nf, add=add, **kw)


def parse_spec(spec: str) -> list[LayerSpec]:
    """Parse a spec such as `'C1:16 C2:32 c3:16 P1 C3:32 C4:32 C5:32+C3 GAP C10'` into layers.

    A trailing lower-case letter groups convs into blocks: `C1a:32 C1b:64 c1c:32` is block C1."""
    if not spec.split(): raise ValueError('the spec is empty')
    layers: list[LayerSpec] = []
    for tok in spec.split():
        layers.append(_parse_token(tok, after_gap=any(l.kind == 'gap' for l in layers)))
    names = [l.name for l in layers]
    if len(set(names)) != len(names): raise ValueError(f"spec {spec!r} repeats a layer name")
    for i, l in enumerate(layers):
        if l.add and l.add not in names[:i]:
            raise ValueError(f"spec layer {l.name} adds {l.add!r}, which is not an earlier layer")
    return layers
