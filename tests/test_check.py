"""`python -m cifar_fa.check` on networks written as students write them; params and RFs below are worked by hand."""
import json
import subprocess
import sys

import pytest
from conftest import ROOT

from cifar_fa import SpecNet, count_params, total_rf
from cifar_fa.assignments import ASSIGNMENTS
from cifar_fa.check import check_model, load_model, main
from cifar_fa.registry import get_recipe

STUDENT = '''
import torch.nn as nn
import torch.nn.functional as F


def cb(i, o, k=3, s=1, d=1):  # conv (no bias), BatchNorm, ReLU: 9io + 2o parameters for a 3x3
    return nn.Sequential(nn.Conv2d(i, o, k, stride=s, padding=d * (k // 2), dilation=d, bias=False),
                         nn.BatchNorm2d(o), nn.ReLU())


class SepConv(nn.Module):  # depthwise 3x3, pointwise 1x1, BatchNorm, ReLU
    def __init__(self, i, o, d=1):
        super().__init__()
        self.dw = nn.Conv2d(i, i, 3, padding=d, dilation=d, groups=i, bias=False)
        self.pw = nn.Conv2d(i, o, 1, bias=False)
        self.bn = nn.BatchNorm2d(o)

    def forward(self, x):
        return F.relu(self.bn(self.pw(self.dw(x))))


class S8Net(nn.Module):
    def __init__(self, w=8):
        super().__init__()
        self.C1, self.C2, self.c3 = cb(3, w), cb(w, 2 * w), cb(2 * w, w, 1)
        self.C3, self.C4, self.C5, self.c6 = cb(w, 2 * w), cb(2 * w, 2 * w), cb(2 * w, 2 * w), cb(2 * w, w, 1)
        self.C7, self.C8, self.C9 = cb(w, 2 * w), cb(2 * w, 2 * w), cb(2 * w, 2 * w)
        self.C10 = nn.Conv2d(2 * w, 10, 1)

    def forward(self, x):
        x = F.max_pool2d(self.c3(self.C2(self.C1(x))), 2)
        x3 = self.C3(x)
        x = F.max_pool2d(self.c6(self.C5(self.C4(x3)) + x3), 2)
        return self.C10(F.adaptive_avg_pool2d(self.C9(self.C8(self.C7(x))), 1)).flatten(1)


def s8_wide():
    return S8Net(w=64)


class S7Net(nn.Module):
    def __init__(self, dilation=2):
        super().__init__()
        self.C1 = nn.Sequential(cb(3, 16), cb(16, 32))
        self.C2 = nn.Sequential(cb(32, 32), cb(32, 32))
        self.C3 = nn.Sequential(SepConv(32, 64), SepConv(64, 64, dilation))
        self.C4 = nn.Sequential(SepConv(64, 64), SepConv(64, 64))
        self.O = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(64, 10, 1))

    def forward(self, x):
        x = F.max_pool2d(self.C1(x), 2)
        x = F.max_pool2d(self.C2(x) + x, 2)
        x = F.max_pool2d(self.C3(x), 2)
        return self.O(self.C4(x)).flatten(1)


def s7_undilated():
    return S7Net(dilation=1)


class S9Net(nn.Module):
    def __init__(self, c4=3):
        super().__init__()
        self.C1 = nn.Sequential(cb(3, 16), cb(16, 16), cb(16, 24, s=2))
        self.C2 = nn.Sequential(SepConv(24, 32), SepConv(32, 32), cb(32, 48, s=2))
        self.C3 = nn.Sequential(cb(48, 48, d=2), SepConv(48, 48), cb(48, 64, s=2))
        self.C4 = nn.Sequential(*[SepConv(64, 64) for _ in range(c4)])
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.C4(self.C3(self.C2(self.C1(x)))).mean((2, 3)))


def s9_short_c4():
    return S9Net(c4=2)


class FiveLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 5, 1)

    def forward(self, x):
        return self.c(x).mean((2, 3))


class WrongInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(100, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


class NeedsArgs(nn.Module):
    def __init__(self, width):
        super().__init__()

NOT_A_MODEL = 3
'''


@pytest.fixture(scope='module')
def student(tmp_path_factory):
    f = tmp_path_factory.mktemp('student') / 'nets.py'
    f.write_text(STUDENT)
    return f


# S8Net (w=8): 9io + 2o per 3x3 block, io + 2o per 1x1: C1 232, C2 1,184, c3 144, C3 1,184, C4 2,336, C5 2,336,
# c6 144, C7 1,184, C8 2,336, C9 2,336, C10 170.
# RF: 3 5 5 | P 6 (jump 2) | 10 14 18 (+C3: 18) 18 | P 20 (jump 4) | 28 36 44.
# S7Net: C1 464 + 4,672, C2 2 x 9,280, C3 (288 + 2,048 + 128) + (576 + 4,096 + 128), C4 2 x 4,800, O 650.
# RF: 3 5 | P 6 (2) | 10 14 (+x: 14) | P 16 (4) | 24 24 40 40 (dilation 2) | P 44 (8) | 60 60 76 76.
# S9Net: C1 464 + 2,336 + 3,504, C2 1,048 + 1,376 + 13,920, C3 20,832 + 2,832 + 27,776, C4 3 x 4,800, fc 650.
# RF: 3 5 7 (2) | 11 15 19 (4) | 35 (dilation 2) 43 51 (8) | 67 83 99.
@pytest.mark.parametrize('name,assignment,params,rf', [('S8Net', 's8', 13_586, 44), ('S7Net', 's7', 41_210, 76),
                                                       ('S9Net', 's9', 89_138, 99)])
