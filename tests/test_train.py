import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn
from conftest import CLASSES, ROOT
from fastai.learner import load_learner
from PIL import Image

from cifar_fa import RunConfig, build_learner, run
from cifar_fa.config import RunError
from cifar_fa.data import DataError, data_fingerprint
from cifar_fa.report import results_table
from cifar_fa.runs import load_run, review_run
from recipes.s8_norms import RECIPE as S8

REVIEW = ROOT / 'recipes' / 'review.py'

ARTIFACTS = ['config.json', 'summary.txt', 'history.csv', 'curves.png', 'misclassified.png', 'top_losses.png',
             'confusion.png', 'metrics.json', 'model.pkl', 'model.pth']


@pytest.fixture(scope='module')
def trained(synth, tmp_path_factory):
    """A short real training on the synthetic set, with its run folder."""
    # bn: per-sample norms erase the flat colours that tell these classes apart
    out = tmp_path_factory.mktemp('run') / 's8_bn'
    # lr 3e-3: 70-80 % test accuracy with 1 to 4 threads; at 1e-2 one thread count ended at 42.5 %
    cfg = RunConfig('s8', norm='bn', epochs=4, bs=16, lr=3e-3, workers=0, device='cpu', data=str(synth), out=str(out))
    return run(replace(S8, tta=True), cfg), out


def test_training_beats_chance(trained):
    metrics, out = trained
    assert metrics['test_accuracy'] >= 0.5  # chance is 0.1
    hist = pd.read_csv(out / 'history.csv')
    assert list(hist.columns) == ['epoch', 'train_loss', 'train_accuracy', 'valid_loss', 'valid_accuracy', 'time']
    assert len(hist) == 4 and hist.train_loss.iloc[-1] < hist.train_loss.iloc[0]
    assert metrics['test_accuracy'] == pytest.approx(hist.valid_accuracy.iloc[-1], abs=1e-6)  # last epoch, no selection


def test_run_folder_complete(trained):
    metrics, out = trained
    for name in ARTIFACTS: assert (out / name).stat().st_size > 0, name
    for png in out.glob('*.png'): Image.open(png).verify()
    m = json.loads((out / 'metrics.json').read_text())
    assert m['params'] == metrics['params'] < 50_000 and m['rf'] == 44 and m['epochs'] == 4
    assert set(m['per_class_accuracy']) == set(CLASSES) and 'device' in m and m['wall_seconds'] > 0
    assert 0 <= m['flip_tta_test_accuracy'] <= 1  # recipes with tta=True report it beside the plain accuracy
    t = m['timings']  # where the wall time went, stage by stage
    assert list(t) == ['startup', 'model', 'data', 'dataloaders', 'setup', 'review', 'tta', 'export', 'train', 'valid',
                       'fit_other'] and all(v >= 0 for v in t.values())
    assert t['train'] > t['valid'] > 0 and sum(t.values()) - t['startup'] <= m['wall_seconds'] + 0.1
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['norm'] == 'bn' and cfg['seed'] == 42 and 'torch' in cfg['versions']
    fp = data_fingerprint(Path(cfg['data_path']))  # of the full splits: the same with --subset
    assert (m['data_fingerprint'] == cfg['data_fingerprint'] == fp
            and m['data_name'] == f"other data ({fp['train'][:8]})")
    summary = (out / 'summary.txt').read_text()
    assert 'receptive field' in summary and 'jump' in summary and f"{m['params']:,}" in summary


def test_misclassified_grid_takes_each_true_class_in_turn():
    from types import SimpleNamespace

    from cifar_fa.interpret import plot_misclassified
    targs = torch.arange(3).repeat_interleave(20)  # sorted by class, as the test split is
    probs = torch.nn.functional.one_hot((targs + 1) % 3, 3).float() * .7 + .1  # every image wrong, confidence 0.8
    interp = SimpleNamespace(vocab=['cat', 'dog', 'emu'], dl=SimpleNamespace(dataset=[(torch.rand(3, 32, 32), 0)] * 60))
    titles = [ax.get_title() for ax in plot_misclassified(interp, probs, targs, 'x').axes if ax.get_title()]
    assert [t.split()[1] for t in titles] == ['cat', 'dog', 'emu'] * 3 + ['cat'] and 'pred: dog (0.80)' in titles[0]


def test_review_reads_the_test_split_once_and_agrees_with_fastai(trained, tmp_path, monkeypatch):
    from fastai.interpret import ClassificationInterpretation

    from cifar_fa.interpret import Interpretation, review
    learn = load_run(trained[1], weights=trained[1] / 'model.pth')  # rebuilt with its data
    ours, theirs = Interpretation.from_learner(learn), ClassificationInterpretation.from_learner(learn)
    assert (ours.confusion_matrix() == theirs.confusion_matrix()).all() and ours.confusion_matrix().sum() == 40
    assert ours.most_confused() == theirs.most_confused() and torch.allclose(ours.losses, theirs.losses)
    passes, get_preds = [], learn.get_preds

    def counted(*args, dl=None, **kw):
        passes.append(len(dl.dataset))
        return get_preds(*args, dl=dl, **kw)

    monkeypatch.setattr(learn, 'get_preds', counted)
    metrics = review(learn, tmp_path, 'x', k=4)
    assert passes.count(40) == 1 and metrics['n_test'] == 40  # the rest: the 4 top losses' images
    assert metrics['test_accuracy'] == pytest.approx(float(ours.confusion_matrix().trace()) / 40)


