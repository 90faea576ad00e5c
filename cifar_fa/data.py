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
from typing import NamedTuple, Sequence

import numpy as np
import torch
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.core import DataLoaders, TfmdDL
from fastai.data.load import fa_collate
from fastai.data.transforms import FuncSplitter, GrandparentSplitter, IntToFloatTensor, image_extensions, parent_label
from fastai.torch_core import TensorImage
from fastai.vision.augment import Normalize
from fastai.vision.core import load_image
from fasttransform import ItemTransform, Transform
from filelock import FileLock
from PIL import Image

from .augment import A
from .system import atomic_write

__all__ = ['DataError', 'CIFAR_STATS', 'CIFAR_MEAN_RGB', 'KNOWN_COPIES', 'cifar10_path', 'extract_archive',
           'check_layout', 'image_files', 'data_fingerprint', 'data_name', 'DecodedImages', 'AlbumentationsTransform',
           'CifarDataLoaders', 'ResizeBatch', 'cifar_block', 'cifar_dls', 'cache_dir', 'HOLDOUT_SEED', 'holdout_files']

IMAGE_EXTS = set(image_extensions)
CIFAR_STATS = ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])  # per-channel mean, std of the training split
CIFAR_MEAN_RGB = tuple(round(255 * m) for m in CIFAR_STATS[0])  # fill colour for cutout holes


class DataError(ValueError):
    """The data source given cannot be used; the message says what to do."""


def cache_dir() -> Path:
    """Folder for extracted archives and decoded images (made if needed): `$CIFAR_FA_CACHE`, or `~/.cache/cifar_fa`."""
    d = Path(os.environ.get('CIFAR_FA_CACHE', Path.home() / '.cache' / 'cifar_fa')).expanduser()
    try: d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot use {d} as the cache folder ({e.strerror}); "
                        "set CIFAR_FA_CACHE to a writable folder") from None
    if not os.access(d, os.W_OK):
        raise DataError(f"cannot write to the cache folder {d}; set CIFAR_FA_CACHE to a writable folder")
    return d


def _archive_key(archive: Path) -> str:
    st = archive.stat()
    return hashlib.sha1(f'{archive.resolve()}:{st.st_size}:{st.st_mtime_ns}'.encode()).hexdigest()[:12]


def extract_archive(archive: Path, dest: Path | None = None) -> Path:
    """Extract `archive` once into the cache (atomically: a half-finished extraction is never reused) and return it."""
    dest = Path(dest or cache_dir()) / f'{archive.name.split(".")[0]}-{_archive_key(archive)}'
    if dest.is_dir(): return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # runs started together on an empty cache: one extracts, the others wait for it and reuse its folder
    with FileLock(dest.with_name(dest.name + '.lock')):
        if dest.is_dir(): return dest
        _extract(archive, dest)
    return dest


