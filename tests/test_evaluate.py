"""`python -m kdiff_align.evaluate`: checkpoint loading, the resumable sweep, outputs, and error messages."""

import csv
import json

import pytest
import torch

from helpers import randomize_, tiny_config
from kdiff_align.evaluation import evaluate, metrics
from kdiff_align.storage.checkpoint import CheckpointError, load_for_inference
from kdiff_align.config import load_config, make_model
from kdiff_align.bench.claims import toy_config


@pytest.fixture
def toy_model():
    config = load_config(toy_config(quick=True))
    torch.manual_seed(0)
    model = randomize_(make_model(config), seed=0)
    return config, model


def save_pth(path, config, model, as_json=True, key='model_ema'):
    torch.save({'config': json.dumps(config) if as_json else config, key: model.state_dict()}, path)
    return path


def test_load_checkpoint_pth_and_safetensors_give_the_same_model(tmp_path, toy_model):
    from safetensors.torch import save_file

    config, model = toy_model
    paths = [save_pth(tmp_path / 'a.pth', config, model), save_pth(tmp_path / 'b.pth', config, model, as_json=False,
                                                                   key='model')]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / 'c.safetensors'),
              metadata={'config': json.dumps(config)})
    paths.append(tmp_path / 'c.safetensors')
    x, sigma, labels = torch.randn(5, 2), torch.full((5,), 1.5), torch.tensor([0, 1, 2, 3, 0])
    outs = []
    for p in paths:
        cfg, state = load_for_inference(p)   # the one reader of sample, evaluate and claims
        cfg = load_config(cfg)
        assert cfg == config
        outs.append(evaluate.build_denoiser(cfg, state)(x, sigma, class_cond=labels))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_load_checkpoint_errors_name_the_problem(tmp_path, toy_model):
    config, model = toy_model
    with pytest.raises(CheckpointError, match='missing.pth.*does not exist'):
        load_for_inference(tmp_path / 'missing.pth')
    torch.save({'weights': model.state_dict()}, tmp_path / 'bad.pth')
    with pytest.raises(CheckpointError, match=r'bad.pth.*needs the keys "config" and "model_ema" \(or "model"\)'):
        load_for_inference(tmp_path / 'bad.pth')
    (tmp_path / 'cut.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a"')
    with pytest.raises(CheckpointError, match=r"cannot read safetensors export '.*cut.safetensors'"):
        load_for_inference(tmp_path / 'cut.safetensors')
    with pytest.raises(evaluate.EvaluationError, match="sampler 'nope' is unknown"):
        evaluate.make_cells([1.], [4], ['nope'])
    with pytest.raises(evaluate.EvaluationError, match='must be >= 0'):
        evaluate.make_cells([-1.], [4], ['euler'])


def test_sweep_resumes_without_recomputing_finished_cells(tmp_path, toy_model):
    config, model = toy_model
    denoiser = evaluate.build_denoiser(config, model.state_dict())
    models = {'toy': (config, denoiser)}
    task = evaluate.make_task(config, n=80)
    first = evaluate.make_cells([0., 2.], [2], ['euler'])
    full = evaluate.make_cells([0., 2.], [2, 3], ['euler', 'euler_ancestral'])
    # A sweep interrupted after the first cells: only those cell files exist.
    r1 = evaluate.run_sweep(models, first, task, tmp_path, progress=False)
    assert len(r1.computed) == 2 and not r1.skipped
    done = {c.key: evaluate.cell_path(tmp_path, 'toy', c) for c in first}
    mtimes = {k: p.stat().st_mtime_ns for k, p in done.items()}
    r2 = evaluate.run_sweep(models, full, task, tmp_path, progress=False)
    assert sorted(k for _, k in r2.skipped) == sorted(done)
    assert sorted(k for _, k in r2.computed) == sorted(c.key for c in full if c.key not in done)
    assert {k: p.stat().st_mtime_ns for k, p in done.items()} == mtimes
    assert len(r2.rows) == len(full)
    # A fixed seed per cell: recomputing a deleted cell reproduces it exactly.
    before = json.loads(done['euler-s2-w2'].read_text())
    done['euler-s2-w2'].unlink()
    r3 = evaluate.run_sweep(models, full, task, tmp_path, progress=False)
    assert [k for _, k in r3.computed] == ['euler-s2-w2']
    again = json.loads(done['euler-s2-w2'].read_text())
    assert again['energy'] == before['energy'] and again['n'] == 80
    # The guided cell differs from the unguided one (w is applied).
    assert before['energy'] != json.loads(done['euler-s2-w0'].read_text())['energy']