def test_export_roundtrip_in_fresh_process(trained, synth):
    _, out = trained
    img = sorted((synth / 'test' / CLASSES[3]).iterdir())[0]
    learn = load_learner(out / 'model.pkl')
    assert not hasattr(learn.recorder, 'hps')  # no per-step schedule in the file: history.csv has the epochs
    assert all(list(tl.splits) == [slice(None), []] for dl in learn.dls.loaders for tl in dl.dataset.tls)
    live = learn.predict(img)
    code = (f"from fastai.learner import load_learner; import cifar_fa; "
            f"p = load_learner({str(out / 'model.pkl')!r}).predict({str(img)!r}); print(p[0], float(p[2].max()))")
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    label, conf = res.stdout.split()
    assert label == live[0] and abs(float(conf) - float(live[2].max())) < 1e-5 and label in CLASSES


def test_flip_tta_blends_plain_and_mirrored_predictions(synth):
    from cifar_fa.interpret import flip_tta

    class LeftMinusRight(nn.Module):
        """Logits from the left half's mean colour minus the right half's: a mirror image negates what the head sees."""
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, 10)

        def forward(self, x): return self.head(x[..., :16].mean((2, 3)) - x[..., 16:].mean((2, 3)))

    learn = build_learner(S8, RunConfig('s8', norm='bn', bs=16, workers=0, device='cpu', data=str(synth)))
    torch.manual_seed(0)
    learn.model = LeftMinusRight()
    # the halves of these noisy flat colours differ by a few hundredths: large weights make that a clear preference
    nn.init.normal_(learn.model.head.weight, std=30.)
    probs, targs = flip_tta(learn)
    plain, plain_targs = learn.get_preds()
    learn.model.eval()
    with torch.no_grad(): mirrored = torch.cat([learn.model(x.flip(-1)).softmax(1) for x, _ in learn.dls.valid])
    assert (targs == plain_targs).all() and ((plain * mirrored).sqrt() - (plain + mirrored) / 2).abs().max() > 1e-3
    assert (probs - (plain + mirrored) / 2).abs().max() < 1e-6  # fastai's tta with beta 0.5: the probabilities' mean


def test_group_norm_weights_get_no_weight_decay(synth):
    cfg = RunConfig('s8', norm='gn', epochs=1, bs=16, workers=0, device='cpu', data=str(synth), subset=2)
    learn = build_learner(S8, cfg)
    learn.fit(1, 1e-3)
    gn = [p for m in learn.model.modules() if isinstance(m, nn.GroupNorm) for p in m.parameters()]
    conv = [m.weight for m in learn.model.modules() if isinstance(m, nn.Conv2d)]
    assert gn and all(learn.opt.state[p]['do_wd'] is False for p in gn)
    assert all(learn.opt.state[p].get('do_wd', True) for p in conv)


def test_interrupted_run_resumes_to_the_same_history(synth, tmp_path, monkeypatch):
    from cifar_fa.callbacks import EpochCheckpoint
    save = EpochCheckpoint.after_epoch

    def interrupt_after_epoch_1(self):
        save(self)
        if self.epoch == 1: raise KeyboardInterrupt

    kw = dict(norm='bn', epochs=4, bs=16, lr=1e-2, workers=0, device='cpu', data=str(synth))
    full = run(S8, RunConfig('s8', out=str(tmp_path / 'full'), **kw))
    monkeypatch.setattr(EpochCheckpoint, 'after_epoch', interrupt_after_epoch_1)
    with pytest.raises(KeyboardInterrupt): run(S8, RunConfig('s8', out=str(tmp_path / 'cut'), **kw))
    assert not (tmp_path / 'cut' / 'metrics.json').exists()
    monkeypatch.setattr(EpochCheckpoint, 'after_epoch', save)
    resumed = run(S8, RunConfig('s8', out=str(tmp_path / 'cut'), resume=True, **kw))
    h_full, h_cut = (pd.read_csv(tmp_path / d / 'history.csv') for d in ('full', 'cut'))
    assert h_cut.epoch.tolist() == [0, 1, 2, 3] and resumed['epochs'] == full['epochs'] == 4
    pd.testing.assert_frame_equal(h_full.drop(columns='time'), h_cut.drop(columns='time'))  # RNG states were restored
    other = shutil.copytree(synth, tmp_path / 'other')
    next((other / 'test' / CLASSES[0]).iterdir()).unlink()
    with pytest.raises(RunError, match=r"was trained on other data \(.*\), not on the data given \(other data"):
        run(S8, RunConfig('s8', out=str(tmp_path / 'cut'), resume=True, **{**kw, 'data': str(other)}))
    row = results_table([tmp_path / 'cut']).splitlines()[-1]
    assert (resumed['resumed'] and f"{resumed['epoch_seconds'] / 60:.1f} min of epochs (" in row
            and 'resumed invocation' in row)


def test_ema_warms_up_its_decay():
    from torch.optim.swa_utils import AveragedModel

    from cifar_fa.callbacks import ema_update
    live = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(live, multi_avg_fn=ema_update(.999), use_buffers=True)
    for w in (1., 2., 4.):
        live.weight.data.fill_(w)
        ema.update_parameters(live)
    # the first update copies; then decays of 2/11 and 3/12, not 0.999: the first weights fade at once
    assert ema.module.weight.item() == pytest.approx((2 / 11 * 1 + 9 / 11 * 2) * 3 / 12 + 9 / 12 * 4)


