"""Locating CIFAR-10 (folder, archive or fastai download) and the DataBlock that feeds every recipe."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tarfile
import warnings
from pathlib import Path
from typing import Sequence

os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')  # albumentations otherwise calls the network on import

import albumentations as A
import numpy as np
from PIL import Image
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.core import DataLoaders
from fastai.data.transforms import GrandparentSplitter, image_extensions, parent_label
from fastai.vision.augment import Normalize
from fastai.vision.core import PILImage
from fastai.vision.data import ImageBlock
from fasttransform import DisplayedTransform

__all__ = ['DataError', 'CIFAR_STATS', 'CIFAR_MEAN_RGB', 'cifar10_path', 'extract_archive', 'check_layout',
           'image_files', 'AlbumentationsTransform', 'cifar_block', 'cifar_dls', 'cache_dir']

IMAGE_EXTS = set(image_extensions)
CIFAR_STATS = ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])  # per-channel mean, std of the training split
CIFAR_MEAN_RGB = tuple(round(255 * m) for m in CIFAR_STATS[0])  # fill colour for cutout holes


class DataError(ValueError):
    """The data source given cannot be used; the message says what to do."""


def cache_dir() -> Path:
    """Folder where archives are extracted: `$CIFAR_FA_CACHE`, else `~/.cache/cifar_fa`."""
    return Path(os.environ.get('CIFAR_FA_CACHE', Path.home() / '.cache' / 'cifar_fa')).expanduser()


def _archive_key(archive: Path) -> str:
    st = archive.stat()
    return hashlib.sha1(f'{archive.resolve()}:{st.st_size}:{st.st_mtime_ns}'.encode()).hexdigest()[:12]


def extract_archive(archive: Path, dest: Path | None = None) -> Path:
    """Extract `archive` once into the cache (atomically: a half-finished extraction is never reused) and return it."""
    dest = Path(dest or cache_dir()) / f'{archive.name.split(".")[0]}-{_archive_key(archive)}'
    if dest.is_dir(): return dest
    tmp = dest.with_name(dest.name + '.partial')
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                target = (tmp / m.name).resolve()
                if not target.is_relative_to(tmp.resolve()) or m.issym() or m.islnk():
                    raise DataError(f"{archive}: entry {m.name!r} would land outside the extraction folder; refusing this archive")
            tf.extractall(tmp, filter='data')
    except (tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{archive} is not a readable .tgz/.tar.gz archive ({e}); check the file or pass the extracted folder") from None
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(dest)
    return dest


def _find_root(path: Path) -> Path:
    if (path / 'train').is_dir() and (path / 'test').is_dir(): return path
    subs = [d for d in path.iterdir() if d.is_dir()] if path.is_dir() else []
    if len(subs) == 1 and (subs[0] / 'train').is_dir(): return _find_root(subs[0])
    raise DataError(f"{path} has no train/ and test/ folders of class folders; pass the CIFAR-10 folder (or a .tgz of it)")


def check_layout(root: Path) -> list[str]:
    """Check `root` holds train/ and test/ with the same class folders; return the class names."""
    splits = {s: sorted(d.name for d in (root / s).iterdir() if d.is_dir()) for s in ('train', 'test')}
    if not splits['train']: raise DataError(f"{root / 'train'} holds no class folders")
    if splits['train'] != splits['test']:
        raise DataError(f"class folders differ between {root / 'train'} ({', '.join(splits['train'])}) "
                        f"and {root / 'test'} ({', '.join(splits['test'])}); both need the same classes")
    return splits['train']


def _few(paths: Sequence[Path], n: int = 3) -> str:
    return ', '.join(map(str, paths[:n])) + (f' and {len(paths) - n} more' if len(paths) > n else '')


def _unreadable(files: list[Path], size: int, root: Path) -> tuple[list[str], list[str]]:
    """Files that do not decode, and files that are not `size`x`size`; rescanned when a class folder changes."""
    dirs = sorted({f.parent for f in files})
    key = hashlib.sha1(f'{root.resolve()}:{len(files)}:{size}:{[d.stat().st_mtime_ns for d in dirs]}'.encode()).hexdigest()[:16]
    cached = cache_dir() / f'scan-{key}.json'
    if cached.exists(): return tuple(json.loads(cached.read_text()))
    bad, wrong = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                if im.size != (size, size): wrong.append(str(f))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            bad.append(str(f))
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps([bad, wrong]))
    return bad, wrong


def image_files(root: Path, size: int = 32) -> list[Path]:
    """Decodable images under `root`/train and `root`/test; unreadable and non-image files are skipped with a warning."""
    classes, files, others = check_layout(root), [], []
    for s in ('train', 'test'):
        for c in classes:
            for name in sorted(os.listdir(root / s / c)):
                (files if os.path.splitext(name)[1].lower() in IMAGE_EXTS else others).append(root / s / c / name)
    if others: warnings.warn(f'ignoring {len(others)} non-image files: {_few(others)}')
    bad, wrong = _unreadable(files, size, root)
    if wrong: raise DataError(f'{len(wrong)} images are not {size}x{size} ({_few(wrong)}); resize them to {size}x{size} or remove them')
    if bad:
        warnings.warn(f'skipping {len(bad)} unreadable images: {_few(bad)}')
        skip = set(bad)
        files = [f for f in files if str(f) not in skip]
    counts = {(s, c): 0 for s in ('train', 'test') for c in classes}
    for f in files: counts[f.parent.parent.name, f.parent.name] += 1
    if empty := [root / s / c for (s, c), n in counts.items() if n == 0]:
        raise DataError(f'{_few(empty)} hold no readable images; add some or remove the folder')
    return files


def cifar10_path(data: str | Path | None = None) -> Path:
    """Locate CIFAR-10: `data` (folder or .tgz), else `$CIFAR10_DIR`, else fastai's `untar_data(URLs.CIFAR)`."""
    src = data or os.environ.get('CIFAR10_DIR')
    if not src:
        from fastai.data.external import URLs, untar_data
        return untar_data(URLs.CIFAR)
    path = Path(src).expanduser()
    if not path.exists(): raise DataError(f"{path} does not exist; pass --data with a CIFAR-10 folder or .tgz (or set CIFAR10_DIR)")
    if path.is_file(): path = extract_archive(path)
    root = _find_root(path)
    image_files(root)  # checks layout and every image once (the scan is cached), before any run folder is made
    return root


