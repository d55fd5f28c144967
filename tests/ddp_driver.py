"""Run under torchrun by test_distributed.py: one step of the aligned objective through accelerate's DDP."""

import json
import sys

import accelerate
import torch

from kdiff_align.config import load_config, make_denoiser_wrapper, make_model


def fixed_batch(n: int = 8):
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    noise = torch.randn(n, 1, 8, 8, generator=gen)
    sigma = torch.exp(torch.randn(n, generator=gen) - 1.2)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return x, noise, sigma, labels


def step(config_path: str, stop_grad: bool, accelerator=None, rows=slice(None)) -> tuple[torch.nn.Module, float]:
    config = load_config(config_path)
    torch.manual_seed(0)
    inner = make_model(config)
    with torch.no_grad():  # non-zero weights everywhere, so every parameter gets a gradient
        for i, p in enumerate(inner.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
    opt = torch.optim.SGD(inner.parameters(), lr=0.1)
    if accelerator is not None:
        inner, opt = accelerator.prepare(inner, opt)
    model = make_denoiser_wrapper(config, uncond_prob=0., guidance_scale=2., stop_grad_uncond=stop_grad)(inner)
    x, noise, sigma, labels = (t[rows] for t in fixed_batch())
    loss = model.loss(x, noise, sigma, class_cond=labels).mean()
    (accelerator.backward(loss) if accelerator is not None else loss.backward())
    opt.step()
    if accelerator is not None:
        loss = accelerator.gather(loss.detach()[None]).mean()
        inner = accelerator.unwrap_model(inner)
    return inner, loss.item()


if __name__ == '__main__':
    config_path, stop_grad, out = sys.argv[1], sys.argv[2] == '1', sys.argv[3]
    accelerator = accelerate.Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    per = 8 // world
    inner, loss = step(config_path, stop_grad, accelerator, slice(rank * per, (rank + 1) * per))
    torch.save(inner.state_dict(), f'{out}/rank{rank}.pt')
    if accelerator.is_main_process:
        with open(f'{out}/result.json', 'w') as f:
            json.dump({'world': world, 'loss': loss}, f)
    # Tear gloo down before the interpreter exits; otherwise its threads can abort the process at exit.
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