def test_ema_validates_and_exports_the_average_of_the_weights(synth):
    from fastai.callback.core import Callback

    from cifar_fa.callbacks import WeightsEMA

    class LastWeights(Callback):
        order = 1  # after WeightsEMA has read them

        def after_step(self): self.state = {k: v.clone() for k, v in self.learn.model.state_dict().items()}

    cfg = RunConfig('s8', norm='bn', epochs=2, bs=16, workers=0, device='cpu', data=str(synth), subset=4)
    for decay in (0., .5):  # 0: the average is the last step's weights
        learn = build_learner(S8, cfg)
        last = LastWeights()
        learn.fit(2, 1e-2, cbs=[WeightsEMA(decay), last])
        after = learn.model.state_dict()
        trained = {k: (after[k] - v).abs().max() for k, v in last.state.items() if v.is_floating_point()}
        if decay == 0: assert max(trained.values()) == 0
        else: assert min(trained.values()) > 0  # every weight and norm buffer is the average's, not the last step's
        # the last epoch validated the average
        assert learn.recorder.values[-1][2] == pytest.approx(learn.validate()[0], rel=1e-5)


@pytest.mark.parametrize('setting,other,was', [(dict(ema=0.9), dict(ema=0.), '--ema 0.9'),
                                               (dict(lookahead=True), dict(lookahead=False), '--lookahead'),
                                               (dict(bias_lr=4.), dict(bias_lr=1.), '--bias-lr 4')])
def test_run_with_state_beside_the_weights_resumes_to_the_same_history(setting, other, was, synth, tmp_path,
                                                                        monkeypatch):
    from cifar_fa.callbacks import EpochCheckpoint
    save = EpochCheckpoint.after_epoch

    def interrupt_after_epoch_0(self):
        save(self)
        raise KeyboardInterrupt

    # 15 steps an epoch: Lookahead's 6-step cycle is mid-way when epoch 0 ends
    kw = dict(norm='bn', epochs=3, bs=16, lr=1e-2, workers=0, device='cpu', data=str(synth), subset=6, **setting)
    full = run(S8, RunConfig('s8', out=str(tmp_path / 'full'), **kw))
    monkeypatch.setattr(EpochCheckpoint, 'after_epoch', interrupt_after_epoch_0)
    with pytest.raises(KeyboardInterrupt): run(S8, RunConfig('s8', out=str(tmp_path / 'cut'), **kw))
    assert (tmp_path / 'cut' / 'checkpoints' / 'last.ema.pth').exists() == ('ema' in setting)
    monkeypatch.setattr(EpochCheckpoint, 'after_epoch', save)
    resumed = run(S8, RunConfig('s8', out=str(tmp_path / 'cut'), resume=True, **kw))
    h_full, h_cut = (pd.read_csv(tmp_path / d / 'history.csv') for d in ('full', 'cut'))
    pd.testing.assert_frame_equal(h_full.drop(columns='time'), h_cut.drop(columns='time'))
    assert resumed['test_accuracy'] == full['test_accuracy']
    with pytest.raises(RunError, match=f'was trained with {was};'):
        run(S8, RunConfig('s8', out=str(tmp_path / 'cut'), resume=True, **{**kw, **other}))


def test_bias_lr_trains_the_norm_biases_alone_at_its_multiple_of_the_rate(synth):
    from fastai.callback.core import Callback

    class Rates(Callback):
        def after_step(self): self.seen = [h['lr'] for h in self.opt.hypers]

    cfg = RunConfig('s8', norm='gn', bias_lr=4., epochs=1, bs=16, workers=0, device='cpu', data=str(synth), subset=4)
    learn, rates = build_learner(S8, cfg), Rates()
    before = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    learn.fit_one_cycle(1, 1e-2, cbs=rates)
    biases = {id(m.bias) for m in learn.model.modules() if isinstance(m, torch.nn.GroupNorm)}
    fast = learn.opt.param_lists[0]
    assert len(fast) == len(biases) > 0 and {id(p) for p in fast} == biases
    assert rates.seen[0] == pytest.approx(4 * rates.seen[1]) and learn.recorder.lrs[-1] == rates.seen[1]
    assert all(not torch.equal(p, before[n]) for n, p in learn.model.named_parameters())  # every group trained


def test_nesterov_steps_as_torch_sgd_with_nesterov_and_l2():
    from cifar_fa.config import OPTIMIZERS
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    theirs.data.copy_(ours.data)
    opt = OPTIMIZERS['nesterov']([ours], lr=.1, wd=5e-4)
    ref = torch.optim.SGD([theirs], lr=.1, momentum=.9, nesterov=True, weight_decay=5e-4)
    plain = OPTIMIZERS['sgd']([torch.nn.Parameter(ours.data.clone())], lr=.1, wd=5e-4)
    for _ in range(4):
        g = torch.randn(5)
        ours.grad, theirs.grad, plain.param_lists[0][0].grad = g.clone(), g.clone(), g.clone()
        opt.step(), ref.step(), plain.step()
    torch.testing.assert_close(ours.data, theirs.data)
    assert not torch.allclose(ours.data, plain.param_lists[0][0].data)  # not plain momentum under another name


