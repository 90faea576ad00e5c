import io
import os
import shutil
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.error import URLError

import albumentations as A
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSES, write_synthetic
from PIL import Image

from cifar_fa import DataError, cifar10_path, cifar_dls, data
from cifar_fa.data import KNOWN_COPIES, AlbumentationsTransform, data_fingerprint, data_name


def _tgz(src, dest):
    with tarfile.open(dest, 'w:gz') as tf: tf.add(src, arcname='cifar10')
    return dest


def test_folder_and_env(synth, monkeypatch):
    assert cifar10_path(synth) == synth
    monkeypatch.setenv('CIFAR10_DIR', str(synth))
    assert cifar10_path() == synth


def test_archive_extracted_once(synth, tmp_path):
    arc = _tgz(synth, tmp_path / 'c.tgz')
    root = cifar10_path(arc)
    assert root.name == 'cifar10' and sorted(p.name for p in (root / 'train').iterdir()) == CLASSES
    marker = root / 'seen'
    marker.touch()
    assert cifar10_path(arc) == root and marker.exists()  # reused, not extracted again


def test_half_finished_extraction_is_redone(synth, tmp_path):
    arc = _tgz(synth, tmp_path / 'c.tgz')
    root = cifar10_path(arc)
    partial = root.parent.with_name(root.parent.name + '.partial')
    shutil.rmtree(root.parent)
    partial.mkdir()
    (partial / 'junk').touch()
    assert (cifar10_path(arc) / 'test').is_dir() and not partial.exists()


def test_runs_started_together_on_an_empty_cache_share_one_extraction(synth, tmp_path, monkeypatch):
    arc = _tgz(synth, tmp_path / 'c.tgz')
    extractall = tarfile.TarFile.extractall

    def slow_extractall(self, *args, **kwargs):  # widens the window in which a second run arrives
        time.sleep(0.5)
        return extractall(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, 'extractall', slow_extractall)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(data.extract_archive, arc)
        time.sleep(0.2)
        roots = [pool.submit(data.extract_archive, arc).result(), first.result()]
    assert roots[0] == roots[1]
    assert sorted(p.name for p in (roots[0] / 'cifar10' / 'train').iterdir()) == CLASSES


def test_archive_escaping_cache_refused(tmp_path):
    arc = tmp_path / 'evil.tgz'
    with tarfile.open(arc, 'w:gz') as tf:
        info = tarfile.TarInfo('../outside.txt'); info.size = 2
        tf.addfile(info, io.BytesIO(b'hi'))
    with pytest.raises(DataError, match='outside'): cifar10_path(arc)
    assert not (tmp_path / 'cache' / 'outside.txt').exists()