@pytest.mark.slow
@pytest.mark.e2e
def test_cli_writes_tables_plots_grids_and_resumes(tmp_path, toy_model, capsys):
    config, model = toy_model
    ckpt = save_pth(tmp_path / 'toy.pth', config, model)
    out = tmp_path / 'eval'
    argv = [str(ckpt), '--out', str(out), '--w', '0', '1', '--steps', '2', '4', '--samplers', 'euler', 'euler_ancestral',
            '--n', '40', '--no-progress']
    assert evaluate.main(argv) == 0
    text = capsys.readouterr().out
    assert '8 cells computed, 0 read back' in text
    assert 'n = 40 samples vs 10 exact samples of p(x|c) per class' in text
    rows = list(csv.DictReader(open(out / 'results.csv')))
    assert len(rows) == 8 and {'energy', 'energy_floor', 'sliced_w2', 'n', 'reference', 'seed'} <= set(rows[0])
    for name in ('energy_vs_w.png', 'energy_vs_steps.png', 'samples_toy.png'):
        assert (out / name).stat().st_size > 1000
    assert evaluate.main(argv) == 0
    assert '0 cells computed, 8 read back' in capsys.readouterr().out


def test_digits_task_uses_the_held_out_split_and_rejects_n():
    from kdiff_align.bench.claims import digits_config

    config = load_config(digits_config(quick=True))
    task = evaluate.make_task(config)
    assert task.labels.shape[0] == metrics.digits_reference()['n_test'] and task.primary == 'fd'
    with pytest.raises(evaluate.EvaluationError, match='--n does not apply to digits'):
        evaluate.make_task(config, n=100)


def test_fid_without_inception_weights_fails_with_where_to_get_them(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    raw = tiny_config()
    raw['dataset'] = {'type': 'cifar10', 'num_classes': 10, 'location': str(tmp_path / 'data')}
    config = load_config(raw)
    ckpt = save_pth(tmp_path / 'img.pth', config, make_model(config))
    code = evaluate.main([str(ckpt), '--out', str(tmp_path / 'o'), '--inception', str(tmp_path / 'none.pt'),
                          '--no-progress'])
    err = capsys.readouterr().err
    assert code == 2 and metrics.INCEPTION_URL in err and 'inception-2015-12-05.pt' in err


def test_fid_without_weights_on_disk_and_offline_prints_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    monkeypatch.setattr(metrics, 'CLEANFID_CACHE', tmp_path)  # the conftest's no_downloads makes the fetch fail
    raw = tiny_config()
    raw['dataset'] = {'type': 'cifar10', 'num_classes': 10, 'location': str(tmp_path / 'data')}
    config = load_config(raw)
    ckpt = save_pth(tmp_path / 'img.pth', config, make_model(config))
    code = evaluate.main([str(ckpt), '--out', str(tmp_path / 'o'), '--no-progress'])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 2 and lines[0].startswith('Downloading inception-2015-12-05.pt with clean-fid')
    assert lines[1].startswith('error: inception-2015-12-05.pt is not on disk and clean-fid could not download it')
    assert 'to run offline' in lines[1] and '--inception PATH' in lines[1] and metrics.INCEPTION_ENV in lines[1]


def test_sample_cell_is_sample_on_its_seeded_noise(toy_model):
    from kdiff_align.sampling.sample import sample

    config, model = toy_model
    denoiser = evaluate.build_denoiser(config, model.state_dict())
    labels = torch.tensor([0, 1, 2, 3])
    cell = evaluate.Cell('euler_ancestral', 3, 1.5)
    x = evaluate.sample_cell(denoiser, config, cell, labels, seed=2, batch_size=4)
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(2 * 100_003))
    torch.manual_seed(2 * 100_003)
    assert torch.equal(x, sample(denoiser, config, noise, labels, 1.5, steps=3, sampler='euler_ancestral'))