def test_lookahead_moves_the_weights_back_every_k_steps():
    from functools import partial

    from fastai.optimizer import SGD

    from cifar_fa.optim import lookahead
    p = torch.nn.Parameter(torch.zeros(3))
    opt = lookahead(partial(SGD, mom=0.), k=2, alpha=.5)([p], lr=1.)
    for x in (1., 1., 2.):  # SGD alone: 1, 2, 3; the 2nd step's 2 is pulled half way back to 0, and SGD goes on from 1
        p.grad = -torch.ones(3)
        opt.step()
        assert torch.equal(p.data, torch.full((3,), x))
    assert opt.state_dict()['count'] == 3 and type(opt.state_dict()['slow_weights']) is list


def test_whiten_sets_the_first_conv_of_a_fresh_run_only(synth, tmp_path, monkeypatch):
    from cifar_fa.callbacks import EpochCheckpoint
    from cifar_fa.models import SpecNet
    save, init, seen = EpochCheckpoint.after_epoch, SpecNet.init_whitening, []

    def interrupt_after_epoch_0(self):
        save(self)
        raise KeyboardInterrupt

    def record(model, images):
        seen.append(images)
        init(model, images)

    monkeypatch.setattr(SpecNet, 'init_whitening', record)
    monkeypatch.setattr(EpochCheckpoint, 'after_epoch', interrupt_after_epoch_0)
    kw = dict(norm='gn', ws=True, whiten=True, epochs=2, bs=16, lr=1e-2, workers=0, device='cpu', data=str(synth),
              subset=4)
    with pytest.raises(KeyboardInterrupt): run(S8, RunConfig('s8', out=str(tmp_path / 'cut'), **kw))
    assert len(seen) == 1 and seen[0].shape == (32, 3, 32, 32)  # both training batches of 16 (40 images, last dropped)
    assert abs(float(seen[0].mean())) < 1  # normalized, as the network sees them
    monkeypatch.setattr(EpochCheckpoint, 'after_epoch', save)
    run(S8, RunConfig('s8', out=str(tmp_path / 'cut'), resume=True, **kw))
    assert len(seen) == 1  # the resumed run keeps its trained first conv
    assert 'first conv started as a patch whitening' in (tmp_path / 'cut' / 'summary.txt').read_text()


def test_ctrl_c_while_a_checkpoint_is_written_waits_for_it(synth, tmp_path, monkeypatch):
    import cifar_fa.callbacks as cbs
    replace_file, weights_saved = os.replace, []

    def ctrl_c_between_the_two_files(src, dst):
        replace_file(src, dst)
        if Path(dst).name == 'last.pth':
            weights_saved.append(dst)
            # epoch 1's weights are in place, its number not yet
            if len(weights_saved) == 2: signal.raise_signal(signal.SIGINT)

    kw = dict(norm='bn', epochs=3, bs=16, lr=1e-2, workers=0, device='cpu', data=str(synth), subset=4)
    full = run(S8, RunConfig('s8', out=str(tmp_path / 'full'), **kw))
    monkeypatch.setattr(cbs.os, 'replace', ctrl_c_between_the_two_files)
    with pytest.raises(KeyboardInterrupt): run(S8, RunConfig('s8', out=str(tmp_path / 'cut'), **kw))
    monkeypatch.setattr(cbs.os, 'replace', replace_file)
    # not 0 beside epoch 1's weights
    assert json.loads((tmp_path / 'cut' / 'checkpoints' / 'last.json').read_text())['epoch'] == 1
    resumed = run(S8, RunConfig('s8', out=str(tmp_path / 'cut'), resume=True, **kw))
    h_full, h_cut = (pd.read_csv(tmp_path / d / 'history.csv') for d in ('full', 'cut'))
    pd.testing.assert_frame_equal(h_full.drop(columns='time'), h_cut.drop(columns='time'))
    assert resumed['test_accuracy'] == full['test_accuracy']


def test_run_stopped_before_its_first_epoch_restarts_with_overwrite(synth, tmp_path):
    out = tmp_path / 'run'
    (out / 'checkpoints').mkdir(parents=True)
    (out / 'checkpoints' / '_tmp.pth').touch()  # what an interrupted lr_find leaves
    kw = dict(epochs=1, bs=16, workers=0, device='cpu', data=str(synth), subset=2, out=str(out))
    with pytest.raises(RunError, match='already holds a run'): run(S8, RunConfig('s8', **kw))
    with pytest.raises(RunError, match='no epoch finished.*--overwrite'): run(S8, RunConfig('s8', resume=True, **kw))
    assert run(S8, RunConfig('s8', overwrite=True, **kw))['epochs'] == 1


def test_flag_spells_every_digit():
    from cifar_fa.config import flag
    # the results table's commands
    assert [flag('lr', 0.1234567), flag('wd', 1.23456789e-4), flag('dropout', 0.), flag('wd', 5e-4),
            flag('ws', False)] == ['--lr 0.1234567', '--wd 0.000123456789', '--dropout 0', '--wd 0.0005', '--no-ws']


def _touch(f: Path) -> None:
    f.parent.mkdir(parents=True, exist_ok=True)
    f.touch()


