"""Training data: every dataset yields (image, class label, aug_cond) and a resumable, seeded batch order.

Dataset types (config "dataset.type"): cifar10 (torchvision's files under `location`), imagefolder-class
(one folder per class), imagefolder (unconditional), digits (scikit-learn's load_digits, offline), toy (the
2-D class-conditional mixture of kdiff_align.data.toy) and upstream's `custom` hook (a Python file `location`,
relative to the config, whose `get_dataset(config, transform=tf)` returns the dataset). Condition dropout is
not done here: AlignedDenoiser draws the null-condition anchor rows itself (docs/design.md section 1).

Order: epoch e is the permutation of torch.Generator().manual_seed(seed + e); process r of R takes rows
[(i R + r) B, (i R + r + 1) B) for its i-th batch. Any (epoch, batch) position is reproducible, so a resumed
run continues the exact batch sequence. Per-item randomness (augmentation) is seeded from (seed, epoch,
index), independent of workers.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils import data

from ..errors import ConfigError, DataError  # noqa: F401 (re-exported)

CIFAR10_FILES = ('data_batch_1', 'data_batch_2', 'data_batch_3', 'data_batch_4', 'data_batch_5', 'test_batch',
                 'batches.meta')
CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'


class TensorItems(data.Dataset):
    """(x, label, aug_cond) rows of in-memory tensors."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor):
        self.x, self.labels = x, labels
        self.zeros = torch.zeros(9)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x[index], self.labels[index], self.zeros


class PipelineItems(data.Dataset):
    """Adapts an upstream-style dataset whose item[image_key] is the augmentation pipeline's
    (image, image_orig, aug_cond) or an image tensor, and item[class_key] is the label."""

    def __init__(self, dataset: Any, image_key: Any = 0, class_key: Any = 1, conditional: bool = True):
        self.dataset, self.image_key, self.class_key, self.conditional = dataset, image_key, class_key, conditional

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        item = self.dataset[index]
        image = item[self.image_key]
        if isinstance(image, (tuple, list)):
            image, aug_cond = image[0], image[2]
        else:
            aug_cond = torch.zeros(9)
        label = torch.as_tensor(item[self.class_key] if self.conditional else 0, dtype=torch.long)
        return torch.as_tensor(image), label, aug_cond


class SeededItems(data.Dataset):
    """Fetches dataset[index] for keys (epoch, index) with the torch RNG seeded from (seed, epoch, index)."""

    def __init__(self, dataset: data.Dataset, seed: int, seeded: bool = True):
        self.dataset, self.seed, self.seeded = dataset, seed, seeded

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        if not self.seeded:
            return self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.dataset[index]


class ResumableSampler(data.Sampler):
    """(epoch, index) keys of one process's batches, endless, from global batch `start` of `epoch` onwards."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.epoch, self.start
        while True:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            for i in range(start, batches_per_epoch(self.n, self.batch_size, self.world_size)):
                lo = (i * self.world_size + self.rank) * self.batch_size
                for index in perm[lo:lo + self.batch_size]:
                    yield epoch, index
            epoch, start = epoch + 1, 0


def batches_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Full batches per process per epoch (the last partial global batch is dropped, like upstream)."""
    return n // (batch_size * world_size)


def batches(dataset: data.Dataset, batch_size: int, seed: int, batches_seen: int = 0, *, num_workers: int = 0,
            rank: int = 0, world_size: int = 1, seeded_items: bool = True) -> Iterator[Any]:
    """An endless iterator of one process's batches, starting after `batches_seen` batches.

    One loader for the whole run: its workers live across epochs (a loader per epoch restarted every worker
    every 14 steps in the GPU check's digits run; docs/gpu.md), and batches are pinned for asynchronous copies
    when CUDA is available."""
    n = len(dataset)
    per_epoch = batches_per_epoch(n, batch_size, world_size)
    if per_epoch == 0:
        raise DataError(f'the dataset has {n} items, fewer than one batch of {batch_size} x {world_size} '
                        f'process(es); lower --batch-size')
    epoch, start = divmod(batches_seen, per_epoch)
    sampler = ResumableSampler(n, batch_size, seed, epoch, start, rank, world_size)
    # The loader's own seed (worker base seeds) comes from this generator, never from the global RNG.
    loader = data.DataLoader(SeededItems(dataset, seed, seeded_items), batch_size, sampler=sampler,
                             num_workers=num_workers, generator=torch.Generator().manual_seed(seed + epoch),
                             pin_memory=torch.cuda.is_available())
    yield from loader


def _size(config: Mapping[str, Any]) -> list[int]:
    return config['model']['input_size']


