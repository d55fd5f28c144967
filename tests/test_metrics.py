"""Metrics on cases with known answers: identical sets, shifted Gaussians (closed forms), floors, bad inputs."""

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kdiff_align.evaluation import metrics
from kdiff_align.data.toy import ToyMixture


def gaussian(n, d, shift=0.0, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) * scale + shift


def test_frechet_distance_closed_form_for_gaussians():
    # FD(N(mu1, S1), N(mu2, S2)) = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2); for S1 = a^2 I, S2 = b^2 I:
    # |dmu|^2 + d (a - b)^2.
    d = 5
    mu1, mu2 = np.zeros(d), np.full(d, 0.7)
    assert metrics.frechet_distance(mu1, 4 * np.eye(d), mu2, 9 * np.eye(d)) == pytest.approx(d * 0.49 + d * 1.0)
    # A non-commuting pair against scipy's sqrtm-based formula.
    import scipy.linalg
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + np.eye(d), b @ b.T + np.eye(d)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_from_samples_of_shifted_gaussians():
    x, y = gaussian(20000, 4, seed=0), gaussian(20000, 4, shift=0.5, seed=1)
    # Closed form |dmu|^2 = 4 * 0.25 = 1, plus an O(d^2 / n) estimation bias.
    assert metrics.frechet_distance_features(x, y) == pytest.approx(1.0, abs=0.03)


def test_identical_sets_give_zero():
    x = gaussian(500, 3)
    assert metrics.frechet_distance_features(x, x) == pytest.approx(0, abs=1e-9)
    assert metrics.energy_distance(x, x) == pytest.approx(0, abs=1e-12)
    assert metrics.sliced_wasserstein(x, x) == 0


def test_kid_same_distribution_is_near_zero_and_shift_is_positive():
    x, y, z = gaussian(1000, 8, seed=0), gaussian(1000, 8, seed=1), gaussian(1000, 8, shift=1.0, seed=2)
    same = metrics.kid(x, y, num_subsets=20, subset_size=500)
    shifted = metrics.kid(x, z, num_subsets=20, subset_size=500)
    assert abs(same) < 0.02 and shifted > 0.5  # unbiased MMD^2: mean 0 for one distribution


def test_energy_distance_closed_form_for_shifted_gaussians():
    # 1-D N(0, 1) vs N(delta, 1): E|X - Y| for X - Y ~ N(delta, 2), E|X - X'| = 2 / sqrt(pi).
    delta, s = 1.0, math.sqrt(2)
    e_xy = s * math.sqrt(2 / math.pi) * math.exp(-delta ** 2 / (2 * s ** 2)) + delta * math.erf(delta / (s * math.sqrt(2)))
    expected = 2 * e_xy - 2 * (2 / math.sqrt(math.pi))
    x = gaussian(4000, 1, seed=0)
    floor = metrics.energy_distance(x, gaussian(4000, 1, seed=2))
    assert 0 < floor < 0.01
    estimates = [metrics.energy_distance(gaussian(1500, 1, seed=10 + k), gaussian(1500, 1, shift=delta, seed=50 + k))
                 for k in range(16)]
    assert np.mean(estimates) == pytest.approx(expected, abs=0.04)  # sampling sd of the mean ~0.01


