import importlib
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fastai.torch_core import set_seed

from cifar_fa import (
    NORMS,
    ConstraintError,
    ConvBlock,
    RunConfig,
    SpecNet,
    build_model,
    count_params,
    layers,
    norm_layer,
    parse_spec,
    train,
)
from cifar_fa.callbacks import GroupNormLikeBN  # noqa: F401 (imported to fail early if the module breaks)
from cifar_fa.config import RunError
from cifar_fa.layers import WSConv2d, whitening_filters
from recipes.s7_dilated_separable import RECIPE as S7
from recipes.s8_norms import RECIPE as S8


@pytest.mark.parametrize('name,cls,groups', [('bn', nn.BatchNorm2d, None), ('gn', nn.GroupNorm, 4),
                                             ('ln', nn.GroupNorm, 1)])
def test_norm_factory(name, cls, groups):
    m = norm_layer(name)(24)
    assert type(m) is cls
    assert count_params(m) == 2 * 24
    if groups: assert m.num_groups == groups


def test_unknown_norm_lists_choices():
    with pytest.raises(ValueError, match='bn, gn, ln'): norm_layer('in')


def test_ln_is_layer_norm_over_chw():
    x = torch.randn(3, 8, 5, 7) * 4 + 2
    ln = norm_layer('ln')(8)
    nn.init.normal_(ln.weight); nn.init.normal_(ln.bias)
    ref = F.layer_norm(x, (8, 5, 7), eps=ln.eps) * ln.weight[:, None, None] + ln.bias[:, None, None]
    torch.testing.assert_close(ln(x), ref, rtol=1e-4, atol=1e-5)


def test_conv_block_options():
    plain = ConvBlock(8, 16)
    assert plain[0].bias is None and isinstance(plain[1], nn.BatchNorm2d)
    sep = ConvBlock(8, 16, separable=True)
    assert count_params(sep) == 8 * 9 + 8 * 16 + 2 * 16
    dil = ConvBlock(8, 16, dilation=2)
    assert dil(torch.randn(1, 8, 10, 10)).shape == (1, 16, 10, 10)
    assert ConvBlock(8, 16, stride=2)(torch.randn(1, 8, 10, 10)).shape == (1, 16, 5, 5)


def test_layers_exports():
    assert layers.__all__ == ['NORMS', 'GN_GROUPS', 'norm_layer', 'ACTIVATIONS', 'activation', 'WSConv2d',
                              'ConvBlock', 'whitening_filters']


def test_whitening_filters_decorrelate_the_patches_they_were_taken_from():
    set_seed(0)
    x = torch.randn(32, 3, 12, 12)
    x[:, 1] = 0.8 * x[:, 0] + 0.2 * x[:, 1]  # correlated channels, as in photographs
    w = whitening_filters(x, 16)
    assert w.shape == (16, 3, 3, 3) and torch.equal(w[8:], -w[:8])
    out = F.conv2d(x, w[:8]).transpose(0, 1).flatten(1)
    assert torch.allclose(out @ out.T / out.shape[1], torch.eye(8), atol=1e-3)
    with pytest.raises(ValueError, match='odd'): whitening_filters(x, 15)
    with pytest.raises(ValueError, match='27 directions, fewer than 32'): whitening_filters(x, 64)


def test_whitened_first_conv_is_plain_and_starts_as_the_whitening():
    model = SpecNet(S8.spec, 'gn', ws=True, whiten=True)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert type(convs[0]) is nn.Conv2d and all(type(c) is WSConv2d for c in convs[1:])
    assert count_params(model) == count_params(SpecNet(S8.spec, 'gn', ws=True))
    x = torch.randn(8, 3, 32, 32)
    model.init_whitening(x)
    assert torch.equal(convs[0].weight, whitening_filters(x, 16))
    for spec in ('C1:8/dw GAP O', 'C1:15 GAP O', 'C1:56 GAP O', 'P1 C1:8 GAP O'):
        with pytest.raises(ValueError, match='a whitened first layer must be a plain conv'): SpecNet(spec, whiten=True)


def test_build_model_checks_the_budget_before_any_weight_exists(monkeypatch):
    built = []
    monkeypatch.setattr(train, 'SpecNet', lambda *a, **k: built.append(SpecNet(*a, **k)) or built[-1])
    huge = RunConfig('s7', spec='C1a:8 P1 C2a:8 P2 C3a:8/d2 P3 C4a:65536/dw C4b:65536 GAP O')  # 3.9e10 weights
    with pytest.raises(ConstraintError, match='parameters'): build_model(S7, huge)
    assert len(built) == 1 and next(built[0].parameters()).is_meta
    with pytest.raises(RunError, match="38,656,148,954 parameters do not fit in this machine's memory"):
        build_model(S7, replace(huge, outside_assignment=True))
    model = build_model(S8, RunConfig('s8', norm='gn', ws=True))
    set_seed(42, reproducible=True)
    plain = SpecNet(S8.spec, 'gn', ws=True)
    # seeded as before
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