class AlbumentationsTransform(DisplayedTransform):
    """Apply an albumentations pipeline to training images only (`split_idx = 0`)."""
    split_idx, order = 0, 2

    def __init__(self, aug: A.BasicTransform | Sequence[A.BasicTransform]):
        super().__init__()
        self.aug, self._seeded_in = aug if isinstance(aug, A.BaseCompose) else A.Compose(list(aug)), None

    def encodes(self, img: PILImage) -> PILImage:
        if self._seeded_in != os.getpid():  # albumentations seeds itself from the OS; follow fastai's seeded `random`
            self.aug.set_random_seed(random.getrandbits(32))
            self._seeded_in = os.getpid()
        return PILImage.create(self.aug(image=np.asarray(img))['image'])


def _subset_items(n_per_class: int | None):
    def get_items(path: Path) -> list[Path]:
        files = image_files(path)
        if n_per_class is None: return files
        keep, seen = [], {}
        for f in files:
            key = (f.parent.parent.name, f.parent.name)
            if key[0] == 'test' or seen.get(key, 0) < n_per_class:
                keep.append(f)
                seen[key] = seen.get(key, 0) + 1
        return keep
    return get_items


def cifar_block(augs: Sequence[A.BasicTransform] = (), n_per_class: int | None = None) -> DataBlock:
    """DataBlock for CIFAR-style folders: train/ vs test/ split, parent-folder labels, `augs` on train only."""
    return DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=_subset_items(n_per_class),
                     splitter=GrandparentSplitter(train_name='train', valid_name='test'), get_y=parent_label,
                     item_tfms=AlbumentationsTransform(augs) if augs else None,
                     batch_tfms=Normalize.from_stats(*CIFAR_STATS))


def cifar_dls(path: Path, augs: Sequence[A.BasicTransform] = (), bs: int = 128, n_per_class: int | None = None,
              workers: int | None = None, device=None) -> DataLoaders:
    """Train/test `DataLoaders` for the CIFAR-style folder `path`."""
    if workers is None: workers = min(4, os.cpu_count() or 1)
    return cifar_block(augs, n_per_class).dataloaders(path, bs=bs, num_workers=workers, device=device)