def _extract(archive: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + '.partial')
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                target = (tmp / m.name).resolve()
                if not target.is_relative_to(tmp.resolve()) or m.issym() or m.islnk():
                    raise DataError(f"{archive}: entry {m.name!r} would land outside the extraction folder; "
                                    "refusing this archive")
            tf.extractall(tmp, filter='data')
    except (tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = str(e).splitlines()[0].rstrip(':')  # tarfile lists each compression it tried on lines of their own
        raise DataError(f"{archive} is not a readable .tgz/.tar.gz archive ({reason}); "
                        "check the file or pass the extracted folder") from None
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(dest)


def _find_root(path: Path) -> Path:
    if (path / 'train').is_dir() and (path / 'test').is_dir(): return path
    subs = [d for d in path.iterdir() if d.is_dir()] if path.is_dir() else []
    if len(subs) == 1 and (subs[0] / 'train').is_dir(): return _find_root(subs[0])
    raise DataError(f"{path} has no train/ and test/ folders of class folders; "
                    "pass the CIFAR-10 folder (or a .tgz of it)")


def check_layout(root: Path) -> list[str]:
    """Check `root` holds train/ and test/ with the same class folders; return the class names."""
    splits = {s: sorted(d.name for d in (root / s).iterdir() if d.is_dir()) for s in ('train', 'test')}
    if not splits['train']: raise DataError(f"{root / 'train'} holds no class folders")
    if splits['train'] != splits['test']:
        raise DataError(f"class folders differ between {root / 'train'} ({', '.join(splits['train'])}) "
                        f"and {root / 'test'} ({', '.join(splits['test'])}); both need the same classes")
    return splits['train']


def _few(paths: Sequence, n: int = 3) -> str:
    return ', '.join(map(str, paths[:n])) + (f' and {len(paths) - n} more' if len(paths) > n else '')


def _rgb(img: Image.Image, name: str | Path) -> np.ndarray:
    """HWC uint8 RGB pixels of `img`; 16-bit grey is scaled to 8 bits, not clipped."""
    if not img.mode.startswith(('I', 'F')): return np.asarray(img.convert('RGB'))
    a = np.asarray(img)
    if a.dtype.kind == 'f' or not 0 <= a.min() <= a.max() <= 65535:
        raise DataError(f'{name} holds {img.mode}-mode pixels that are not 16-bit integers; '
                        'save it as an 8- or 16-bit image')
    if img.mode.startswith('I;16') or a.max() > 255: a = a >> 8  # 32-bit `I` holds 16-bit files (PGM) or 8-bit values
    return np.stack([a.astype(np.uint8)] * 3, axis=-1)


def _decode(files: list[Path], size: int) -> tuple[list[str], list[str], np.ndarray]:
    """Files that do not decode, files that are not `size`x`size`, and the RGB pixels of all the others."""
    bad, wrong, pixels = [], [], []
    for f in files:
        try:
            with Image.open(f) as im:
                if im.size != (size, size): wrong.append(str(f))
                else: pixels.append(_rgb(im, f))
        except DataError: raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            bad.append(str(f))
    return bad, wrong, np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)


class Scan(NamedTuple):
    """A scanned data folder: its readable images, the .npy of their pixels, and each split's fingerprint."""
    files: list[Path]
    npy: Path
    fingerprint: dict[str, str]


_CACHE_FORMAT = 2  # part of the cache key: a cache written in another format is rebuilt, not misread
_SCANS: dict[str, Scan] = {}  # this process's scans: warnings are given once

# fingerprints (`data_fingerprint`) of the copies the project has measured on,
# and the names the results table gives them
KNOWN_COPIES = {
    ('d640880bb419e4a4', 'fd93333411e26aa8'): 'CIFAR-10',  # the original: ../shared/data/cifar10.tgz, URLs.CIFAR
    ('4a9405eaf30b3fd3', '99264032ac96c8b6'): 'CIFAR-10 JPEG copy',  # quality 75: ../shared/data/cifar10-jpg.tgz
}


def _fingerprint(files: Sequence[str], pixels: np.ndarray) -> dict[str, str]:
    """Per split, a hash of its (class, pixels) pairs taken in any order: the same images give the same hash
    whatever their folder, file names or file format; one changed pixel or label changes it."""
    digests: dict[str, list[bytes]] = {'train': [], 'test': []}
    for rel, px in zip(files, pixels):
        split, label = Path(rel).parts[:2]
        digests[split].append(hashlib.sha1(label.encode() + b'/' + px.tobytes()).digest())
    return {s: hashlib.sha256(b''.join(sorted(d))).hexdigest()[:16] for s, d in digests.items()}


def _stamp(entry: os.DirEntry) -> tuple[str, int, int]:
    """Name, size and mtime of a folder entry: what the decoded cache's key depends on."""
    try: st = entry.stat()
    except OSError: return entry.name, -1, -1  # a dangling link: listed, then skipped as unreadable
    return entry.name, st.st_size, st.st_mtime_ns


