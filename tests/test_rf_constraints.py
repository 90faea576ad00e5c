import pytest

from cifar_fa import ConstraintError, Constraints, SpecNet, rf_table, total_rf
from recipes.s8_norms import RECIPE as S8


def test_rf_table_hand_computed():
    # C1 3x3: rf 3; P1 2x2/2: rf 4, jump 2; C2 3x3 dilation 2 (k_eff 5): rf 4 + 4*2 = 12; c3 1x1/2 stride: rf 12, jump 4
    t = rf_table('C1:8 P1 C2:8/d2 c3:8/s2 GAP C4')
    assert t.layer.tolist() == ['C1', 'P1', 'C2', 'c3', 'GAP', 'C4']
    assert t.rf.tolist()[:4] == [3, 4, 12, 12]
    assert t.jump.tolist()[:4] == [1, 2, 2, 4]
    assert t.n_out.tolist()[:4] == [32, 16, 16, 8]
    assert t.p.tolist()[:4] == [1, 0, 2, 0]
    assert total_rf('C1:8 P1 C2:8/d2 c3:8/s2 GAP C4') == 12


def test_s8_rf():
    assert total_rf(S8.spec) == 44  # 3,5,5 | 6 | 10,14,18,18 | 20 | 28,36,44


def test_skip_across_resolution_refused():
    with pytest.raises(ValueError, match='cannot add'): rf_table('C1:8 P1 C2:8+C1 GAP C3')


def test_map_shrunk_to_nothing_refused():
    rf_table('C1:8 P1 P2 P3 P4 P5 GAP O')  # 32 -> 1x1
    with pytest.raises(ValueError, match='P6 turns a 1x1 map into 0x0'): rf_table('C1:8 P1 P2 P3 P4 P5 P6 GAP O')


def test_taps_past_the_map_refused():
    # 4x4 map: d3 and k7 still pair the edge pixels
    rf_table('C1a:16 P1 C2a:16 P2 C3a:16 P3 C4a:16/dw/d3 C4b:16/k7 GAP O')
    for opts, reach in [('/d4', 4), ('/d40', 40), ('/k5/d3', 6), ('/k9', 4)]:
        with pytest.raises(ValueError, match=f'C4a: its outer taps reach {reach} pixels from the centre of a 4x4 map'):
            rf_table(f'C1a:16 P1 C2a:16 P2 C3a:16 P3 C4a:16/dw{opts} GAP O')
    with pytest.raises(ValueError, match='C2: its outer taps reach 1 pixels from the centre of a 1x1 map'):
        rf_table('C1:8 P1 P2 P3 P4 P5 C2:8 GAP O')


def test_rf_of_gap_on_the_input():
    assert total_rf('GAP O') == 1 and total_rf('C1:8 C2:8') == 5


@pytest.mark.parametrize('kw,msg', [
    (dict(max_params=1000), 'parameters'), (dict(min_rf=100), 'receptive field'),
    (dict(need_dilated=True), 'dilated'), (dict(need_separable=True), 'depthwise-separable'),
    (dict(skeleton='C1 C2 GAP C10'), 'skeleton'), (dict(max_epochs=5), 'cap of 5')])
def test_constraint_violations(kw, msg):
    with pytest.raises(ConstraintError, match=msg): Constraints(**kw).check(SpecNet(S8.spec, 'bn'), epochs=20)


@pytest.mark.parametrize('spec,need', [('C1:8 c2:8/d2 GAP O', 'dilated'), ('C1:8 C2:8/k1/d2 GAP O', 'dilated'),
                                       ('C1:8 c2:8/dw GAP O', 'depthwise-separable')])
def test_1x1_convs_are_neither_dilated_nor_separable(spec, need):
    with pytest.raises(ConstraintError, match=need):
        Constraints(need_dilated=need == 'dilated', need_separable=need != 'dilated').check(SpecNet(spec, 'bn'))


@pytest.mark.parametrize('change,msg', [(('C1:16', 'C1:16/k1'), 'layer C1 has /k1'),
                                        (('C2:32', 'C2:32/s2'), 'layer C2 has /s2'),
                                        (('c3:24', 'c3:24/k3'), 'layer c3 has /k3'),
                                        (('C3:24', 'C3:24/d2'), 'layer C3 has /d2'),
                                        (('C4:24', 'C4:24/dw/k5'), 'layer C4 has /k5/dw')])
def test_skeleton_takes_plain_layers(change, msg):
    with pytest.raises(ConstraintError, match=msg + ", but the skeleton's layers take no /options"):
        S8.constraints.check(SpecNet(S8.spec.replace(*change), 'bn'))
    # the letter's own kernel
    S8.constraints.check(SpecNet(S8.spec.replace('C1:16', 'C1:16/k3').replace('c3:24', 'c3:24/k1'), 'bn'))


def test_rf_counts_the_images_pixels_on_a_resized_input():
    net, rule = SpecNet('C1:8 C2:8/d2 C3:8/dw GAP O', 'bn'), Constraints(min_rf=8)  # RF 9
    rule.check(net)
    with pytest.raises(ConstraintError, match='receptive field is 9 px of the 48 px input, 6 px of the image'):
        rule.check(net, size=48)


def test_constraints_pass():
    Constraints(max_params=100_000, min_rf=15, need_dilated=True, need_separable=True, max_epochs=20).check(
        SpecNet('C1:16 P1 C2:32/d2 C3:32/dw GAP C4', 'bn'), epochs=20)


@pytest.mark.parametrize('spec,msg', [
    ('C1a:8 C1b:8 C1c:8/s2 C2a:8 C2b:8/s2 GAP O', 'block C2 has 2 conv layers'),
    ('C1a:8 C1b:8 C1c:8/s2 C2a:8 C2b:8 C2c:8 C3a:8 C3b:8 C3c:8 GAP O', "blocks are 'C1 C2 C3 GAP'"),
    ('C1a:8 P1 C1b:8 C1c:8 C2a:8 C2b:8 C2c:8 GAP O', "blocks are 'C1 P1 C1 C2 GAP'"),
    ('C1a:8 C1b:8 C1c:8 C2a:8 C2b:8 C2c:8 GAP', "blocks are 'C1 C2 GAP' then no head"),
    ('C1a:8 C1b:8 C1c:8 GAP', "blocks are 'C1 GAP' then no head"),
])
def test_block_constraints(spec, msg):
    with pytest.raises(ConstraintError, match=msg):
        Constraints(blocks='C1 C2 GAP', block_convs=3).check(SpecNet(spec, 'bn'))


def test_blocks_from_names():
    from cifar_fa.spec import parse_spec
    assert [l.block for l in parse_spec('C1a:8 c1b:8 P1 C2:8 GAP O')] == ['C1', 'C1', 'P1', 'C2', 'GAP', 'O']
    Constraints(blocks='C1 P1 C2 GAP', block_convs=None).check(SpecNet('C1a:8 c1b:8 P1 C2:8 GAP O', 'bn'))