def test_rows_count_network_evaluations_and_state_the_guided_target(tmp_path, toy_model):
    # NFE is counted while sampling: CFG makes 2 per sample and step when guided, 1 at w = 0 (dpmpp_2m and euler
    # call the denoiser once per step); a gft model told w makes 1 at any w.
    config, model = toy_model
    gft = load_config({**config, 'align': {'objective': 'gft'}})
    torch.manual_seed(0)
    models = {'cfg': (config, evaluate.build_denoiser(config, model.state_dict())),
              'gft': (gft, evaluate.build_denoiser(gft, randomize_(make_model(gft)).state_dict()))}
    cells = evaluate.make_cells([0., 2.], [3, 5], ['dpmpp_2m', 'euler'])
    rows = evaluate.run_sweep(models, cells, evaluate.make_task(config, n=40), tmp_path, progress=False).rows
    nfe = {(r['model'], r['sampler'], r['steps'], r['w']): r['nfe'] for r in rows}
    for sampler in ('dpmpp_2m', 'euler'):
        for steps in (3, 5):
            assert nfe[('cfg', sampler, steps, 0.)] == steps and nfe[('cfg', sampler, steps, 2.)] == 2 * steps
            assert nfe[('gft', sampler, steps, 0.)] == steps and nfe[('gft', sampler, steps, 2.)] == steps
    # Every toy row scores against p_w at its effective guidance (the aligned model, w_train 2, at (w - 2) / 3),
    # with the floor of that target.
    assert all(r['w_target'] == pytest.approx((r['w'] - 2) / 3 if r['model'] == 'cfg' else r['w']) for r in rows)
    assert all(r['energy_w'] > 0 and r['energy_w_floor'] > 0 for r in rows)


def test_effective_guidance_follows_the_objective():
    # docs/design.md section 2: an aligned model at w_s acts as CFG at (w_s - w_train) / (1 + w_train); with a
    # w_train distribution, at (1 + w_s) E[1 + w] / E[(1 + w)^2] - 1; standard CFG (w_train 0) and one-pass models
    # at w itself.
    base = toy_config(quick=True)
    aligned = load_config({**base, 'align': {'w_train': 2.0}})
    assert evaluate.effective_guidance(aligned, 2.0) == pytest.approx(0.0)
    assert evaluate.effective_guidance(aligned, 8.0) == pytest.approx(2.0)
    assert evaluate.effective_guidance(aligned, 0.0) == pytest.approx(-2 / 3)
    sampled = load_config({**base, 'align': {'w_train': {'type': 'uniform', 'min_value': 0.0, 'max_value': 2.0}}})
    # E[1 + w] = 2, E[(1 + w)^2] = 1 + 2 E[w] + E[w^2] = 1 + 2 + 4/3: a = 6/13.
    assert evaluate.effective_guidance(sampled, 1.0) == pytest.approx(2 * 6 / 13 - 1)
    standard = load_config({**base, 'align': {'w_train': 0.0}})
    assert evaluate.effective_guidance(standard, 3.0) == 3.0
    for objective in ('gft', 'mg'):
        assert evaluate.effective_guidance(load_config({**base, 'align': {'objective': objective}}), 1.5) == 1.5