def _scan(root: Path, size: int) -> Scan:
    """Readable images under `root`, the .npy holding them decoded and their fingerprint; cached until a file's name,
    size or mtime changes."""
    classes = check_layout(root)
    listing = {root / s / c: sorted(map(_stamp, os.scandir(root / s / c))) for s in ('train', 'test') for c in classes}
    key = hashlib.sha1((f'{_CACHE_FORMAT}:{root.resolve()}:{size}:'
                        f'{[(str(d), e) for d, e in listing.items()]}').encode()).hexdigest()[:16]
    if key in _SCANS: return _SCANS[key]
    cache = cache_dir()
    meta, npy = cache / f'images-{key}.json', cache / f'images-{key}.npy'
    if not (meta.exists() and npy.exists()):
        files, others = [], []
        for d, entries in listing.items():
            for name, *_ in entries:
                (files if os.path.splitext(name)[1].lower() in IMAGE_EXTS else others).append(d / name)
        bad, wrong, pixels = _decode(files, size)
        if wrong:
            raise DataError(f'{len(wrong)} images are not {size}x{size} ({_few(wrong)}); '
                            f'resize them to {size}x{size} or remove them')
        skip = set(bad)
        good = [str(f.relative_to(root)) for f in files if str(f) not in skip]
        npy.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp := npy.with_suffix(f'.{os.getpid()}.tmp'), 'wb') as fh: np.save(fh, pixels)
        os.replace(tmp, npy)
        atomic_write(meta, json.dumps(dict(files=good, bad=bad, others=[str(f) for f in others],
                                           fingerprint=_fingerprint(good, pixels))))
    info = json.loads(meta.read_text())
    if info['others']:
        warnings.warn(f"ignoring {len(info['others'])} non-image files: {_few(info['others'])}", stacklevel=3)
    if info['bad']: warnings.warn(f"skipping {len(info['bad'])} unreadable images: {_few(info['bad'])}", stacklevel=3)
    files = [root / f for f in info['files']]
    counts = {d: 0 for d in listing}
    for f in files: counts[f.parent] += 1
    if empty := [d for d, n in counts.items() if n == 0]:
        raise DataError(f'{_few(empty)} hold no readable images; add some or remove the folder')
    _SCANS[key] = Scan(files, npy, info['fingerprint'])
    return _SCANS[key]


def image_files(root: Path, size: int = 32) -> list[Path]:
    """Decodable images under `root`/train and `root`/test; skips unreadable and non-image files with a warning."""
    return _scan(root, size).files


def data_fingerprint(root: Path, size: int = 32) -> dict[str, str]:
    """{'train': ..., 'test': ...}: hashes of each full split's labelled pixels, the same for the same images on any
    machine, under any path or file names (taken before `--subset` picks images)."""
    return _scan(root, size).fingerprint


def data_name(fingerprint: dict[str, str] | None) -> str:
    """What the results table calls the data with this fingerprint: a known copy's name, else 'other data (...)'."""
    if not fingerprint: return 'not recorded'
    return KNOWN_COPIES.get((fingerprint['train'], fingerprint['test']), f"other data ({fingerprint['train'][:8]})")


class DecodedImages:
    """`get_x` reading an image file's pixels from the decoded cache of its folder; other items pass unchanged."""

    def __init__(self, root: Path, size: int = 32):
        files, self.npy, _ = _scan(root, size)
        self.index, self._pixels = {str(f): i for i, f in enumerate(files)}, None

    def __call__(self, item):
        i = self.index.get(str(item)) if isinstance(item, (str, Path)) else None
        if i is None: return item  # `rgb_array` opens it: predict on new files, exported learners
        if self._pixels is None: self._pixels = np.load(self.npy, mmap_mode='r')  # opened once per worker, pages shared
        return np.array(self._pixels[i])

    def __getstate__(self) -> dict:
        return dict(npy=self.npy, index={}, _pixels=None)  # keep model.pkl small: an exported learner reads files


def _download() -> Path:
    from fastai.data.external import URLs, untar_data
    try: return untar_data(URLs.CIFAR)
    except OSError as e:  # urllib's URLError: no network, or the server refused
        raise DataError("fastai's untar_data(URLs.CIFAR) could not download CIFAR-10 "
                        f"({getattr(e, 'reason', None) or e}); "
                        "pass --data with a local copy or set CIFAR10_DIR") from None


def cifar10_path(data: str | Path | None = None) -> Path:
    """Locate CIFAR-10: `data` (folder or .tgz), else `$CIFAR10_DIR`, else fastai's `untar_data(URLs.CIFAR)`."""
    src = data or os.environ.get('CIFAR10_DIR')
    if src:
        path = Path(src).expanduser()
        if not path.exists():
            raise DataError(f"{path} does not exist; pass --data with a CIFAR-10 folder or .tgz (or set CIFAR10_DIR)")
        if path.is_file(): path = extract_archive(path)
    else: path = _download()
    root = _find_root(path)
    image_files(root)  # checks layout and every image once (the scan is cached), before any run folder is made
    return root