def _file(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize('make,msg', [
    (lambda p: p / 'nope', 'does not exist'),
    (lambda p: _file(p / 'x.tgz', b'not an archive'), 'not a readable'),
    (lambda p: _file(p / 'empty' / 'README', b'hi').parent, 'no train/ and test/')])
def test_bad_sources(tmp_path, make, msg):
    with pytest.raises(DataError, match=msg) as e: cifar10_path(make(tmp_path))
    assert '\n' not in str(e.value)  # the command line prints one line


def test_fastai_download_is_the_default(synth, monkeypatch):
    import fastai.data.external as external
    monkeypatch.delenv('CIFAR10_DIR', raising=False)
    monkeypatch.setattr(external, 'untar_data', lambda url: synth if url == external.URLs.CIFAR else None)
    assert cifar10_path() == synth
    def offline(url): raise URLError(OSError(-2, 'Name or service not known'))
    monkeypatch.setattr(external, 'untar_data', offline)
    with pytest.raises(DataError, match=r"could not download CIFAR-10 \(.*Name or service not known\); "
                                        r"pass --data") as e: cifar10_path()
    assert '\n' not in str(e.value)


def test_unusable_cache_folder_is_one_line(tmp_path, monkeypatch):
    data = write_synthetic(tmp_path / 'fresh', n_train=1, n_test=1)  # not scanned yet in this process
    monkeypatch.setenv('CIFAR_FA_CACHE', str(_file(tmp_path / 'afile', b'')))
    with pytest.raises(DataError, match='set CIFAR_FA_CACHE to a writable folder'): cifar10_path(data)


def test_class_mismatch_and_empty_class(synth, tmp_path):
    bad = shutil.copytree(synth, tmp_path / 'bad')
    shutil.rmtree(bad / 'test' / CLASSES[0])
    with pytest.raises(DataError, match='class folders differ'): cifar10_path(bad)
    (bad / 'test' / CLASSES[0]).mkdir()
    with pytest.raises(DataError, match='no readable images'): cifar10_path(bad)


def test_augmentation_on_train_only(synth):
    assert AlbumentationsTransform([A.HorizontalFlip()]).split_idx == 0
    dls = cifar_dls(synth, [A.HorizontalFlip(p=1.)], bs=4, workers=0)
    assert dls.vocab == CLASSES and len(dls.train_ds) == 120 and len(dls.valid_ds) == 40
    for dl, flipped in ((dls.train, True), (dls.valid, False)):
        dl = dl.new(shuffle=False, drop_last=False)
        x, = dls.decode((dl.one_batch()[0],))
        raw = np.asarray(Image.open(dl.dataset.items[0]))
        want = raw[:, ::-1] if flipped else raw
        got = x[0].permute(1, 2, 0).float().numpy()
        assert np.abs(got - want).max() <= 1


def test_batches_are_one_channels_last_tensor_image(synth):
    from fastai.torch_core import TensorCategory, TensorImage
    dls = cifar_dls(synth, [A.HorizontalFlip()], bs=8, workers=0)
    for dl in (dls.train, dls.valid, dls.test_dl([synth / 'test' / CLASSES[0] / '0000.png'])):
        b = dl.one_batch()
        assert type(b[0]) is TensorImage and b[0].dtype == torch.float32 and b[0].shape[1:] == (3, 32, 32)
        assert b[0].is_contiguous(memory_format=torch.channels_last)  # stacked HWC arrays: what to_channelslast wants
    assert len(b) == 1 and type(dls.train.one_batch()[1]) is TensorCategory


def test_size_resizes_every_split_and_leaves_32_px_untouched(synth):
    plain = cifar_dls(synth, bs=8, workers=0)
    big = cifar_dls(synth, bs=8, workers=0, size=48)
    image = [synth / 'test' / CLASSES[0] / '0000.png']
    for dl, ref in ((big.train, plain.train), (big.valid, plain.valid), (big.test_dl(image), plain.test_dl(image))):
        x, x32 = (d.new(shuffle=False, drop_last=False).one_batch()[0] for d in (dl, ref))
        assert x.shape[2:] == (48, 48) and x32.shape[2:] == (32, 32)
        want = F.interpolate(x32.as_subclass(torch.Tensor), size=(48, 48), mode='bilinear', align_corners=False)
        assert torch.allclose(x.as_subclass(torch.Tensor), want, atol=1e-5)  # resizing commutes with Normalize
    assert not any(isinstance(t, data.ResizeBatch) for t in plain.train.after_batch.fs)


def test_bad_files_skipped_with_warning(synth, tmp_path):
    root = shutil.copytree(synth, tmp_path / 'd')
    cls = root / 'train' / CLASSES[1]
    (cls / 'zero.png').write_bytes(b'')
    (cls / 'trunc.png').write_bytes((cls / '0000.png').read_bytes()[:60])
    (cls / 'notes.txt').write_text('not an image')
    with pytest.warns(UserWarning, match='non-image files: .*notes.txt'):
        with pytest.warns(UserWarning, match='skipping 2 unreadable images'):
            dls = cifar_dls(cifar10_path(root), bs=8, workers=0)
    names = {p.name for p in dls.train_ds.items}
    assert 'zero.png' not in names and 'trunc.png' not in names and len(dls.train_ds) == 120
    dls.train.one_batch()


RAMP = (np.arange(32 * 32).reshape(32, 32) // 4).astype(np.uint8)  # every 8-bit value, 4 pixels each


def test_image_modes_become_rgb(synth, tmp_path):
    from cifar_fa.data import DecodedImages, rgb_array
    root = shutil.copytree(synth, tmp_path / 'd')
    cls = root / 'train' / CLASSES[0]
    src = Image.open(cls / '0000.png')
    for mode in ('L', 'RGBA', 'P'): src.convert(mode).save(cls / f'm_{mode}.png')
    # opens as I;16, I
    for ext in ('png', 'pgm'): Image.fromarray(RAMP.astype(np.uint16) * 257).save(cls / f'm_16.{ext}')
    dls = cifar_dls(cifar10_path(root), bs=200, workers=0)
    x, y = dls.train.new(shuffle=False, drop_last=False).one_batch()
    assert x.shape[1:] == (3, 32, 32) and len(dls.train_ds) == 125
    get = DecodedImages(root)
    for f in (cls / 'm_16.png', cls / 'm_16.pgm'):
        # scaled, not clipped to 255
        assert (get(f) == RAMP[..., None]).all() and (rgb_array(f) == RAMP[..., None]).all()


def test_wrong_size_refused(synth, tmp_path):
    root = shutil.copytree(synth, tmp_path / 'd')
    Image.new('RGB', (64, 48)).save(root / 'test' / CLASSES[2] / 'big.png')
    with pytest.raises(DataError, match='not 32x32 .*big.png.*resize'): cifar10_path(root)
    (root / 'test' / CLASSES[2] / 'big.png').unlink()
    Image.new('F', (32, 32)).save(root / 'test' / CLASSES[2] / 'float.tif')
    with pytest.raises(DataError, match='float.tif holds F-mode pixels .* save it as an 8- or 16-bit image'):
        cifar10_path(root)


def test_decoded_cache_reused_until_a_folder_changes(synth, tmp_path, monkeypatch):
    import cifar_fa.data as data
    root = shutil.copytree(synth, tmp_path / 'd')
    files = data.image_files(root)
    npy = data.DecodedImages(root).npy
    assert np.load(npy).shape == (len(files), 32, 32, 3)
    monkeypatch.setattr(data, '_SCANS', {})
    monkeypatch.setattr(data, '_decode', lambda *a: pytest.fail('decoded again although nothing changed'))
    assert data.image_files(root) == files
    Image.open(root / 'train' / CLASSES[0] / '0000.png').save(root / 'train' / CLASSES[0] / 'new.png')
    with pytest.raises(pytest.fail.Exception, match='decoded again'): data.image_files(root)


def test_decoded_cache_rebuilt_when_a_file_is_rewritten(synth, tmp_path):
    from cifar_fa.data import DecodedImages
    root = shutil.copytree(synth, tmp_path / 'd')
    f = root / 'train' / CLASSES[0] / '0000.png'
    old = DecodedImages(root)(f)
    st = os.stat(f)
    Image.fromarray(255 - old).save(f)  # in place: the class folder's mtime stays
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert (DecodedImages(root)(f) == 255 - old).all()


def test_decoded_images_getter(synth):
    import pickle

    from cifar_fa.data import DecodedImages
    get = DecodedImages(synth)
    f = synth / 'test' / CLASSES[3] / '0001.png'
    assert (get(f) == np.asarray(Image.open(f).convert('RGB'))).all()
    other = Image.new('RGB', (32, 32))
    assert get(other) is other and get('elsewhere.png') == 'elsewhere.png'  # new files are opened by PILImage.create
    assert len(pickle.dumps(get)) < 1000 and pickle.loads(pickle.dumps(get))(f) == f  # exported learners stay small


def test_dataloaders_say_what_they_hold(synth):
    from cifar_fa.batch_augs import batch_tfms_for
    dls = cifar_dls(synth, [A.HorizontalFlip()], bs=8, workers=0)
    text = repr(dls)
    assert dls.path == synth and f'from {synth}' in text
    assert 'train: 120 images, 15 batches of 8' in text and 'test: 40 images' in text
    assert 'HorizontalFlip' in text and 'class9' in text and 'batch augmentations' not in text
    text = repr(cifar_dls(synth, bs=8, workers=0, batch_augs=batch_tfms_for([A.HorizontalFlip()])))
    assert 'train-only albumentations: none\n  train-only batch augmentations: PadCropFlip\n' in text


def test_rgb_array_takes_any_image(tmp_path):
    from cifar_fa.data import rgb_array
    Image.new('I;16', (48, 40)).save(tmp_path / 'odd.png')
    for item in (tmp_path / 'odd.png', str(tmp_path / 'odd.png'), Image.new('RGBA', (20, 20)),
                 np.zeros((32, 32), np.uint8)):
        a = rgb_array(item)
        assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    (tmp_path / 'bad.png').write_bytes(b'nope')
    with pytest.raises(DataError, match='not a readable image'): rgb_array(tmp_path / 'bad.png')
    assert (rgb_array(Image.fromarray(RAMP.astype(np.int32))) == RAMP[..., None]).all()  # 32-bit values of 8 bits: kept
    big_endian = Image.fromarray((RAMP.astype(np.uint16) * 257).astype('>u2'))
    assert big_endian.mode == 'I;16B' and (rgb_array(big_endian) == RAMP[..., None]).all()
    Image.new('F', (32, 32)).save(tmp_path / 'float.tif')
    with pytest.raises(DataError, match='float.tif holds F-mode pixels that are not 16-bit'):
        rgb_array(tmp_path / 'float.tif')


def _fastai_layout(src, dest):
    """`src` as fastai's URLs.CIFAR archive lays it out: `<index>_<class>.png` in class folders, \
labels.txt at the top."""
    for split in ('train', 'test'):
        for i, f in enumerate(sorted((src / split).glob('*/*.png'))):
            (dest / split / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest / split / f.parent.name / f'{i}_{f.parent.name}.png')
    (dest / 'labels.txt').write_text('\n'.join(CLASSES) + '\n')
    return dest


def test_fastai_layout_with_labels_txt(synth, tmp_path):
    arc = _tgz(_fastai_layout(synth, tmp_path / 'fastai'), tmp_path / 'cifar10.tgz')
    root = cifar10_path(arc)
    assert (root / 'labels.txt').is_file()
    dls = cifar_dls(root, bs=8, workers=0)
    assert list(dls.vocab) == CLASSES and len(dls.valid_ds) == 40  # labels.txt is neither a class nor an image
    x, y = dls.valid_ds[0]
    assert dls.vocab[y] == CLASSES[0] and x.shape == (32, 32, 3)


def test_fingerprint_names_the_images_not_the_files(synth, tmp_path):
    fp = data_fingerprint(synth)
    assert set(fp) == {'train', 'test'} and fp['train'] != fp['test']
    renamed = _fastai_layout(synth, tmp_path / 'renamed')  # other folder, other file names, labels.txt beside
    assert data_fingerprint(renamed) == fp
    as_bmp = shutil.copytree(synth, tmp_path / 'bmp')  # another lossless format: the same pixels
    for f in as_bmp.glob('*/*/*.png'): Image.open(f).save(f.with_suffix('.bmp')); f.unlink()
    assert data_fingerprint(as_bmp) == fp
    pixel = shutil.copytree(synth, tmp_path / 'pixel')
    f = sorted((pixel / 'test' / CLASSES[3]).iterdir())[0]
    a = np.asarray(Image.open(f)).copy(); a[0, 0, 0] ^= 1
    Image.fromarray(a).save(f)
    changed = data_fingerprint(pixel)
    assert changed['train'] == fp['train'] and changed['test'] != fp['test']
    label = shutil.copytree(synth, tmp_path / 'label')
    f = sorted((label / 'train' / CLASSES[1]).iterdir())[0]
    f.rename(label / 'train' / CLASSES[2] / 'moved.png')
    assert data_fingerprint(label)['train'] != fp['train'] and data_fingerprint(label)['test'] == fp['test']


def test_data_names():
    assert sorted(KNOWN_COPIES.values()) == ['CIFAR-10', 'CIFAR-10 JPEG copy']
    original = next(k for k, v in KNOWN_COPIES.items() if v == 'CIFAR-10')
    assert data_name(dict(train=original[0], test=original[1])) == 'CIFAR-10'
    assert data_name(dict(train='0123456789abcdef', test=original[1])) == 'other data (01234567)'
    assert data_name(None) == 'not recorded'


@pytest.mark.skipif(not os.environ.get('CIFAR10_DIR'), reason='needs the real CIFAR-10 (set CIFAR10_DIR)')
def test_real_data_is_a_known_copy():
    assert data_name(data_fingerprint(cifar10_path())) in KNOWN_COPIES.values()


def test_holdout_validates_on_training_images_only(synth):
    files = data.image_files(synth)
    held = data.holdout_files(files, 20)
    assert held == data.holdout_files(list(reversed(files)), 20)  # the same images whatever the order or run
    assert len(held) == 20 and all(f.parent.parent.name == 'train' for f in held)
    assert sorted(f.parent.name for f in held) == sorted(CLASSES * 2)  # as many from each class
    dls = cifar_dls(synth, bs=8, workers=0, holdout=20, n_per_class=5)
    assert set(dls.valid.items) == held and dls.valid_name == 'hold-out' and 'hold-out: 20 images' in repr(dls)
    assert len(dls.train.items) == 50 and not held & set(dls.train.items)  # --subset counts the images trained on
    assert all(f.parent.parent.name == 'train' for f in [*dls.train.items, *dls.valid.items])  # no test image read
    for n in (9, 120):  # 0 per class; all 12 of a class
        msg = rf'--holdout {n} takes \d+ images from each of 10 classes; take from 1 to 11 per class'
        with pytest.raises(DataError, match=msg):
            cifar_dls(synth, bs=8, workers=0, holdout=n)


def test_pad_crop_flip_crops_the_albumentations_padding_and_flips_half():
    from fastai.torch_core import TensorImage

    from cifar_fa.batch_augs import PadCropFlip
    imgs = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    padded = [A.PadIfNeeded(40, 40, border_mode=4)(image=i)['image'] for i in imgs]  # reflect-101, as S7 and S8 pad
    torch.manual_seed(0)
    out = PadCropFlip(4, 0.5)(TensorImage(torch.from_numpy(imgs).permute(0, 3, 1, 2).float()), split_idx=0)
    assert type(out) is TensorImage and out.shape == (64, 3, 32, 32)
    assert out.is_contiguous(memory_format=torch.channels_last)
    seen = set()
    for o, p in zip(out.permute(0, 2, 3, 1).numpy(), padded):
        found = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)
                 if np.array_equal(o, p[dy:dy + 32, dx:dx + 32][:, ::-1] if f else p[dy:dy + 32, dx:dx + 32])]
        assert found, 'an output image is no crop of its padded image, flipped or not'
        seen |= set(found)
    assert len({(dy, dx) for dy, dx, _ in seen}) > 20 and {f for *_, f in seen} == {0, 1}
    assert PadCropFlip.split_idx == 0  # training batches only: fastai passes the valid split's 1 through