def test_overwrite_replaces_only_a_run_folder(synth, tmp_path, monkeypatch):
    kw = dict(epochs=1, bs=16, workers=0, device='cpu', data=str(synth), subset=2, overwrite=True)
    (tmp_path / 'runs' / 's8_bn').mkdir(parents=True)
    (tmp_path / 'runs' / 's8_bn' / 'config.json').write_text('{}')
    # --out runs, meant for --norm all
    with pytest.raises(RunError, match=r'runs is not a run folder \(it holds s8_bn\)'):
        run(S8, RunConfig('s8', out=str(tmp_path / 'runs'), **kw))
    (tmp_path / 'notes.txt').touch()
    monkeypatch.chdir(tmp_path / 'runs' / 's8_bn')
    with pytest.raises(RunError, match='it holds the current folder'): run(S8, RunConfig('s8', out='.', **kw))
    assert (tmp_path / 'notes.txt').exists() and (tmp_path / 'runs' / 's8_bn' / 'config.json').read_text() == '{}'
    monkeypatch.chdir(tmp_path)
    for name, files, why in [('logs', ['a.log', 'b.log'], 'it holds only logs'),
                             ('dirlog', ['config.json', 'data.log/keep.csv'], 'it holds data.log'),
                             ('foreign', ['config.json', 'checkpoints/best.pt'], 'it holds checkpoints')]:
        for f in files: _touch(tmp_path / name / f)
        with pytest.raises(RunError, match=f'{name} is not a run folder \\({why}'):
            run(S8, RunConfig('s8', out=name, **kw))
        assert all((tmp_path / name / f).exists() for f in files)
    (tmp_path / 'link').symlink_to(tmp_path / 'runs' / 's8_bn')
    with pytest.raises(RunError, match='it is a symbolic link'): run(S8, RunConfig('s8', out='link', **kw))
    for f in ('train.log', '.DS_Store', 'checkpoints/last.pth', 'checkpoints/_tmp.pth'):
        _touch(tmp_path / 'runs' / 's8_bn' / f)
    # a run folder (logs and clutter beside it) is replaced
    assert run(S8, RunConfig('s8', out='runs/s8_bn', **kw))['epochs'] == 1


def test_lr_find_picks_valley_and_saves_plot(synth, tmp_path):
    m = run(S8, RunConfig('s8', norm='gn', ws=True, epochs=1, bs=16, lr='find', workers=0, device='cpu',
                          data=str(synth), out=str(tmp_path / 'run')))
    cfg = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert cfg['ws'] and 'weight-standardized' in (tmp_path / 'run' / 'summary.txt').read_text()
    assert any(type(mod).__name__ == 'WSConv2d' for mod in load_learner(tmp_path / 'run' / 'model.pkl').model.modules())
    assert cfg['lr'] == 'find' and isinstance(cfg['lr_used'], float) and 1e-7 < cfg['lr_used'] < 10
    assert (tmp_path / 'run' / 'lr_find.png').stat().st_size > 1000 and m['epochs'] == 1


def test_a_run_older_than_a_setting_was_trained_at_the_settings_default(trained, synth, tmp_path):
    old = shutil.copytree(trained[1], tmp_path / 'old')
    cfg = json.loads((old / 'config.json').read_text())
    del cfg['whiten'], cfg['lookahead']  # settings added after this run was made
    (old / 'config.json').write_text(json.dumps(cfg))
    full = results_table([old], full_commands=True)
    assert '--ema 0 --no-lookahead --dropout 0' in full and '--no-whiten' in full
    kw = dict(norm='bn', epochs=4, bs=16, lr=3e-3, workers=0, device='cpu', data=str(synth), out=str(old), resume=True)
    with pytest.raises(RunError, match='was trained with --no-whiten;'): run(S8, RunConfig('s8', whiten=True, **kw))