class AlbumentationsTransform(ItemTransform):
    """Apply an albumentations pipeline to the image of each training item only (`split_idx = 0`)."""
    split_idx, order = 0, 2

    def __init__(self, aug: A.BasicTransform | Sequence[A.BasicTransform]):
        super().__init__()
        self.aug, self._seeded_in = aug if isinstance(aug, A.BaseCompose) else A.Compose(list(aug)), None

    def reseed(self) -> None:
        """Draw a new albumentations seed from Python's `random` at the next image (called at each epoch start)."""
        self._seeded_in = None

    def encodes(self, item: list) -> list:
        # an ItemTransform gets [image, label, ...] at once: one dispatch per item instead of one per element
        if self._seeded_in != os.getpid():  # albumentations seeds itself from the OS; follow fastai's seeded `random`
            self.aug.set_random_seed(random.getrandbits(32))
            self._seeded_in = os.getpid()
        return [self.aug(image=item[0])['image'], *item[1:]]


def rgb_array(item: Path | str | Image.Image | np.ndarray, size: int = 32) -> np.ndarray:
    """HWC uint8 RGB pixels of an image file, PIL image or array (as `DecodedImages` gives them), `size`x`size`."""
    if isinstance(item, np.ndarray) and item.shape == (size, size, 3): return item
    try: img = (Image.fromarray(item) if isinstance(item, np.ndarray) else item if isinstance(item, Image.Image)
                else load_image(item))
    except (OSError, SyntaxError, ValueError) as e: raise DataError(f'{item} is not a readable image ({e})') from None
    a = _rgb(img, item if isinstance(item, (str, Path)) else type(item).__name__)
    if a.shape[:2] != (size, size):  # predict on any image; training data is checked
        a = np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))
    return a


class ArrayImageDL(TfmdDL):
    """`TfmdDL` that stacks a batch's HWC uint8 image arrays into one `TensorImage` (NCHW view of NHWC memory)."""

    def create_batch(self, b):
        if self.prebatched or not isinstance(b[0][0], np.ndarray): return super().create_batch(b)
        # one stack per batch instead of a tensor per image; the NHWC layout is what channels_last wants anyway
        imgs = torch.from_numpy(np.stack([s[0] for s in b])).permute(0, 3, 1, 2).as_subclass(TensorImage)
        return (imgs, *(fa_collate(list(col)) for col in zip(*(s[1:] for s in b))))


def ArrayImageBlock() -> TransformBlock:
    """Like fastai's `ImageBlock`, but images stay numpy arrays through the item transforms: no PIL round trip."""
    return TransformBlock(type_tfms=rgb_array, batch_tfms=IntToFloatTensor, dl_type=ArrayImageDL)


HOLDOUT_SEED = 0  # every --holdout run holds out the same images, whatever its --seed: trials compare on one set


def holdout_files(files: Sequence[Path], n: int) -> set[Path]:
    """`n` training images of `files`, the same number from each class, drawn with `HOLDOUT_SEED`."""
    by_class: dict[str, list[Path]] = {}
    for f in sorted(f for f in files if f.parent.parent.name == 'train'):
        by_class.setdefault(f.parent.name, []).append(f)
    k, smallest = n // len(by_class), min(map(len, by_class.values()))
    if not 0 < k < smallest:
        raise DataError(f'--holdout {n} takes {k} images from each of {len(by_class)} classes; take from 1 to '
                        f'{smallest - 1} per class, i.e. --holdout {len(by_class)} to {(smallest - 1) * len(by_class)}')
    rng = random.Random(HOLDOUT_SEED)
    return {f for fs in by_class.values() for f in rng.sample(fs, k)}