def test_batch_version_of_pad_crop_flip_only():
    from cifar_fa.batch_augs import PadCropFlip, batch_tfms_for
    pad, crop = A.PadIfNeeded(40, 40, border_mode=4), A.RandomCrop(32, 32)
    (t,) = batch_tfms_for([pad, crop, A.HorizontalFlip()])
    assert isinstance(t, PadCropFlip) and (t.pad, t.flip_p) == (4, 0.5)
    (t,) = batch_tfms_for([A.HorizontalFlip(p=0.3)])
    assert (t.pad, t.flip_p) == (0, 0.3) and batch_tfms_for([]) == []
    for augs, named in (([A.PadIfNeeded(40, 40, border_mode=0), crop], 'PadIfNeeded, RandomCrop'),
                        ([pad, A.RandomCrop(28, 28)], 'PadIfNeeded, RandomCrop'),
                        ([A.HorizontalFlip(), pad, crop], 'PadIfNeeded, RandomCrop'),
                        ([A.HorizontalFlip(), A.Affine(rotate=(-15, 15)), A.CoarseDropout()], 'Affine, CoarseDropout')):
        with pytest.raises(ValueError, match=f'^{named} has no batch version'): batch_tfms_for(augs)


def test_batch_augs_change_training_batches_only(synth):
    from fastai.torch_core import set_seed

    from cifar_fa.batch_augs import batch_tfms_for
    augs = [A.PadIfNeeded(40, 40, border_mode=4), A.RandomCrop(32, 32), A.HorizontalFlip()]
    plain = cifar_dls(synth, bs=8, workers=0)
    dls = cifar_dls(synth, bs=8, workers=0, batch_augs=batch_tfms_for(augs))
    assert not dls.train.after_item.fs.filter(lambda t: isinstance(t, AlbumentationsTransform))
    for dl_aug, dl_plain, changed in ((dls.train, plain.train, True), (dls.valid, plain.valid, False)):
        x, _ = dl_aug.new(shuffle=False).one_batch()
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert (not torch.equal(x, dl_plain.new(shuffle=False).one_batch()[0])) == changed
    set_seed(1)
    a = dls.train.new(shuffle=False).one_batch()[0]
    set_seed(1)
    assert torch.equal(a, dls.train.new(shuffle=False).one_batch()[0])  # seeded: a run repeats its augmentations