def _image_transform(config: Mapping[str, Any]):
    """Upstream's transform: resize, center crop, Karras augmentation (image, image_orig, aug_cond)."""
    from k_diffusion.augmentation import KarrasAugmentationPipeline
    from torchvision import transforms

    model = config['model']
    size = _size(config)
    mode = 'RGB' if model['input_channels'] == 3 else 'L' if model['input_channels'] == 1 else None
    if mode is None:
        raise ConfigError(f'config key \'model.input_channels\': got {model["input_channels"]!r}; image datasets '
                          'allow 1 (grayscale) or 3 (RGB)')
    return transforms.Compose([
        transforms.Lambda(lambda image: image.convert(mode)),
        transforms.Resize(min(size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        KarrasAugmentationPipeline(model.get('augment_prob', 0.), disable_all=model.get('augment_prob', 0.) == 0),
    ])


def _location(config: Mapping[str, Any], config_dir: str | Path | None) -> Path:
    dataset = config['dataset']
    if not dataset.get('location'):
        raise ConfigError(f'config key \'dataset.location\' is required for dataset type {dataset["type"]!r} '
                          '(a folder path, relative to the working directory)')
    path = Path(dataset['location'])
    if dataset['type'] == 'custom' and not path.is_absolute() and config_dir is not None:
        path = Path(config_dir) / path
    return path


def _cifar10(config: Mapping[str, Any], split: str) -> data.Dataset:
    """torchvision's CIFAR-10 from its python-pickle files under dataset.location (never downloaded unless
    dataset.download is true); dataset.check_md5 (default true) verifies torchvision's checksums."""
    import pickle

    from torchvision import datasets
    from torchvision.datasets.utils import check_integrity

    root = _location(config, None)
    folder = root / 'cifar-10-batches-py'
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing and config['dataset'].get('download', False):
        try:
            datasets.CIFAR10(str(root), train=True, download=True)
        except Exception as err:  # noqa: BLE001 - no network, a proxy, a full disk: the fix is the same
            raise DataError(f'CIFAR-10 is not under {str(folder)!r} and downloading it failed ({err}). '
                            f'Download {CIFAR10_URL} on a machine with network access and extract it into '
                            f'{str(root)!r} (giving {str(folder)}/data_batch_1 ... test_batch).') from None
        missing = []
    if missing:
        raise DataError(f'CIFAR-10 not found: {str(folder)!r} lacks {", ".join(missing)}. Download {CIFAR10_URL} '
                        f'and extract it into {str(root)!r} (tar xzf cifar-10-python.tar.gz -C {root}), or set '
                        '"download": true in the config\'s dataset section on a machine with network access.')
    if config['dataset']['num_classes'] not in (0, 10):
        raise ConfigError(f'config key \'dataset.num_classes\': got {config["dataset"]["num_classes"]!r}; '
                          'allowed for cifar10: 10 (class-conditional) or 0 (unconditional)')
    if config['dataset'].get('check_md5', True):
        files = datasets.CIFAR10.train_list + datasets.CIFAR10.test_list + [
            [datasets.CIFAR10.meta['filename'], datasets.CIFAR10.meta['md5']]]
        corrupt = [name for name, md5 in files if not check_integrity(str(folder / name), md5)]
        if corrupt:
            raise DataError(f'CIFAR-10 files under {str(folder)!r} fail torchvision\'s checksums: '
                            f'{", ".join(corrupt)}; extract {CIFAR10_URL} again, or set "check_md5": false in the '
                            'config\'s dataset section for re-packed files')

    class CIFAR10(datasets.CIFAR10):
        def _check_integrity(self) -> bool:
            return True  # presence and checksums were checked above

        def _load_meta(self) -> None:
            with open(folder / self.meta['filename'], 'rb') as f:
                self.classes = pickle.load(f, encoding='latin1')[self.meta['key']]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return CIFAR10(str(root), train=split == 'train', download=False, transform=_image_transform(config))


def _imagefolder_class(config: Mapping[str, Any]) -> data.Dataset:
    from torchvision import datasets

    root = _location(config, None)
    if not root.is_dir():
        raise DataError(f'imagefolder-class: {str(root)!r} is not a folder; expected one subfolder per class '
                        '(root/<class name>/<image>.png)')
    dataset = datasets.ImageFolder(str(root), transform=_image_transform(config))
    num_classes = config['dataset']['num_classes']
    if len(dataset.classes) != num_classes:
        raise ConfigError(f'config key \'dataset.num_classes\': got {num_classes!r}, but {str(root)!r} has '
                          f'{len(dataset.classes)} class folders ({", ".join(dataset.classes[:5])}...); '
                          f'set num_classes to {len(dataset.classes)}')
    return dataset


def _custom(config: Mapping[str, Any], config_dir: str | Path | None) -> data.Dataset:
    path = _location(config, config_dir)
    if not path.is_file():
        raise DataError(f'custom dataset: {str(path)!r} is not a Python file; dataset.location names a file '
                        '(relative to the config) that defines get_dataset(config, transform)')
    spec = importlib.util.spec_from_file_location('kdiff_align_custom_dataset', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    name = config['dataset'].get('get_dataset', 'get_dataset')
    if not hasattr(module, name):
        raise DataError(f'custom dataset: {str(path)!r} defines no function {name!r} (dataset.get_dataset)')
    return getattr(module, name)(config['dataset'].get('config', {}), transform=_image_transform(config))


def _check_shape(config: Mapping[str, Any], shape: tuple[int, ...], what: str) -> None:
    model = config['model']
    expected = (model['input_channels'], *model['input_size']) if model['type'] != 'toy_mlp' \
        else (model['input_channels'],)
    if tuple(shape) != expected:
        raise ConfigError(f'{what} has items of shape {list(shape)}, but the model expects {list(expected)} '
                          '(model.input_channels, model.input_size)')


def make_dataset(config: Mapping[str, Any], split: str = 'train', config_dir: str | Path | None = None
                 ) -> data.Dataset:
    """The config's dataset as (x, label, aug_cond) items; label 0 for unconditional datasets."""
    dataset_config = config['dataset']
    kind, num_classes = dataset_config['type'], dataset_config['num_classes']
    if kind == 'digits':
        from .digits import load_digits
        if num_classes != 10:
            raise ConfigError(f'config key \'dataset.num_classes\': got {num_classes!r}; digits has 10 classes')
        x, labels = load_digits(split)
        _check_shape(config, x.shape[1:], 'dataset digits')
        return TensorItems(x, labels)
    if kind == 'toy':
        from .toy import ToyMixture
        if num_classes < 1:
            raise ConfigError(f'config key \'dataset.num_classes\': got {num_classes!r}; toy needs >= 1 class')
        mixture = ToyMixture(num_classes, dataset_config.get('radius', 2.0), dataset_config.get('std', 0.25))
        size = dataset_config.get('size', 8192)
        gen = torch.Generator().manual_seed(dataset_config.get('seed', 0) + (split == 'test'))
        x, labels = mixture.sample(size, generator=gen)
        _check_shape(config, x.shape[1:], 'dataset toy')
        return TensorItems(x, labels)
    if kind == 'cifar10':
        return PipelineItems(_cifar10(config, split), conditional=num_classes > 0)
    if kind == 'imagefolder-class':
        return PipelineItems(_imagefolder_class(config))
    if kind == 'imagefolder':
        from k_diffusion.utils import FolderOfImages
        root = _location(config, None)
        if num_classes:
            raise ConfigError('dataset type \'imagefolder\' is unconditional (num_classes 0); use '
                              '\'imagefolder-class\' for one folder per class')
        return PipelineItems(FolderOfImages(str(root), transform=_image_transform(config)), conditional=False)
    if kind == 'custom':
        return PipelineItems(_custom(config, config_dir), dataset_config.get('image_key', 0),
                             dataset_config.get('class_key', 1), conditional=num_classes > 0)
    raise ConfigError(f'config key \'dataset.type\': got {kind!r}; the training CLI supports cifar10, '
                      'imagefolder, imagefolder-class, digits, toy and custom (sd-captions: kdiff_align.sd)')


def uses_aug_cond(config: Mapping[str, Any]) -> bool:
    """Whether the model takes upstream's aug_cond (image_v1 with its augment wrapper, image_transformer_v1)."""
    model = config['model']
    return model['type'] == 'image_transformer_v1' or (model['type'] == 'image_v1' and model.get('augment_wrapper'))


def needs_item_rng(config: Mapping[str, Any]) -> bool:
    """Whether fetching an item draws random numbers (augmentation), so it must be seeded per item."""
    return config['dataset']['type'] not in ('digits', 'toy')


def check_items(config: Mapping[str, Any], dataset: data.Dataset) -> None:
    """Checks the first item against the model's input shape, before training starts."""
    if len(dataset) == 0:
        raise DataError(f'dataset {config["dataset"]["type"]!r} is empty')
    with torch.random.fork_rng(devices=[]):  # augmentation must not move the training RNG
        x = dataset[0][0]
    _check_shape(config, tuple(x.shape), f'dataset {config["dataset"]["type"]!r}')