def _items(n_per_class: int | None, held: set[Path] | None):
    """`get_items`: the train and test images, or with `held` the training images only (`held` among them);
    `n_per_class` limits the images trained on."""
    def get_items(path: Path) -> list[Path]:
        keep, seen = [], {}
        for f in image_files(path):
            split = f.parent.parent.name
            if held is not None and split == 'test': continue
            if split == 'test' or (held and f in held): keep.append(f)
            elif n_per_class is None or seen.get(f.parent.name, 0) < n_per_class:
                keep.append(f)
                seen[f.parent.name] = seen.get(f.parent.name, 0) + 1
        return keep
    return get_items


class ResizeBatch(Transform):
    """Resize every batch of images to `size` x `size` (bilinear), on the DataLoaders' device, train and test alike."""
    order = 20  # after IntToFloatTensor (10) and the batch augmentations (15), before Normalize (99)

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def encodes(self, x: TensorImage) -> TensorImage:
        x = torch.nn.functional.interpolate(x.as_subclass(torch.Tensor), size=(self.size, self.size), mode='bilinear',
                                            align_corners=False, antialias=self.size < x.shape[-1])
        return TensorImage(x)


def cifar_block(augs: Sequence[A.BasicTransform] = (), n_per_class: int | None = None,
                images: DecodedImages | None = None, held: set[Path] | None = None,
                batch_augs: Sequence[Transform] = (), size: int = 32) -> DataBlock:
    """DataBlock for CIFAR-style folders: train/ vs test/ split, parent-folder labels, `augs` (albumentations, per
    image) and `batch_augs` (fastai batch transforms) on train only; batches resized to `size` px where not 32."""
    return DataBlock(blocks=(ArrayImageBlock, CategoryBlock), get_items=_items(n_per_class, held), get_x=images,
                     splitter=GrandparentSplitter(train_name='train', valid_name='test') if held is None
                     else FuncSplitter(held.__contains__), get_y=parent_label,
                     item_tfms=AlbumentationsTransform(augs) if augs else None,
                     # moved with the DataLoaders, not to GPU 0
                     batch_tfms=[*batch_augs, *([ResizeBatch(size)] if size != 32 else []),
                                 Normalize.from_stats(*CIFAR_STATS, cuda=False)])


class CifarDataLoaders(DataLoaders):
    """fastai `DataLoaders` that say what they hold when shown (in Jupyter or the terminal)."""
    valid_name = 'test'  # what validates: the test split, or `--holdout`'s training images

    def __repr__(self) -> str:
        aug = next((t for t in self.train.after_item.fs if isinstance(t, AlbumentationsTransform)), None)
        augs = ', '.join(type(t).__name__ for t in aug.aug.transforms) if aug else 'none'
        batch = ', '.join(type(t).__name__ for t in self.train.after_batch.fs if t.split_idx == 0)
        return '\n'.join([f'{type(self).__name__}: {len(self.vocab)} classes ({", ".join(self.vocab)}) '
                          f'from {self.path}',
                          *(f'  {name}: {len(dl.dataset):,} images, {len(dl)} batches of {dl.bs}'
                            for name, dl in (('train', self.train), (self.valid_name, self.valid))),
                          f'  train-only albumentations: {augs}',
                          *([f'  train-only batch augmentations: {batch}'] if batch else []),
                          f'  device: {self.device}'])


def cifar_dls(path: Path, augs: Sequence[A.BasicTransform] = (), bs: int = 128, n_per_class: int | None = None,
              workers: int | None = None, device=None, holdout: int | None = None,
              batch_augs: Sequence[Transform] = (), size: int = 32) -> CifarDataLoaders:
    """Train/test `DataLoaders` for the CIFAR-style folder `path`, reading images from its decoded cache, `augs` and
    `batch_augs` on train only, every batch resized to `size` px; with `holdout`, train/hold-out: that many training
    images (`holdout_files`) validate and the test split is not read."""
    if workers is None: workers = min(4, os.cpu_count() or 1)
    held = holdout_files(image_files(path), holdout) if holdout else None
    block = cifar_block(augs, n_per_class, DecodedImages(path), held, batch_augs, size)
    dls = block.dataloaders(path, path=path, bs=bs, num_workers=workers, device=device)
    dls = CifarDataLoaders(*dls.loaders, path=dls.path, device=dls.device)
    if held: dls.valid_name = 'hold-out'
    return dls
