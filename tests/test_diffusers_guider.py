"""The diffusers guider, with the real diffusers (guiders API, UNet2DConditionModel, EulerDiscreteScheduler,
StableDiffusionPipeline, LoRA loading through peft) on tiny models built from configs: no downloads.

The guider is driven through the loop protocol of diffusers' modular denoise blocks
(modular_pipelines/stable_diffusion_xl/denoise.py: set_state, prepare_inputs, prepare_models, the UNet on each
batch, cleanup_models, guider(state)[0]) and compared with diffusers' own ClassifierFreeGuidance, with the
classic pipeline at guidance_scale = 1 + w, and with the core's GuidedDenoiser sampled by k-diffusion.
"""

import re

import pytest
import torch

diffusers = pytest.importorskip('diffusers')
peft = pytest.importorskip('peft')

from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,  # noqa: E402
                       UNet2DConditionModel)
from diffusers.guiders import ClassifierFreeGuidance  # noqa: E402
from k_diffusion import external as K_external  # noqa: E402
from k_diffusion import sampling as K_sampling  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from kdiff_align.sd import tiny as sd_tiny  # noqa: E402
from helpers import tiny_config  # noqa: E402
from kdiff_align.config import load_config  # noqa: E402
from kdiff_align.core.guidance import GuidedDenoiser  # noqa: E402
from kdiff_align.integrations.diffusers_guider import AlignedGuidance, recommended_guidance_scale  # noqa: E402
from kdiff_align.storage.metadata import export_metadata  # noqa: E402

STEPS = 6
EMB = 16


def tiny_unet(seed=0, time_cond_proj_dim=None):
    """time_cond_proj_dim: diffusers' guidance embedding (a gft / distill UNet), here with random weights."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=EMB,
                                attention_head_dim=2, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                                up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
                                time_cond_proj_dim=time_cond_proj_dim).eval()


def scheduler():
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                                  timestep_spacing='trailing')


GEN = torch.Generator().manual_seed(1)
COND, UNCOND = torch.randn(2, 5, EMB, generator=GEN), torch.randn(2, 5, EMB, generator=GEN)
LATENTS = torch.randn(2, 4, 8, 8, generator=GEN)


class Counter:
    def __init__(self, unet):
        self.unet, self.calls = unet, []

    def __call__(self, *args, **kwargs):
        self.calls.append(args[0].shape[0])
        return self.unet(*args, **kwargs)


@torch.no_grad()
def guided_loop(unet, sched, guider, latents=LATENTS):
    """The modular pipelines' denoise step, one guider batch per UNet call."""
    run = Counter(unet)
    sched.set_timesteps(STEPS)
    latents = latents * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        scaled = sched.scale_model_input(latents, t)
        guider.set_state(step=i, num_inference_steps=STEPS, timestep=t)
        state = guider.prepare_inputs({'encoder_hidden_states': (COND, UNCOND)})
        for batch in state:
            guider.prepare_models(unet)
            batch.noise_pred = run(scaled, t, encoder_hidden_states=batch.encoder_hidden_states).sample
            guider.cleanup_models(unet)
        latents = sched.step(guider(state)[0], t, latents).prev_sample
    return latents, run.calls


def test_guidance_scale_matches_diffusers_cfg():
    unet = tiny_unet()
    ours, _ = guided_loop(unet, scheduler(), AlignedGuidance(guidance_scale=4.0))
    theirs, _ = guided_loop(unet, scheduler(), ClassifierFreeGuidance(guidance_scale=4.0))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    same, _ = guided_loop(unet, scheduler(), AlignedGuidance(w=3.0))  # the paper's w = s - 1
    torch.testing.assert_close(same, ours, rtol=0, atol=0)


@pytest.mark.parametrize('w, interval', [(2.0, None), (2.0, [0.5, 3.0]), (0.0, None)])
def test_matches_core_guided_denoiser_in_k_diffusion(w, interval):
    unet, sched = tiny_unet(), scheduler()
    guider = AlignedGuidance(w=w, sigma_interval=interval).set_scheduler(sched)
    ours, calls = guided_loop(unet, sched, guider)

    class Eps(K_external.DiscreteEpsDDPMDenoiser):
        def get_eps(self, x, t, cond):
            return unet(x, t, encoder_hidden_states=cond).sample

    denoiser = Eps(unet, sched.alphas_cumprod, quantize=True)
    guided = GuidedDenoiser(denoiser, w, uncond={'cond': UNCOND}, sigma_interval=interval)
    with torch.no_grad():
        ref = K_sampling.sample_euler(guided, LATENTS * sched.sigmas[0], sched.sigmas, extra_args={'cond': COND},
                                      disable=True)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    in_interval = [w != 0 and (interval is None or interval[0] <= s <= interval[1]) for s in sched.sigmas[:-1]]
    assert len(calls) == STEPS + sum(in_interval)  # the unconditional batch runs only where w != 0


