"""`--guide CKPT_OR_RUN` in `python -m kdiff_align.sample` and `evaluate`: autoguidance at every w, equal to
AutoGuidedDenoiser run through the same k-diffusion sampler, the run folder's guide snapshot found, bad guides
refused in one line, and evaluate's rows recording the guide and counting both models' calls."""

import json
import shutil

import pytest
import torch
from helpers import opts, randomize_, toy

from kdiff_align.config import load_config
from kdiff_align.evaluation import evaluate
from kdiff_align.sampling import sample as sample_cli
from kdiff_align.sampling.autoguidance import AutoGuidedDenoiser, SAME_WEIGHTS, resolve_guide
from kdiff_align.sampling.grid import grid_image
from kdiff_align.sampling.sample import build_denoiser, sample_grid
from kdiff_align.storage.checkpoint import load_for_inference, save_export
from kdiff_align.training.trainer import train

STEPS = 4


@pytest.fixture(scope='module')
def runs(tmp_path_factory, one_thread):
    """A tiny trained toy model (main) and a smaller, shorter-trained one of the same task (guide)."""
    root = tmp_path_factory.mktemp('guide_runs')
    small = toy('baseline')
    small['model'].update(width=8)
    return (train(toy('baseline'), opts(root, 'main', end_step=12)),
            train(small, opts(root, 'guide', end_step=4)))


def loaded(path, **kw):
    config, state = load_for_inference(path)
    config = load_config(config)
    return config, build_denoiser(config, state)


def direct(main, guide, config, w, noise, labels, seed, sampler='euler', interval=None):
    """AutoGuidedDenoiser through k-diffusion's own sampler, nothing of sample.py in between."""
    import k_diffusion as K

    m = config['model']
    sigmas = K.sampling.get_sigmas_karras(STEPS, m['sigma_min'], m['sigma_max'], rho=7.)
    torch.manual_seed(seed)
    with torch.no_grad():
        return getattr(K.sampling, f'sample_{sampler}')(AutoGuidedDenoiser(main, guide, w, sigma_interval=interval),
                                                        noise * sigmas[0], sigmas,
                                                        extra_args={'class_cond': labels}, disable=True)