def test_readme_table_from_run_folders(trained, tmp_path):
    from cifar_fa.report import BEGIN, END, comparison_figure, write_comparison
    _, out = trained
    readme = tmp_path / 'README.md'
    readme.write_text(f'# x\n{BEGIN}\nold\n{END}\ntail\n')
    r = subprocess.run([sys.executable, '-m', 'cifar_fa.report', '--readme', str(readme), str(out)],
                       capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': str(ROOT)})
    assert r.returncode == 0 and 'Warning' not in r.stderr, r.stderr  # the README's command, without runpy's warning
    text = readme.read_text()
    acc = json.loads((out / 'metrics.json').read_text())['test_accuracy']
    assert '\nold\n' not in text and f'{100 * acc:.2f} %' in text and text.endswith('tail\n')
    assert '| data |' in text and (
        f"` | other data ({json.loads((out / 'metrics.json').read_text())['data_fingerprint']['train'][:8]}) |" in text)
    # the README's commands name what differs from the recipe's defaults; --full-commands spells out every setting
    assert ('`recipes/s8_norms.py --norm bn --opt adam --lr 0.003 --wd 0.01 --bs 16 --epochs 4 '
            '--label-smoothing 0` |') in text
    full = results_table([out], full_commands=True)
    assert ('`recipes/s8_norms.py --norm bn --opt adam --lr 0.003 --wd 0.01 --bs 16 --epochs 4 --label-smoothing 0 '
            '--ema 0 --no-lookahead --dropout 0 --no-ws --act relu --no-whiten --size 32 --no-batch-augs --bias-lr 1 '
            '--seed 42` |'
            ) in full
    # linked from the README's folder
    assert f'[{out.name}]({Path(os.path.relpath(out, tmp_path)).as_posix()}/)' in text
    assert "not the recipe file's" not in text
    r = subprocess.run([sys.executable, '-m', 'cifar_fa.report', '--readme', str(readme), str(out), str(tmp_path)],
                       capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': str(ROOT)})
    assert (r.returncode == 2
            and r.stderr == f'error: {tmp_path}: no metrics.json, not a finished run folder\n'), r.stderr
    assert readme.read_text() == text
    trial = tmp_path / 'trial'
    trial.mkdir()
    (trial / 'metrics.json').write_text((out / 'metrics.json').read_text())
    cfg = json.loads((out / 'config.json').read_text())
    spec = cfg['spec'].replace(':', ':2', 1)
    (trial / 'config.json').write_text(json.dumps({**cfg, 'spec': spec}))
    # a network trial is reproducible as is
    assert f"--size 32 --no-batch-augs --bias-lr 1 --seed 42 --spec '{spec}'`" in results_table([trial])
    (trial / 'config.json').write_text(json.dumps({**cfg, 'augs': cfg['augs'][:-1]}))
    assert "--seed 42` (AUGS not the recipe file's: see its config.json and train.log)" in results_table([trial])
    fig = comparison_figure([out], 'one run')
    assert fig.axes[0].get_legend_handles_labels()[1] == [f'{out.name}: bn, bs 16 ({100 * acc:.2f} %)']
    write_comparison([out], tmp_path / 'cmp_lr0.01', 'one run')
    assert ('![test accuracy](cmp_lr0.01.png)' in (tmp_path / 'cmp_lr0.01.md').read_text()
            and (tmp_path / 'cmp_lr0.01.png').exists())


def test_review_script(trained, synth, tmp_path, cli, monkeypatch):
    metrics, out = trained
    before = {f: (out / f).stat().st_mtime_ns for f in ('top_losses.png', 'misclassified.png', 'confusion.png')}
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    review = [sys.executable, str(ROOT / 'recipes' / 'review.py'), str(out)]
    r = subprocess.run([*review, '--k', '4', '--tta', '--gradcam'], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert f"{100 * metrics['test_accuracy']:.2f} %" in r.stdout and CLASSES[9] in r.stdout
    assert f"with flip TTA {100 * metrics['flip_tta_test_accuracy']:.2f} %" in r.stdout  # same figure as the run's own
    assert all((out / f).stat().st_mtime_ns > t for f, t in before.items())
    Image.open(out / 'gradcam.png').verify()
    fewer = shutil.copytree(synth, tmp_path / 'fewer')
    next((fewer / 'test' / CLASSES[0]).iterdir()).unlink()
    r = subprocess.run([*review, '--k', '4', '--data', str(fewer)], capture_output=True, text=True, env=env)
    assert (r.returncode == 0 and r.stderr.startswith('warning: ')
            and 'is not the one this run was measured on' in r.stderr), r.stderr
    monkeypatch.setattr(warnings, 'formatwarning', warnings.formatwarning)  # review.py sets its own
    img = tmp_path / 'odd.png'
    Image.open(sorted((synth / 'test' / CLASSES[5]).iterdir())[0]).convert('L').resize((48, 40)).save(img)
    for extra in ([], ["--weights", str(out / "model.pth")]):
        r = cli(REVIEW, out, '--image', img, *extra)
        assert r.returncode == 0, r.stderr
        rows = [l.split() for l in r.stdout.strip().splitlines()]
        assert len(rows) == 3 and all(c in CLASSES and 0 <= float(p) <= 1 for c, p in rows)
    r = cli(REVIEW, out, '--k', '0')
    assert r.returncode == 2 and 'argument --k: must be positive' in r.stderr, r.stderr
    r = cli(REVIEW, tmp_path)  # not a run folder
    assert (r.returncode == 2
            and r.stderr.startswith(f"error: {tmp_path / 'config.json'} does not exist; pass a finished run")), r.stderr


def test_review_finds_the_data_or_says_why(trained, synth, tmp_path, monkeypatch):
    moved = shutil.copytree(trained[1], tmp_path / 'moved')  # as a committed run on another machine
    cfg = json.loads((moved / 'config.json').read_text())
    (moved / 'config.json').write_text(json.dumps({**cfg, 'data_path': str(tmp_path / 'gone')}))
    monkeypatch.delenv('CIFAR10_DIR', raising=False)
    with pytest.raises(DataError, match='is not on this machine; pass --data or set CIFAR10_DIR'): review_run(moved)
    monkeypatch.setenv('CIFAR10_DIR', str(synth))
    assert review_run(moved, k=4)['test_accuracy'] == trained[0]['test_accuracy']
    other = shutil.copytree(synth, tmp_path / 'other')
    for split in ('train', 'test'): (other / split / CLASSES[0]).rename(other / split / 'zebra')
    with pytest.raises(DataError, match='but the run learned class0'): review_run(moved, data=str(other))
    fewer = shutil.copytree(synth, tmp_path / 'fewer')
    next((fewer / 'test' / CLASSES[0]).iterdir()).unlink()
    with pytest.warns(UserWarning, match="'s test split .* is not the one this run was measured on"):
        review_run(moved, k=4, data=str(fewer), weights=moved / 'model.pth')  # model.pkl: fastai warns of pickle
    with pytest.raises(DataError, match='zebra, but the run learned class0'):  # rebuilt from plain weights and the data
        load_run(moved, weights=moved / 'model.pth', data=str(other))


def test_plain_weights_rebuild_the_runs_network(synth, tmp_path):
    out = tmp_path / 'gn'
    run(S8, RunConfig('s8', norm='gn', ws=True, epochs=1, bs=16, workers=0, device='cpu', data=str(synth),
                      out=str(out)))
    pickled, rebuilt = load_run(out).model.eval(), load_run(out, weights=out / 'model.pth').model.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), pickled(x))  # a plain conv with the same weights would load without error


def test_a_cpu_run_on_a_gpu_machine_leaves_the_gpus_alone(synth, monkeypatch):
    from cifar_fa.callbacks import epoch_state, set_epoch_state
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)  # --device cpu where CUDA is present (none is here)
    learn = build_learner(S8, RunConfig('s8', bs=16, workers=0, device='cpu', data=str(synth), subset=2))
    state = epoch_state(learn)
    assert 'cuda' not in state and learn.dls.after_batch.fs[-1].mean.device.type == 'cpu'
    set_epoch_state(learn, {**state, 'cuda': [[0] * 16] * 8})  # a checkpoint of an 8-GPU machine, resumed on the CPU