def test_ws_conv_uses_standardized_filters():
    conv, x = WSConv2d(4, 6, 3, padding=1, bias=False), torch.randn(2, 4, 9, 9)
    w = conv.weight.detach()
    std = (w - w.mean((1, 2, 3), keepdim=True)) / torch.sqrt(w.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(conv(x), F.conv2d(x, std, padding=1), rtol=1e-4, atol=1e-5)
    # per-filter scale and shift
    with torch.no_grad(): conv.weight.mul_(torch.arange(1., 7.)[:, None, None, None]).add_(3.)
    torch.testing.assert_close(conv(x), F.conv2d(x, std, padding=1), rtol=1e-3, atol=1e-4)


def test_ws_block_keeps_the_parameter_count():
    for kw in (dict(), dict(separable=True), dict(dilation=2)):
        ws, plain = ConvBlock(8, 16, ws=True, **kw), ConvBlock(8, 16, **kw)
        convs = [m for m in ws.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(type(m) is WSConv2d for m in convs) and count_params(ws) == count_params(plain)
    assert type(SpecNet(S8.spec, 'gn', ws=True).layers['C10']) is nn.Conv2d  # the head to the classes stays plain


def test_activation_is_chosen_by_name_for_every_block():
    model = build_model(S8, RunConfig('s8', norm='gn', act='gelu'))
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.GELU, nn.SiLU))]
    assert len(acts) == 10 and all(type(m) is nn.GELU for m in acts)  # C1-C5, C7-C9, c3, c6; the head has none
    assert count_params(model) == count_params(SpecNet(S8.spec, 'gn'))
    assert [type(m) for m in ConvBlock(8, 16, act='silu')] == [nn.Conv2d, nn.BatchNorm2d, nn.SiLU]
    with pytest.raises(ValueError, match="unknown activation 'tanh': choose one of relu, gelu, silu"):
        ConvBlock(8, 16, act='tanh')


@pytest.mark.parametrize('norm', list(NORMS))
def test_s8_variants(norm):
    model = SpecNet(S8.spec, norm)
    assert count_params(model) < 50_000
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    kinds = {type(m) for m in model.modules()}
    assert (nn.BatchNorm2d in kinds) == (norm == 'bn')
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    S8.constraints.check(model, epochs=20)


def test_s8_params_same_for_every_norm():
    assert len({count_params(SpecNet(S8.spec, n)) for n in NORMS}) == 1


@pytest.mark.parametrize('recipe', ['s7_dilated_separable', 's8_norms', 's9_augmented'])
@pytest.mark.parametrize('norm', ['bn', 'gn', 'ln'])
def test_every_parameter_learns(recipe, norm):
    """A branch whose output and gradient are exactly zero (e.g. a zero-initialised norm before a ReLU) never trains."""
    spec = importlib.import_module(f'recipes.{recipe}').RECIPE.spec
    model = SpecNet(spec, norm).train()
    torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.arange(8)).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not dead, f'no gradient reaches {dead}'


def test_skip_adds_the_source():
    model = SpecNet('C1:8 C2:8 C3:8+C1 GAP C4', 'gn').eval()
    x = torch.randn(2, 3, 16, 16)
    c1 = model.layers['C1'](x)
    c3 = model.layers['C3'](model.layers['C2'](c1)) + c1
    torch.testing.assert_close(model.layers['C4'](model.layers['GAP'](c3)).flatten(1), model(x))


def test_fastai_tensor_types_stop_at_the_model():
    from fastai.torch_core import TensorImage
    model = SpecNet('C1:8 C2:8+C1 GAP C3', 'bn').eval()
    x = torch.randn(2, 3, 16, 16)
    out = model(x.as_subclass(TensorImage))  # the type every op would otherwise dispatch through __torch_function__
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize('spec,msg', [('C1 GAP C2', 'needs a width'), ('C1:8 X2:8', 'layers are'),
                                      ('C1:8 C2:8+C9 GAP C3', 'not an earlier layer'), ('C1:8 C1:8', 'repeats'),
                                      (' ', 'empty'), ('C1:0', 'from 1 to'), ('C1:8/s0', 'from 1 to'),
                                      ('C1:8 GAP O:0', 'from 1 to'),
                                      ('C1:99999999999999999999', 'from 1 to 65,536'), ('C1:8/k65537', 'from 1 to'),
                                      ('C1:8 P1:8', 'P and GAP take no width'), ('C1:8 P1/s2', 'no /options'),
                                      ('C1:8 GAP:4 O', 'P and GAP'),
                                      ('C1:8 GAP O/d2', 'the head takes a width but no /options'),
                                      ('C1:8 P1+C1', r'P and GAP take no width, no /options and no \+SOURCE'),
                                      ('C1:8 P1+NOPE', r'no \+SOURCE'), ('C1:8 GAP+C1 O', r'no \+SOURCE'),
                                      ('C1:8 GAP O+GAP', r'the head takes a width but no /options and no \+SOURCE')])
def test_bad_specs(spec, msg):
    with pytest.raises(ValueError, match=msg): parse_spec(spec)


def test_out_features():
    assert SpecNet('C1:8 P1 GAP O').out_features == 10 and SpecNet('C1:8 GAP O:7').out_features == 7
    assert (SpecNet('C1:8 P1 C2:4').out_features == 4 * 16 * 16
            == SpecNet('C1:8 P1 C2:4')(torch.zeros(1, 3, 32, 32)).shape[1])


@pytest.mark.parametrize('spec', ['C1:8 C2:16+C1 GAP C3', 'C1:8 P1 C2:8+C1 GAP C3'])  # channels, then map size
def test_skip_mismatch_fails_when_built(spec):
    with pytest.raises(ValueError, match='cannot add'): SpecNet(spec)
