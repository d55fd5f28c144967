"""kdiff_align.data: every dataset type, a resumable batch order, clear errors for missing data."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import write_fake_cifar10
from kdiff_align import data
from kdiff_align.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def cifar_config(location, **dataset) -> dict:
    config = json.loads((ROOT / 'configs' / 'cifar_aligned.json').read_text())
    config['dataset'].update(location=str(location), **dataset)
    return load_config(config)


def test_cifar10_reads_torchvision_layout_with_labels_and_aug_cond(tmp_path):
    write_fake_cifar10(tmp_path)
    dataset = data.make_dataset(cifar_config(tmp_path, check_md5=False))
    assert len(dataset) == 20
    x, label, aug_cond = dataset[0]
    assert x.shape == (3, 32, 32) and x.abs().max() < 1.5  # [-1, 1], bicubic warps overshoot a little
    assert label.dtype == torch.long and 0 <= label < 10 and aug_cond.shape == (9,)
    data.check_items(cifar_config(tmp_path, check_md5=False), dataset)


def test_cifar10_missing_or_corrupt_data_says_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(data.DataError, match=r'CIFAR-10 not found: .* lacks data_batch_1.*'
                                             r'cifar-10-python.tar.gz'):
        data.make_dataset(cifar_config(tmp_path / 'none'))
    from torchvision import datasets

    def offline(self):
        raise OSError('network is unreachable')
    monkeypatch.setattr(datasets.CIFAR10, 'download', offline)  # tests never touch the network
    with pytest.raises(data.DataError, match=r'downloading it failed \(network is unreachable\)'):
        data.make_dataset(cifar_config(tmp_path / 'none', download=True))
    write_fake_cifar10(tmp_path)
    with pytest.raises(data.DataError, match=r"fail torchvision's checksums: data_batch_1.*\"check_md5\": false"):
        data.make_dataset(cifar_config(tmp_path))


def test_imagefolder_class_labels_folders_and_checks_num_classes(tmp_path):
    for c, name in enumerate(['cat', 'dog', 'eel']):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(np.full((12, 10, 3), 40 * c, np.uint8)).save(tmp_path / name / f'{i}.png')
    config = cifar_config(tmp_path)
    config['dataset'].update(type='imagefolder-class', num_classes=3)
    config['model']['input_size'] = [8, 8]
    dataset = data.make_dataset(config)
    assert len(dataset) == 6 and sorted(int(dataset[i][1]) for i in range(6)) == [0, 0, 1, 1, 2, 2]
    assert dataset[0][0].shape == (3, 8, 8)
    config['dataset']['num_classes'] = 10
    with pytest.raises(ConfigError, match=r'has 3 class folders .*set num_classes to 3'):
        data.make_dataset(config)


def test_custom_hook_loads_get_dataset_relative_to_the_config(tmp_path):
    (tmp_path / 'my_data.py').write_text(
        'import torch\n'
        'from PIL import Image\n'
        'class DS:\n'
        '    def __init__(self, n, transform): self.n, self.tf = n, transform\n'
        '    def __len__(self): return self.n\n'
        '    def __getitem__(self, i): return self.tf(Image.new("RGB", (32, 32))), i % 10\n'
        'def get_dataset(config, transform): return DS(config["n"], transform)\n')
    config = cifar_config(tmp_path)
    config['dataset'].update(type='custom', location='my_data.py', config={'n': 5})
    dataset = data.make_dataset(config, config_dir=tmp_path)
    assert len(dataset) == 5 and int(dataset[3][1]) == 3 and dataset[3][0].shape == (3, 32, 32)
    config['dataset']['get_dataset'] = 'nope'
    with pytest.raises(data.DataError, match="defines no function 'nope'"):
        data.make_dataset(config, config_dir=tmp_path)


def test_digits_and_toy_and_shape_checks():
    config = load_config(ROOT / 'configs' / 'digits_aligned.json')
    digits = data.make_dataset(config)
    assert len(digits) == 1352 and digits[0][0].shape == (1, 8, 8)
    assert len(data.make_dataset(config, 'test')) == 445
    config['model']['input_size'] = [16, 16]
    with pytest.raises(ConfigError, match=r'items of shape \[1, 8, 8\], but the model expects \[1, 16, 16\]'):
        data.make_dataset(config)
    toy = load_config(ROOT / 'configs' / 'toy_aligned.json')
    items = data.make_dataset(toy)
    assert len(items) == 8192 and items[0][0].shape == (2,)


def test_batch_order_is_resumable_and_sharded():
    dataset = data.TensorItems(torch.arange(10.)[:, None], torch.arange(10))
    full = [b[1].tolist() for _, b in zip(range(7), data.batches(dataset, 3, seed=5))]
    assert all(len(b) == 3 for b in full) and sorted(sum(full[:3], [])) == sorted(set(sum(full[:3], [])))
    assert full[:3] != full[3:6]  # a new permutation every epoch
    resumed = [b[1].tolist() for _, b in zip(range(3), data.batches(dataset, 3, seed=5, batches_seen=4))]
    assert resumed == full[4:7]
    # Two processes split each global batch; together they see what one process of batch 2 x 2 would.
    shards = [[b[1].tolist() for _, b in zip(range(2), data.batches(dataset, 2, seed=5, rank=r, world_size=2))]
              for r in range(2)]
    assert len(set(sum(shards[0] + shards[1], []))) == 8
    with pytest.raises(data.DataError, match='fewer than one batch of 11'):
        next(data.batches(dataset, 11, seed=0))


def test_item_randomness_is_seeded_per_item_not_by_the_global_rng():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(1), torch.tensor(i), torch.zeros(9)
    first = next(data.batches(Noisy(), 2, seed=1))[0]
    torch.rand(5)  # moving the global RNG changes nothing
    assert torch.equal(next(data.batches(Noisy(), 2, seed=1))[0], first)
    state = torch.get_rng_state()
    next(data.batches(Noisy(), 2, seed=1, num_workers=1))
    assert torch.equal(torch.get_rng_state(), state)