def test_energy_distance_u_equals_the_brute_force_formula():
    x, y = gaussian(5, 3, seed=0), gaussian(7, 3, shift=0.3, seed=1)
    d = lambda a, b: float(torch.linalg.vector_norm(a - b))
    e_xy = sum(d(a, b) for a in x for b in y) / (5 * 7)
    e_xx = sum(d(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    e_yy = sum(d(y[i], y[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    assert metrics.energy_distance_u(x, y) == pytest.approx(2 * e_xy - e_xx - e_yy, rel=1e-12)
    v, u = metrics.energy_distance_vu(x, y)
    assert u == metrics.energy_distance_u(x, y) and v == pytest.approx(metrics.energy_distance(x, y), rel=1e-12)
    with pytest.raises(ValueError, match='n, m >= 2'):
        metrics.energy_distance_u(x[:1], y)


def test_energy_distance_u_is_unbiased_where_the_v_statistic_is_not():
    # Two sets of n = 20 from one 2-D Gaussian, 400 times: the U-statistic's mean is 0 within 4 standard errors; the
    # V-statistic's is E|X - X'| (1/n + 1/m) = sqrt(pi) / 10 = 0.177, far above it.
    draws = [metrics.energy_distance_vu(gaussian(20, 2, seed=2 * k), gaussian(20, 2, seed=2 * k + 1)) for k in range(400)]
    v, u = np.array(draws).T
    se = u.std(ddof=1) / math.sqrt(len(u))
    assert abs(u.mean()) < 4 * se < 0.03
    assert v.mean() == pytest.approx(math.sqrt(math.pi) / 10, rel=0.1) and v.mean() > 10 * se


@pytest.mark.slow
def test_sliced_wasserstein_closed_form_for_shifted_isotropic_gaussians():
    # Projections of N(0, I) and N(delta, I) on theta differ by theta.delta: SW_2^2 = E (theta.delta)^2 = |delta|^2/d.
    d, delta = 2, torch.tensor([1.0, 1.0], dtype=torch.float64)
    x, y = gaussian(4000, d, seed=0), gaussian(4000, d, seed=1) + delta
    floor = metrics.sliced_wasserstein(x, gaussian(4000, d, seed=2), num_projections=2048)
    assert 0 < floor < 0.01
    assert metrics.sliced_wasserstein(x, y, num_projections=2048) == pytest.approx(2.0 / d, abs=0.08)
    # Unequal sizes go through quantiles.
    assert metrics.sliced_wasserstein(x, y[:3000], num_projections=2048) == pytest.approx(1.0, abs=0.08)


def test_toy_distances_exact_samples_sit_at_the_floor_and_a_shift_does_not():
    mix = ToyMixture(4)
    gen = torch.Generator().manual_seed(5)
    labels = torch.arange(4).repeat_interleave(500)
    exact = torch.cat([mix.sample_class(c, 500, gen) for c in range(4)])
    d = metrics.toy_distances(exact, labels, mix, seed=1)
    assert d['energy'] < 3 * d['energy_floor'] and d['sliced_w2'] < 3 * d['sliced_w2_floor']
    shifted = metrics.toy_distances(exact + 0.5, labels, mix, seed=1)
    assert shifted['energy'] > 10 * d['energy_floor']


@pytest.mark.slow
def test_digits_metrics_real_held_out_split_is_the_floor():
    from kdiff_align.data.digits import load_digits

    x, y = load_digits('test')
    m = metrics.digits_metrics(x, y)
    assert m['fd'] == pytest.approx(m['fd_floor']) and m['accuracy'] == pytest.approx(m['accuracy_real'])
    assert m['accuracy_real'] > 0.95 and m['fd_floor'] < 5
    noise = metrics.digits_metrics(torch.rand_like(x) * 2 - 1, y)
    assert noise['fd'] > 50 * m['fd_floor'] and noise['accuracy'] < 0.3
    # Deterministic: a fresh classifier (cache cleared) gives the same numbers.
    metrics.digits_classifier.cache_clear()
    metrics.digits_reference.cache_clear()
    assert metrics.digits_metrics(x, y)['fd_floor'] == pytest.approx(m['fd_floor'], rel=1e-5)


def test_frechet_distance_and_kid_are_clean_fids():
    from cleanfid import fid as cleanfid_fid

    x, y = gaussian(300, 16, seed=3).numpy(), gaussian(200, 16, shift=0.3, scale=1.2, seed=4).numpy()
    theirs = cleanfid_fid.frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert theirs > 1
    assert abs(metrics.frechet_distance_features(x, y) - theirs) <= 1e-13
    np.random.seed(7)
    theirs_kid = cleanfid_fid.kernel_distance(x, y, num_subsets=5, max_subset_size=100)
    # Our seed selects clean-fid's subsets, and numpy's global generator is left as the caller had it.
    np.random.seed(11)
    expected_next = np.random.rand()
    np.random.seed(11)
    assert metrics.kid(x, y, num_subsets=5, subset_size=100, seed=7) == theirs_kid
    assert np.random.rand() == expected_next


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match='shapes do not match'):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r'2-D array \[n, d\]'):
        metrics.feature_statistics(np.zeros(5))
    with pytest.raises(ValueError, match='point sets'):
        metrics.energy_distance(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match='feature widths differ'):
        metrics.kid(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match='at least 2 rows in each set, got 1 and 4'):
        metrics.kid(np.zeros((1, 2)), np.zeros((4, 2)))


def test_missing_inception_weights_say_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    with pytest.raises(metrics.InceptionError) as err:
        metrics.InceptionFeatures(tmp_path / 'nowhere.pt')
    message = str(err.value)
    assert metrics.INCEPTION_URL in message and '--inception' in message and metrics.INCEPTION_ENV in message
    wrong = tmp_path / metrics.INCEPTION_FILE
    wrong.write_bytes(b'not a model')
    with pytest.raises(metrics.InceptionError, match='SHA-256'):
        metrics.InceptionFeatures(tmp_path)


@pytest.fixture
def no_inception_on_disk(tmp_path, monkeypatch):
    """No Inception file where kdiff-align looks (no flag, no $KDIFF_ALIGN_INCEPTION, empty caches); returns
    clean-fid's cache folder."""
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    cache = tmp_path / 'cleanfid-cache'
    cache.mkdir()
    monkeypatch.setattr(metrics, 'CLEANFID_CACHE', cache)
    return cache


def fake_fetch(monkeypatch, content=None, error=None):
    """clean-fid's Inception download replaced: it writes content into the folder, then raises error if given."""
    from cleanfid import downloads_helper

    calls = []

    def fetch(fpath):
        calls.append(fpath)
        path = Path(fpath) / metrics.INCEPTION_FILE
        if content is not None:
            path.write_bytes(content)
        if error is not None:
            raise error
        return str(path)

    monkeypatch.setattr(downloads_helper, 'check_download_inception', fetch)
    return calls


def test_failed_inception_fetch_says_in_one_line_how_to_run_offline(no_inception_on_disk, monkeypatch):
    from urllib.error import URLError

    calls = fake_fetch(monkeypatch, content=b'partial', error=URLError('[Errno -3] Temporary failure in name '
                                                                      'resolution'))
    with pytest.raises(metrics.InceptionError) as err:
        metrics.InceptionFeatures()
    message = str(err.value)
    assert calls == [str(no_inception_on_disk)]
    assert '\n' not in message and 'could not download' in message and 'name resolution' in message
    assert str(no_inception_on_disk / metrics.INCEPTION_FILE) in message
    assert '--inception PATH' in message and metrics.INCEPTION_ENV in message
    assert not (no_inception_on_disk / metrics.INCEPTION_FILE).exists()  # the partial file does not trip a rerun


def test_a_fetched_file_with_the_wrong_sha256_is_refused_and_removed(no_inception_on_disk, monkeypatch):
    fake_fetch(monkeypatch, content=b'<html>an error page, not a TorchScript</html>')
    with pytest.raises(metrics.InceptionError) as err:
        metrics.InceptionFeatures(allow_unverified=True)  # a download must be the real file, flag or not
    message = str(err.value)
    assert '\n' not in message and 'downloaded by clean-fid' in message and metrics.INCEPTION_SHA256 in message
    assert not (no_inception_on_disk / metrics.INCEPTION_FILE).exists()


def test_a_fetched_file_is_checked_and_then_reused_from_clean_fids_cache(no_inception_on_disk, monkeypatch):
    content = b'stands in for the TorchScript'
    monkeypatch.setattr(metrics, 'INCEPTION_SHA256', hashlib.sha256(content).hexdigest())
    calls = fake_fetch(monkeypatch, content=content)
    expected = no_inception_on_disk / metrics.INCEPTION_FILE
    assert metrics.inception_path() == expected and len(calls) == 1
    assert metrics.inception_path() == expected and len(calls) == 1  # found on disk: no second fetch


def test_an_explicit_path_or_variable_never_fetches(tmp_path, monkeypatch):
    calls = fake_fetch(monkeypatch, content=b'x')
    monkeypatch.setenv(metrics.INCEPTION_ENV, str(tmp_path / 'missing.pt'))
    with pytest.raises(metrics.InceptionError, match='not found'):
        metrics.inception_path()
    with pytest.raises(metrics.InceptionError, match='not found'):
        metrics.inception_path(tmp_path / 'also-missing.pt')
    assert calls == []