def test_schedule_and_errors():
    g = AlignedGuidance(w=3.0, sigma_interval=[0.1, 5.0], w_end=0.5)
    assert g.guidance.scale_at(5.0).item() == pytest.approx(3.0)
    assert g.guidance.scale_at(0.1).item() == pytest.approx(0.5)
    assert g.new().config['w_end'] == 0.5  # ConfigMixin round trip
    with pytest.raises(ValueError, match='exactly one of guidance_scale'):
        AlignedGuidance(guidance_scale=3.0, w=2.0)
    with pytest.raises(ValueError, match='exactly one of guidance_scale'):
        AlignedGuidance()
    g = AlignedGuidance(w=1.0, sigma_interval=[0.1, 5.0])
    g.set_state(0, 4, torch.tensor(500))
    with pytest.raises(RuntimeError, match='set_scheduler'):
        g.num_conditions


def tiny_pipeline(unet):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=('DownEncoderBlock2D',), up_block_types=('UpDecoderBlock2D',),
                        norm_num_groups=4, sample_size=8)
    return StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.slow
def test_lora_export_loads_in_diffusers_and_samples_with_recommended_w(tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    # A LoRA as the project exports one: UNet attention adapters + kdiff_align metadata from the config.
    trained = tiny_unet()
    trained.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                   target_modules=['to_q', 'to_k', 'to_v', 'to_out.0']))
    lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(trained))
    config = load_config(tiny_config(w_train=2.0, w_sample=1.5))
    path = tmp_path / 'aligned_lora.safetensors'
    save_file({f'unet.{k}': v.contiguous() for k, v in lora.items()}, path, metadata=export_metadata(config))

    pipe = tiny_pipeline(tiny_unet())
    base, _ = guided_loop(pipe.unet, scheduler(), AlignedGuidance(w=1.5))
    pipe.load_lora_weights(str(path))
    loaded, _ = guided_loop(pipe.unet, scheduler(), AlignedGuidance(w=1.5))
    expected, _ = guided_loop(trained, scheduler(), AlignedGuidance(w=1.5))
    assert not torch.allclose(loaded, base, atol=1e-4)  # the LoRA changed the model ...
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-4)  # ... into the trained one

    # The recommended w comes from the file: 1.5, i.e. diffusers' guidance_scale 2.5.
    scale = recommended_guidance_scale(path)
    assert scale == 2.5
    guider = AlignedGuidance.from_metadata(path).set_scheduler(pipe.scheduler)
    assert guider.guidance.w == 1.5 and guider.guidance_scale == 2.5
    with torch.no_grad():
        out = pipe(prompt_embeds=COND, negative_prompt_embeds=UNCOND, guidance_scale=scale,
                   num_inference_steps=STEPS, latents=LATENTS, height=8, width=8, output_type='latent').images
    via_guider, _ = guided_loop(pipe.unet, scheduler(), guider)
    torch.testing.assert_close(out, via_guider, rtol=1e-4, atol=1e-4)


def test_interval_exports_need_the_guider(tmp_path):
    config = load_config(tiny_config(w_sample=1.0, sigma_interval=[0.3, 5.0]))
    path = tmp_path / 'x.safetensors'
    save_file({'x': torch.zeros(1)}, path, metadata=export_metadata(config))
    with pytest.raises(ValueError, match='guidance interval'):
        recommended_guidance_scale(path)
    assert AlignedGuidance.from_metadata(path).guidance.sigma_interval == (0.3, 5.0)


@pytest.fixture(scope='module')
def sdxl_modular(tmp_path_factory):
    """A real diffusers ModularPipeline (StableDiffusionXLAutoBlocks) with tiny random SDXL-shaped components."""
    return make_sdxl_modular(tmp_path_factory)