def test_deterministic_flag_sets_cudnn_for_the_run(synth, monkeypatch):
    from cifar_fa.cli import config_from_args
    monkeypatch.setattr(torch.backends.cudnn, 'deterministic', torch.backends.cudnn.deterministic)
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', torch.backends.cudnn.benchmark)
    for argv, fast in (([], False), (['--no-deterministic'], True), (['--deterministic'], False)):
        cfg = config_from_args(S8, [*argv, '--workers', '0', '--device', 'cpu', '--data', str(synth), '--bs', '8'])
        build_learner(S8, cfg)
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (fast, not fast)


def test_sgd_keeps_momentum_and_uses_l2(synth):
    cfg = RunConfig('s8', norm='bn', opt='sgd', lr=0.1, wd=5e-4, bs=16, workers=0, device='cpu', data=str(synth),
                    subset=2)
    learn = build_learner(S8, cfg)
    learn.fit_one_cycle(1, cfg.lr)
    conv = next(m.weight for m in learn.model.modules() if isinstance(m, nn.Conv2d))
    assert 'grad_avg' in learn.opt.state[conv]  # fastai's SGD drops momentum unless built with some
    assert [cb.__name__ for cb in learn.opt.cbs][0] == 'l2_reg' and learn.opt.hypers[0]['wd'] == 5e-4


def test_nan_loss_stops_with_advice(synth):
    from cifar_fa.callbacks import DivergedError
    learn = build_learner(S8, RunConfig('s8', bs=16, workers=0, device='cpu', data=str(synth), subset=2))
    learn.loss_func = lambda out, y: out.sum() * float('nan')
    with pytest.raises(DivergedError, match='lower --lr'): learn.fit(1, 1e-3)


def test_ctrl_c_swallowed_on_its_way_still_stops_at_the_next_batch(synth):
    from fastai.callback.core import Callback

    from cifar_fa.callbacks import StopWhenSignalled
    from cifar_fa.system import stop_on_signals

    class SwallowedCtrlC(Callback):  # as logging's at-fork hook swallows it while DataLoader workers start
        def after_batch(self):
            if self.iter == 0:
                try: signal.raise_signal(signal.SIGINT)
                except KeyboardInterrupt: pass

    learn = build_learner(S8, RunConfig('s8', bs=4, workers=0, device='cpu', data=str(synth), subset=4))
    stop_on_signals()  # the handlers it sets are undone after the test (conftest)
    with pytest.raises(KeyboardInterrupt): learn.fit(1, 1e-3, cbs=[SwallowedCtrlC(), StopWhenSignalled()])
    assert learn.iter == 1  # the batch after the signal never ran
    learn.fit(1, 1e-3, cbs=StopWhenSignalled())  # a later fit is not stopped by that spent signal


def test_recorder_keeps_cpu_training_losses_as_floats(synth):
    learn = build_learner(S8, RunConfig('s8', bs=4, workers=0, device='cpu', data=str(synth), subset=2))
    learn.fit(2, 1e-3)
    losses = learn.recorder.losses
    # fastai keeps 0-dim tensors
    assert len(losses) == 2 * len(learn.dls.train) and all(type(v) is float for v in losses)
    assert losses[-1] == pytest.approx(float(learn.recorder.smooth_loss.value))
    learn.recorder.plot_loss(skip_start=0)


@pytest.mark.parametrize('run_dir', sorted(p.parent.name for p in (ROOT / 'results').glob('*/model.pkl')))
def test_committed_learner_loads(run_dir):
    learn = load_learner(ROOT / 'results' / run_dir / 'model.pkl')  # breaks when a pickled library class is renamed
    m = json.loads((ROOT / 'results' / run_dir / 'metrics.json').read_text())
    assert (sum(p.numel() for p in learn.model.parameters()) == m['params']
            and list(learn.dls.vocab) == list(m['per_class_accuracy']))
    if (ROOT / 'results' / run_dir / 'model.pth').exists():  # the one --weights example: the same weights as model.pkl
        weights = torch.load(ROOT / 'results' / run_dir / 'model.pth', map_location='cpu')
        assert weights.keys() == learn.model.state_dict().keys()
        assert all(torch.equal(v, weights[k]) for k, v in learn.model.state_dict().items())


