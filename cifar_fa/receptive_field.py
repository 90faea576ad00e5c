"""Receptive-field table computed layer by layer from a model spec."""
from __future__ import annotations

import pandas as pd

from .spec import parse_spec

__all__ = ['rf_table', 'total_rf', 'RF_COLUMNS']

RF_COLUMNS = ['layer', 'n_in', 'k', 'p', 's', 'dilation', 'n_out', 'jump', 'rf']


def rf_table(spec: str, size: int = 32) -> pd.DataFrame:
    """Per layer of `spec`: input size, kernel, padding, stride, dilation, output size, jump and RF."""
    rows, n, jump, rf, sizes = [], size, 1, 1, {}
    for l in parse_spec(spec):
        k, p, s, d = (n, 0, 1, 1) if l.kind == 'gap' else (l.ks, l.padding, l.stride, l.dilation)
        k_eff = d * (k - 1) + 1
        n_out = (n + 2 * p - k_eff) // s + 1
        rf, n_in, n, jump = rf + (k_eff - 1) * jump, n, n_out, jump * s
        if n_out < 1:
            raise ValueError(f"spec layer {l.name} turns a {n_in}x{n_in} map into {n_out}x{n_out}: "
                             "drop a pool or stride, or shrink a kernel")
        if l.kind == 'conv' and (reach := d * (k - 1) // 2) >= n_in:  # the outer taps only ever read padding
            raise ValueError(f"spec layer {l.name}: its outer taps reach {reach} pixels "
                             f"from the centre of a {n_in}x{n_in} map, so they only read padding and inflate the RF; "
                             f"use a kernel or dilation that reaches below {n_in}")
        if l.add and sizes[l.add] != n_out:
            raise ValueError(f"spec layer {l.name} ({n_out}x{n_out}) "
                             f"cannot add {l.add} ({sizes[l.add]}x{sizes[l.add]})")
        sizes[l.name] = n_out
        rows.append(dict(layer=l.name, n_in=n_in, k=k, p=p, s=s, dilation=d, n_out=n_out, jump=jump, rf=rf))
    return pd.DataFrame(rows, columns=RF_COLUMNS)


def total_rf(spec: str, size: int = 32) -> int:
    """RF of the last layer before global average pooling (the largest any conv feature sees)."""
    t = rf_table(spec, size)
    gap = t.index[t.layer == 'GAP']
    before = t[:gap[0]] if len(gap) else t
    return int(before.rf.iloc[-1]) if len(before) else 1  # GAP straight on the input: each pixel sees itself