def test_student_models_pass_their_assignment(student, name, assignment, params, rf):
    r = check_model(load_model(f'{student}:{name}'), ASSIGNMENTS[assignment])
    assert (r['params'], r['rf'], r['violations']) == (params, rf, [])
    assert r['kinds']['gap'] and r['kinds']['classifier']


def test_student_layers_in_execution_order(student):
    r = check_model(load_model(f'{student}:S7Net'), ASSIGNMENTS['s7'])
    rows = [(l['layer'], l['kind'], l['n_in'], l['k'], l['s'], l['dilation'], l['n_out'], l['jump'], l['rf'])
            for l in r['layers']]
    assert rows[:3] == [('C1.0.0', 'conv', 32, 3, 1, 1, 32, 1, 3), ('C1.1.0', 'conv', 32, 3, 1, 1, 32, 1, 5),
                        ('forward.max_pool2d', 'maxpool', 32, 2, 2, 1, 16, 2, 6)]  # a functional call in forward
    assert ('C3.1.dw', 'depthwise', 8, 3, 1, 2, 8, 4, 40) in rows
    assert ('C3.1.pw', 'pointwise', 8, 1, 1, 1, 8, 4, 40) in rows
    assert [l['kind'] for l in r['layers']][-2:] == ['gap', 'classifier']
    assert r['blocks'] == ['C1', 'C2', 'C3', 'C4', 'O']
    assert sum(l['separable'] for l in r['layers']) == 4 and r['kinds']['dilated']


@pytest.mark.parametrize('target,assignment,broken', [
    # w=64: 1,856 + 73,984 + 8,320 + 73,984 + 147,712 x 2 + 8,320 + 73,984 + 147,712 x 2 + 1,290
    ('s8_wide', 's8', 'parameters: 832,586, the assignment allows fewer than 50,000'),
    ('S7Net', 's8', "layers in order: C C P C C P C c C c P C c C c GAP c; "
                    "the assignment's skeleton is C C c P C C C c P C C C GAP c"),
    ('s7_undilated', 's7', 'no dilated conv (dilation > 1, kernel above 1x1)'),
    ('s9_short_c4', 's9', 'block C4 has 2 conv layers; the assignment needs 3'),
    ('S8Net', 's9', 'no depthwise-separable conv (a depthwise conv with a kernel above 1x1, then a 1x1 conv)'),
    ('S8Net', 's7', 'conv blocks before the output block: C1, C2, c3, C3, C4, C5, c6, C7, C8, C9; '
                    'the assignment needs 4')])
def test_broken_rules_are_named(student, target, assignment, broken):
    assert any(v.startswith(broken) for v in check_model(load_model(f'{student}:{target}'), ASSIGNMENTS[assignment])
               ['violations'])


@pytest.mark.parametrize('recipe', ['s7', 's8', 's9'])
def test_spec_models_agree_with_the_spec_machinery(recipe):
    spec = get_recipe(recipe).spec
    model = SpecNet(spec, 'gn')
    r = check_model(model, ASSIGNMENTS[recipe])
    assert (r['params'], r['rf'], r['violations']) == (count_params(model), total_rf(spec), [])


def check(*args):
    return subprocess.run([sys.executable, '-m', 'cifar_fa.check', *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_command_line_exit_codes_and_json(student):
    r = check(f'{student}:S8Net', '--assignment', 's8')
    assert r.returncode == 0 and '13,586 parameters, receptive field 44' in r.stdout, r.stderr
    assert 'every rule of S8 holds' in r.stdout and 'jump' in r.stdout and 'rf' in r.stdout
    r = check(f'{student}:s7_undilated', '--assignment', 's7', '--json')
    assert r.returncode == 1, r.stderr
    report = json.loads(r.stdout)
    assert report['violations'] == ['no dilated conv (dilation > 1, kernel above 1x1)']
    assert isinstance(report['rf'], int) and isinstance(report['params'], int)
    assert {'n_in', 'k', 'p', 's', 'n_out', 'jump', 'rf'} <= set(report['layers'][0])


@pytest.mark.parametrize('target,message', [
    ('{d}/nope.py:Net', '{d}/nope.py does not exist'),
    ('{f}:Missing', '{f} has no Missing'),
    ('{f}', "'{f}' is not FILE.py:NAME"),
    ('{f}:NOT_A_MODEL', 'NOT_A_MODEL in {f} is neither an nn.Module subclass nor a function returning one'),
    ('{f}:NeedsArgs', "building NeedsArgs() failed: TypeError:"),
    ('{f}:WrongInput', 'the model fails on a 1x3x32x32 input: RuntimeError:'),
    ('{f}:FiveLogits', 'the model outputs shape [1, 5] for one image; it must output 10 logits'),
    ('{d}/broken.py:Net', 'importing {d}/broken.py failed: ZeroDivisionError: division by zero')])
def test_bad_input_is_one_line(student, target, message, cli):
    (student.parent / 'broken.py').write_text('x = 1 / 0\n')
    fill = dict(d=student.parent, f=student)
    r = cli(main, target.format(**fill), '--assignment', 's8')
    assert r.returncode == 2 and r.stderr.startswith(f'error: {message.format(**fill)}'), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr


def test_a_norm_between_depthwise_and_pointwise_keeps_them_a_pair():
    import torch.nn as nn
    m = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 8, 1),
                      nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 10, 1), nn.Flatten())
    r = check_model(m, ASSIGNMENTS['s9'])
    assert [l['kind'] for l in r['layers']] == ['depthwise', 'pointwise', 'gap', 'classifier']
    assert r['kinds']['depthwise_separable']
    m[3] = nn.Conv2d(3, 8, 3, padding=1)  # a full 3x3 after the depthwise conv: no separable pair
    assert not check_model(m, ASSIGNMENTS['s9'])['kinds']['depthwise_separable']