def test_holdout_run_never_reports_a_test_figure(synth, tmp_path):
    kw = dict(norm='bn', epochs=2, bs=16, lr=1e-2, workers=0, device='cpu', data=str(synth), holdout=20)
    m = run(replace(S8, tta=True), RunConfig('s8', out=str(tmp_path / 'h'), **kw))
    assert m['n_holdout'] == 20 and 0 <= m['holdout_accuracy'] <= 1 and 'flip_tta_holdout_accuracy' in m
    assert not [k for k in m if 'test' in k]
    assert json.loads((tmp_path / 'h' / 'config.json').read_text())['holdout'] == 20
    row = results_table([tmp_path / 'h']).splitlines()[-1]
    assert "--seed 42 --holdout 20` |" in row and f"| ({100 * m['holdout_accuracy']:.2f} %) (flip TTA: " in row
    with pytest.raises(RunError, match='was trained with --holdout 20'):  # a resume keeps the run's hold-out
        run(S8, RunConfig('s8', out=str(tmp_path / 'h'), resume=True, **{**kw, 'holdout': None}))


def test_gradcam_maps_the_predicted_class_where_gap_reads(trained, synth):
    from cifar_fa.interpret import grad_cam
    learn = load_learner(trained[1] / 'model.pkl')
    files = sorted(synth.glob('test/*/*.png'))[::4]  # one image of each class
    x = learn.dls.test_dl(files, with_labels=True, device='cpu').one_batch()[0].as_subclass(torch.Tensor)
    classes = learn.model.eval()(x).argmax(1)
    heat = grad_cam(learn.model, x, classes)  # the map entering GAP: after C9's residual addition of C7
    assert heat.shape == (10, 32, 32) and heat.min() >= 0 and heat.amax((1, 2)).allclose(torch.ones(10))
    assert not torch.allclose(heat[0], heat[5])  # each image gets its own map
    assert not any(p.grad is not None for p in learn.model.parameters())  # the weights' gradients are cleared
    at_c9 = grad_cam(learn.model, x, classes, layer='layers.C9')  # C9's own output, before the addition
    assert at_c9.shape == heat.shape and not torch.allclose(at_c9, heat)
    with pytest.raises(RunError, match="no layer 'nope' for --gradcam-layer; its layers: layers, layers.C1"):
        grad_cam(learn.model, x, classes, layer='nope')


def test_batch_augs_run_resumes_to_the_same_history(synth, tmp_path, monkeypatch):
    from cifar_fa.callbacks import EpochCheckpoint
    save = EpochCheckpoint.after_epoch

    def interrupt_after_epoch_0(self):
        save(self)
        raise KeyboardInterrupt

    kw = dict(norm='bn', epochs=3, bs=16, lr=1e-2, batch_augs=True, workers=0, device='cpu', data=str(synth),
              subset=4)
    full = run(S8, RunConfig('s8', out=str(tmp_path / 'full'), **kw))
    monkeypatch.setattr(EpochCheckpoint, 'after_epoch', interrupt_after_epoch_0)
    with pytest.raises(KeyboardInterrupt): run(S8, RunConfig('s8', out=str(tmp_path / 'cut'), **kw))
    monkeypatch.setattr(EpochCheckpoint, 'after_epoch', save)
    resumed = run(S8, RunConfig('s8', out=str(tmp_path / 'cut'), resume=True, **kw))
    h_full, h_cut = (pd.read_csv(tmp_path / d / 'history.csv') for d in ('full', 'cut'))
    pd.testing.assert_frame_equal(h_full.drop(columns='time'), h_cut.drop(columns='time'))
    assert resumed['test_accuracy'] == full['test_accuracy']
    run(S8, RunConfig('s8', out=str(tmp_path / 'plain'), **{**kw, 'batch_augs': False}))
    h_plain = pd.read_csv(tmp_path / 'plain' / 'history.csv')
    assert (h_plain.train_loss != h_full.train_loss).all()  # other draws: the batch path replaced the item transform
    assert json.loads((tmp_path / 'full' / 'config.json').read_text())['batch_augs'] is True
    with pytest.raises(RunError, match='was trained with --batch-augs'):
        run(S8, RunConfig('s8', out=str(tmp_path / 'cut'), resume=True, **{**kw, 'batch_augs': False}))


def test_cpu_device_name_says_the_model_and_threads(monkeypatch):
    from cifar_fa.train import _device_name
    monkeypatch.setattr(torch, 'get_num_threads', lambda: 1)
    assert _device_name(torch.device('cpu')).endswith(', 1 thread)')
    monkeypatch.setattr(torch, 'get_num_threads', lambda: 2)
    cpuinfo = Path('/proc/cpuinfo')
    model = next((ln.split(':', 1)[1].strip() for ln in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
                  if ln.startswith('model name')), None)
    name = _device_name(torch.device('cpu'))
    assert name == f'CPU ({model}, 2 threads)' if model else name.endswith(', 2 threads)')