def test_sample_guide_is_autoguided_denoiser_through_the_sampler_bit_for_bit(runs, tmp_path, capsys):
    main_run, guide_run = runs
    config, main = loaded(main_run.export)
    _, guide = loaded(guide_run.run_dir)
    classes, ws, n, seed = [0, 3], [0.0, 2.0], 3, 5
    out = tmp_path / 'grid.png'
    assert sample_cli.main([str(main_run.export), '--guide', str(guide_run.run_dir), '--classes', '0', '3',
                            '--w', '0', '2', '--n', '3', '--steps', str(STEPS), '--sampler', 'euler',
                            '--seed', str(seed), '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert (f"autoguidance with guide {guide_run.run_dir} (w: autoguidance's, not CFG's; 2 network passes per "
            'step at w > 0, 1 at w = 0)') in printed
    assert 'cfg scale' not in printed

    grid = sample_grid(main, config, classes, ws, n=n, steps=STEPS, sampler='euler', seed=seed, guide=guide)
    noise = torch.randn(len(classes) * n, 2, generator=torch.Generator().manual_seed(seed))
    labels = torch.tensor(classes).repeat_interleave(n)
    expected = direct(main, guide, config, 2.0, noise, labels, seed)
    assert torch.equal(grid[:, 1].reshape(-1, 2), expected)
    plain = sample_grid(main, config, classes, [0.0], n=n, steps=STEPS, sampler='euler', seed=seed)
    assert torch.equal(grid[:, 0], plain[:, 0])                   # w = 0: the main model alone, bit for bit
    assert not torch.allclose(grid[:, 1], grid[:, 0])             # the guide moved the samples

    # The CLI's grid is the grid of exactly these samples.
    from PIL import Image
    title = (f"euler, {STEPS} steps; columns: w = autoguidance's (D_main + w (D_main - D_guide)), "
             f'guide {guide_run.run_dir}')
    grid_image(grid, config, classes, ws, title).save(tmp_path / 'expected.png')
    assert Image.open(out).tobytes() == Image.open(tmp_path / 'expected.png').tobytes()


def test_a_run_folder_with_a_guide_snapshot_guides_with_the_snapshot(runs, tmp_path, capsys):
    main_run, guide_run = runs
    run_dir = tmp_path / 'main'
    shutil.copytree(main_run.run_dir, run_dir)
    assert resolve_guide(run_dir) == run_dir   # no snapshot: the run folder itself (its latest checkpoint)
    assert sample_cli.main([str(run_dir), '--guide', str(run_dir), '--steps', '2', '--w', '1',
                            '--out', str(tmp_path / 'a.png')]) == 2
    assert capsys.readouterr().err == f'error: {SAME_WEIGHTS}\n'   # the run's own weights cannot guide it
    snapshot = run_dir / 'main_guide.safetensors'
    shutil.copy(guide_run.export, snapshot)   # as the engine's snapshot would be
    assert resolve_guide(run_dir) == snapshot and resolve_guide(guide_run.export) == guide_run.export
    assert sample_cli.main([str(run_dir), '--guide', str(run_dir), '--steps', '2', '--w', '1', '--classes', '1']) == 0
    assert f'autoguidance with guide {snapshot} (' in capsys.readouterr().out
    assert (run_dir / 'main_autoguided_grid.png').is_file()   # by default beside the run, not its CFG grid's name
    shutil.copy(guide_run.export, run_dir / 'other_guide.safetensors')
    assert sample_cli.main([str(run_dir), '--guide', str(run_dir), '--out', str(tmp_path / 'c.png')]) == 2
    assert capsys.readouterr().err == (f"error: run folder {str(run_dir)!r} holds several guide snapshots "
                                       '(main_guide.safetensors, other_guide.safetensors); pass one of them to '
                                       '--guide\n')


def export_of(tmp_path, name, config):
    """A random model of the config, exported."""
    config = load_config(config)
    path = tmp_path / f'{name}.safetensors'
    save_export(path, randomize_(build_denoiser(config), 1).inner_model.state_dict(), config)
    return path


def changed(objective='baseline', **changes):
    config = toy(objective)
    for key, value in changes.items():
        section, field = key.split('.')
        config[section][field] = value
    return config


SIGMA = 'σ convention (sigma_data, sigma_min, sigma_max and loss_config, its preconditioning)'
ONE_PASS = ("autoguidance takes standard or aligned models ('aligned'): a gft or distill network is told w and an "
            "mg model's one pass samples its trained guidance, so neither is the plain conditional denoiser "
            'autoguidance extrapolates from')


@pytest.mark.parametrize('cli', [sample_cli.main, evaluate.main])
def test_bad_guides_are_refused_in_one_line(runs, tmp_path, capsys, cli):
    main_run, _ = runs
    from helpers import tiny_digits
    cases = [
        (main_run.export, tmp_path / 'missing', f"guide {str(tmp_path / 'missing')!r} does not exist; pass a .pth "
         'checkpoint, a .safetensors export or a run folder (its *_guide.safetensors snapshot, else its '
         'latest.json)'),
        (main_run.export, export_of(tmp_path, 'classes', changed(**{'dataset.num_classes': 3})),
         "config key 'dataset.num_classes': guide 3, main 4; a guide must match the main model's class count (both "
         'models see the same condition)'),
        (main_run.export, export_of(tmp_path, 'sigma', changed(**{'model.sigma_data': 1.0})),
         f"config key 'model.sigma_data': guide 1.0, main 1.5; a guide must match the main model's {SIGMA}"),
        (main_run.export, export_of(tmp_path, 'data', changed(**{'dataset.radius': 3.0})),
         "config key 'dataset.radius': guide 3.0, main 2.0; a guide must match the main model's data"),
        (main_run.export, export_of(tmp_path, 'digits', tiny_digits()),
         "config key 'model.type': guide 'image_v1', main 'toy_mlp'; a guide must be of the main model's "
         'architecture family (a smaller config of it, fewer channels or depths, is allowed)'),
        (export_of(tmp_path, 'gft', toy('gft')), main_run.export,
         f"main config key 'align.objective': got 'gft'; {ONE_PASS}"),
        (main_run.export, main_run.run_dir, SAME_WEIGHTS),   # the export is the run's latest EMA weights
    ]
    for main, guide, message in cases:
        extra = ['--out', str(tmp_path / ('x.png' if cli is sample_cli.main else 'eval')), '--steps', '2']
        assert cli([str(main), '--guide', str(guide), *extra]) == 2
        captured = capsys.readouterr()
        assert captured.err == f'error: {message}\n'
    assert not (tmp_path / 'x.png').exists() and not (tmp_path / 'eval').exists()


def test_guide_with_contradicting_options_is_refused(runs, tmp_path, capsys):
    main_run, guide_run = runs
    assert sample_cli.main([str(main_run.export), '--guide', str(guide_run.export), '--w', 'trained',
                            '--out', str(tmp_path / 'x.png')]) == 2
    assert capsys.readouterr().err == ("error: --w trained: a trained w is CFG's or a one-pass model's; with --guide "
                                       "every w is autoguidance's: pass numbers\n")
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(['--compare-inception', 'a.pt', 'b.pt', '--guide', str(guide_run.export)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith('error: --guide does not apply to --compare-inception (which samples '
                                            'nothing): pass one of them\n')


def test_evaluate_rows_record_the_guide_count_both_models_and_never_mix_with_cfg_cells(runs, tmp_path, capsys):
    main_run, guide_run = runs
    out, seed, n = tmp_path / 'eval', 2, 40
    common = ['--w', '0', '2', '--steps', str(STEPS), '--samplers', 'euler', '--n', str(n), '--seed', str(seed),
              '--out', str(out), '--no-progress']
    assert evaluate.main([str(main_run.export), *common]) == 0                       # CFG first
    assert evaluate.main([str(main_run.export), '--guide', str(guide_run.export), *common]) == 0
    printed = capsys.readouterr().out
    assert '2 cells computed, 0 read back' in printed   # the CFG cells of the same model were not reused
    assert f'2 passes/step (autoguidance with guide {guide_run.export}; w is autoguidance\'s)' in printed
    rows = {r['w']: r for r in json.loads((out / 'results.json').read_text())}
    name = 'main+guide-guide'
    for w, nfe, passes in ((0.0, STEPS, 1), (2.0, 2 * STEPS, 2)):   # euler: one evaluation per step and model
        assert rows[w]['model'] == name and rows[w]['guide'] == str(guide_run.export)
        assert rows[w]['nfe'] == nfe and rows[w]['passes'] == passes and rows[w]['w_target'] == w
    assert 'guide' in (out / 'results.csv').read_text().splitlines()[0].split(',')
    assert sorted(p.name for p in (out / 'cells').iterdir()) == ['main', name]
    cfg = json.loads((out / 'cells' / 'main' / 'euler-s4-w2.json').read_text())
    assert 'guide' not in cfg and cfg['nfe'] == 2 * STEPS and cfg['energy'] != rows[2.0]['energy']

    # The sweep's samples are AutoGuidedDenoiser's through the sampler, bit for bit (sample_cell's noise).
    config, main = loaded(main_run.export)
    _, guide = loaded(guide_run.export)
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed * 100_003))
    labels = torch.arange(4).repeat_interleave(n // 4)
    kept = torch.load(out / 'cells' / name / 'euler-s4-w2.pt')
    assert torch.equal(kept['labels'], labels)
    assert torch.equal(kept['samples'], direct(main, guide, config, 2.0, noise, labels, seed * 100_003))
    assert evaluate.main([str(main_run.export), '--guide', str(guide_run.export), *common]) == 0
    assert '0 cells computed, 2 read back' in capsys.readouterr().out   # resumes its own cells