def make_sdxl_modular(tmp_path_factory, time_cond_proj_dim=None):
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from kdiff_align.sd.tiny import _tokenizer

    torch.manual_seed(0)
    text = dict(bos_token_id=56, eos_token_id=57, pad_token_id=57, hidden_size=32, intermediate_size=37,
                num_attention_heads=4, num_hidden_layers=2, vocab_size=64, max_position_embeddings=77,
                projection_dim=32)
    unet = UNet2DConditionModel(  # SDXL's conditioning: two text encoders' states (32 + 32), text_time embedding
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8, addition_embed_type='text_time',
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
        time_cond_proj_dim=time_cond_proj_dim)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        layers_per_block=1, down_block_types=('DownEncoderBlock2D',) * 2,
                        up_block_types=('UpDecoderBlock2D',) * 2, norm_num_groups=4, sample_size=16)
    tokenizer = _tokenizer(tmp_path_factory.mktemp('tokenizer'))
    pipe = StableDiffusionXLAutoBlocks().init_pipeline()
    pipe.update_components(text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
                           text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)), tokenizer=tokenizer,
                           tokenizer_2=tokenizer, unet=unet, vae=vae, scheduler=EulerDiscreteScheduler(
                               beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear', steps_offset=1))
    return pipe


def modular_call(pipe, guider):
    pipe.update_components(guider=guider)
    return pipe(prompt='a cat', negative_prompt='a dog', num_inference_steps=3, height=16, width=16,
                generator=torch.Generator().manual_seed(0), output='latents')


@pytest.mark.parametrize('interval', [None, [0.5, 3.0]])
def test_modular_pipeline_called_twice_gives_the_same_image(sdxl_modular, interval):
    guider = AlignedGuidance(w=1.5, sigma_interval=interval).set_scheduler(sdxl_modular.scheduler)
    first = modular_call(sdxl_modular, guider)
    torch.testing.assert_close(modular_call(sdxl_modular, guider), first, rtol=0, atol=0)
    cfg = modular_call(sdxl_modular, ClassifierFreeGuidance(guidance_scale=2.5))
    if interval is None:
        torch.testing.assert_close(first, cfg, rtol=1e-5, atol=1e-5)
    else:
        assert not torch.allclose(first, cfg, rtol=1e-5, atol=1e-5)


def test_flow_schedulers_use_the_flow_familys_sigma():
    """One convention per family: for flow models sigma is t in [0, 1], ComfyUI's sigma for them too."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    guider = AlignedGuidance(w=2.0, sigma_interval=[0.2, 0.6], sigma_convention='flow').set_scheduler(flow)
    guider.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(500.0))
    assert guider.current_sigma().item() == pytest.approx(0.5)  # not t / (1 - t) = 1.0
    assert guider.num_conditions == 2
    guider.set_state(step=1, num_inference_steps=4, timestep=torch.tensor(800.0))
    assert guider.num_conditions == 1
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler samples in 'flow' noise levels, but this "
                                         "guidance's sigma interval is in 'k-diffusion' ones"):
        AlignedGuidance(w=2.0, sigma_interval=[0.2, 0.6]).set_scheduler(flow)
    with pytest.raises(ValueError, match="EulerDiscreteScheduler samples in 'k-diffusion'"):
        AlignedGuidance(w=2.0, sigma_interval=[0.2, 0.6], sigma_convention='flow').set_scheduler(scheduler())


# --- one-pass exports (objectives gft, mg, distill) ----------------------------------------------------------

def export(tmp_path, objective, **align):
    """A Stable Diffusion export's metadata (a gft / distill UNet is told w through timestep_cond)."""
    return sd_tiny.objective_export(tmp_path / f'{objective}.safetensors', objective, **align)


class UNetCalls:
    """Records each UNet call's batch and timestep_cond (a forward pre-hook: the pipelines call the UNet module)."""

    def __init__(self, unet):
        self.batches, self.timestep_conds = [], []
        self.handle = unet.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.batches.append(args[0].shape[0])
        self.timestep_conds.append(kwargs.get('timestep_cond'))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def classic(pipe, scale):
    with torch.no_grad():
        return pipe(prompt_embeds=COND, negative_prompt_embeds=UNCOND, guidance_scale=scale,
                    num_inference_steps=STEPS, latents=LATENTS, height=8, width=8, output_type='latent').images


def test_mg_export_is_one_conditional_batch_per_step(tmp_path):
    path = export(tmp_path, 'mg')
    pipe = tiny_pipeline(tiny_unet())
    assert recommended_guidance_scale(path) == 1.0
    with UNetCalls(pipe.unet) as calls:
        out = classic(pipe, recommended_guidance_scale(path))
    assert calls.batches == [COND.shape[0]] * STEPS
    guider = AlignedGuidance.from_metadata(path).set_scheduler(pipe.scheduler)
    assert guider.guidance_scale == 1.0
    ours, batches = guided_loop(pipe.unet, scheduler(), guider)
    assert batches == [COND.shape[0]] * STEPS
    torch.testing.assert_close(ours, out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('objective', ['gft', 'distill'])
def test_w_conditioned_export_gets_w_as_timestep_cond_in_one_pass(tmp_path, objective):
    """The classic pipeline at the recommended scale tells the UNet w exactly as kdiff-align trained it (UNetAdapter's
    guidance embedding, one pass: OnePassDenoiser) and runs no CFG."""
    from kdiff_align.core.guidance import OnePassDenoiser
    from kdiff_align.sd.model import UNetAdapter, guidance_scale_embedding

    path, dim = export(tmp_path, objective), 8
    pipe = tiny_pipeline(tiny_unet(time_cond_proj_dim=dim))
    scale = recommended_guidance_scale(path, unet=pipe.unet)
    assert scale == 3.0   # 1 + w_sample: diffusers passes guidance_scale - 1 = 2 as the UNet's w
    with UNetCalls(pipe.unet) as calls:
        out = classic(pipe, scale)
    assert calls.batches == [COND.shape[0]] * STEPS   # one pass: no unconditional batch
    expected = guidance_scale_embedding(torch.full((COND.shape[0],), 2.0), dim)
    assert all(torch.allclose(c, expected, atol=1e-6) for c in calls.timestep_conds)

    sched = scheduler()
    sched.set_timesteps(STEPS)
    denoiser = K_external.DiscreteEpsDDPMDenoiser(UNetAdapter(pipe.unet), sched.alphas_cumprod, quantize=True)
    with torch.no_grad():
        ref = K_sampling.sample_euler(OnePassDenoiser(denoiser, 2.0), LATENTS * sched.sigmas[0], sched.sigmas,
                                      extra_args={'cond': COND}, disable=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(classic(pipe, 1.0), out, atol=1e-4)   # w reached the network: w = 0 differs


def test_w_conditioned_export_in_the_modular_pipeline(tmp_path_factory, tmp_path):
    from kdiff_align.sd.model import guidance_scale_embedding

    dim = 8
    pipe = make_sdxl_modular(tmp_path_factory, time_cond_proj_dim=dim)
    guider = AlignedGuidance.from_metadata(export(tmp_path, 'gft')).set_scheduler(pipe.scheduler)
    assert guider.told_w and guider.guidance_scale == 3.0
    with UNetCalls(pipe.unet) as calls:
        ours = modular_call(pipe, guider)
    assert calls.batches == [1] * 3   # the prompt's batch only, at each of the 3 steps
    assert all(torch.allclose(c, guidance_scale_embedding(torch.tensor([2.0]), dim), atol=1e-6)
               for c in calls.timestep_conds)
    # diffusers' own handling of a UNet with time_cond_proj_dim (latent-consistency) at the same scale agrees.
    torch.testing.assert_close(ours, modular_call(pipe, ClassifierFreeGuidance(guidance_scale=3.0)), rtol=0, atol=0)
    assert not torch.allclose(ours, modular_call(pipe, ClassifierFreeGuidance(guidance_scale=1.0)), atol=1e-5)


def test_mg_export_in_the_modular_pipeline_is_one_pass(sdxl_modular, tmp_path):
    guider = AlignedGuidance.from_metadata(export(tmp_path, 'mg')).set_scheduler(sdxl_modular.scheduler)
    with UNetCalls(sdxl_modular.unet) as calls:
        ours = modular_call(sdxl_modular, guider)
    assert calls.batches == [1] * 3
    torch.testing.assert_close(ours, modular_call(sdxl_modular, ClassifierFreeGuidance(guidance_scale=1.0)),
                               rtol=0, atol=0)


def test_told_w_refusals_name_the_export(tmp_path):
    gft = export(tmp_path, 'gft')
    with pytest.raises(ValueError, match=re.escape(f"'{gft}' (told_w) is told w through timestep_cond, but this UNet")):
        AlignedGuidance.from_metadata(gft).prepare_models(tiny_unet())
    with pytest.raises(ValueError, match=re.escape(f"'{gft}': told_w: diffusers pipelines pass one timestep_cond")):
        AlignedGuidance.from_metadata(gft, sigma_interval=[0.3, 5.0])


def test_w_conditioned_exports_diffusers_cannot_sample_are_refused(sdxl_modular, tmp_path):
    from kdiff_align.integrations.exports import HostCannotPassW

    gft = export(tmp_path, 'gft')
    with pytest.raises(ValueError, match=r"is told w through timestep_cond, but this UNet has no guidance embedding"):
        recommended_guidance_scale(gft, unet=tiny_unet())
    with pytest.raises(ValueError, match=r"told_w\) is told w through timestep_cond, but this UNet has no guidance"):
        modular_call(sdxl_modular, AlignedGuidance.from_metadata(gft).set_scheduler(sdxl_modular.scheduler))
    with pytest.raises(ValueError, match='pass one timestep_cond per call'):
        recommended_guidance_scale(export(tmp_path, 'distill', sigma_interval=[0.3, 5.0]))
    kd = tmp_path / 'kd_gft.safetensors'   # a k-diffusion gft model: told w through guidance_cond
    save_file({'x': torch.zeros(1)}, kd, metadata=export_metadata(load_config(tiny_config(objective='gft'))))
    for call in (recommended_guidance_scale, AlignedGuidance.from_metadata):
        with pytest.raises(HostCannotPassW, match=r"is a gft model told w through a k-diffusion guidance embedding "
                                                  r"\(keyword guidance_cond\), which diffusers cannot pass"):
            call(kd)
