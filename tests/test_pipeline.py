"""The log-prob pipeline: stock-identical ODE sampling, trajectories, log-probabilities, and re-scoring."""

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from pipelines import StableDiffusion3LogProbPipeline, guided_velocity, transition_log_probs

PROMPTS = ["a cat", "a dog riding a bike", "an apple on a table"]


@pytest.mark.parametrize(
    "batch_size, num_images_per_prompt, steps, guidance_scale, negative_prompt",
    [
        (1, 1, 2, 1.0, None),  # no classifier-free guidance
        (2, 1, 4, 4.5, None),  # guidance with the empty negative prompt
        (3, 1, 3, 7.0, "blurry, low quality"),  # guidance with a negative prompt
        (2, 2, 5, 4.5, "ugly"),  # several images per prompt
    ],
)
def test_zero_noise_reproduces_the_stock_pipeline(
    tiny_pipe, batch_size, num_images_per_prompt, steps, guidance_scale, negative_prompt
):
    stock = StableDiffusion3Pipeline(**tiny_pipe.components)
    stock.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt=PROMPTS[:batch_size],
        negative_prompt=[negative_prompt] * batch_size if negative_prompt else None,
        num_images_per_prompt=num_images_per_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        output_type="pt",
    )
    expected = stock(generator=torch.Generator().manual_seed(7), **kwargs).images
    out = tiny_pipe(generator=torch.Generator().manual_seed(7), noise_level=0.0, **kwargs)
    assert out.images.shape == expected.shape
    assert (out.images - expected).abs().max().item() <= 1e-5
    assert out.log_probs is None


def test_pipeline_is_constructible_like_the_stock_one(tiny_pipe, tmp_path):
    stock = StableDiffusion3Pipeline(**tiny_pipe.components)
    pipe = StableDiffusion3LogProbPipeline(**stock.components)
    assert pipe.transformer is stock.transformer
    stock.save_pretrained(tmp_path)
    loaded = StableDiffusion3LogProbPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded, StableDiffusion3LogProbPipeline)
    for name, param in tiny_pipe.transformer.state_dict().items():
        torch.testing.assert_close(loaded.transformer.state_dict()[name], param, rtol=0, atol=0)


def test_sde_sampling_returns_the_trajectory_and_log_probs(tiny_pipe):
    latents = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    out = tiny_pipe(
        PROMPTS[:2], num_inference_steps=5, guidance_scale=4.5, latents=latents, noise_level=0.7,
        generator=torch.Generator().manual_seed(1), output_type="pt",
    )
    assert out.latents.shape == (2, 6, 16, 16, 16)
    assert out.latents.dtype == torch.float32
    torch.testing.assert_close(out.latents[:, 0], latents)
    assert out.log_probs.shape == (2, 5)
    assert torch.isfinite(out.log_probs).all()
    assert out.timesteps.shape == (5,) and out.sigmas.shape == (6,) and out.sigmas[-1] == 0
    assert out.images.shape == (2, 3, 32, 32) and 0 <= out.images.min() and out.images.max() <= 1
    # The images are the decoded final latents of the trajectory.
    torch.testing.assert_close(tiny_pipe.decode_latents(out.latents[:, -1]), out.images)
    assert out.prompt_embeds.shape[0] == 2 and out.negative_prompt_embeds.shape == out.prompt_embeds.shape
    # SDE sampling differs from ODE sampling from the same start.
    ode = tiny_pipe(PROMPTS[:2], num_inference_steps=5, guidance_scale=4.5, latents=latents, output_type="latent")
    assert not torch.allclose(ode.latents[:, -1], out.latents[:, -1])


def rescore(pipe, out, batch, steps, guidance_scale, sde_type):
    """`transition_log_probs` of the stored transitions `out.latents[batch, steps] -> [batch, steps + 1]`."""
    with torch.no_grad():
        return transition_log_probs(
            pipe.transformer, pipe.scheduler,
            latents=out.latents[batch, steps], next_latents=out.latents[batch, steps + 1],
            timesteps=out.timesteps[steps],
            prompt_embeds=out.prompt_embeds, pooled_prompt_embeds=out.pooled_prompt_embeds,
            negative_prompt_embeds=out.negative_prompt_embeds,
            negative_pooled_prompt_embeds=out.negative_pooled_prompt_embeds,
            guidance_scale=guidance_scale, noise_level=0.7, sde_type=sde_type,
        )


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_transition_log_probs_rescore_the_stored_transitions(tiny_pipe, guidance_scale, sde_type):
    out = tiny_pipe(
        PROMPTS[:2], num_images_per_prompt=2, num_inference_steps=4, guidance_scale=guidance_scale,
        noise_level=0.7, sde_type=sde_type, generator=torch.Generator().manual_seed(3), output_type="latent",
    )
    batch = torch.arange(4)
    columns = torch.tensor([0, len(out.sde_steps) - 1, 1, 2])  # each sample at another step, as PPO's batches are
    steps = torch.tensor(out.sde_steps)[columns]
    log_prob, mean, _ = rescore(tiny_pipe, out, batch, steps, guidance_scale, sde_type)
    torch.testing.assert_close(log_prob, out.log_probs[batch, columns], atol=1e-4, rtol=1e-4)
    # CPS's last step ends at sigma 0 and has no noise: it is taken, but neither scored nor offered for training.
    assert out.sde_steps == ([0, 1, 2, 3] if sde_type == "sde" else [0, 1, 2])
    assert mean.shape == out.latents[:, 0].shape


def test_transition_log_probs_carry_gradients_to_the_transformer(tiny_pipe):
    out = tiny_pipe(PROMPTS[:1], num_inference_steps=3, guidance_scale=4.5, noise_level=0.7, output_type="latent")
    tiny_pipe.transformer.zero_grad()
    log_prob, _, _ = transition_log_probs(
        tiny_pipe.transformer, tiny_pipe.scheduler, out.latents[:, 1], out.latents[:, 2], out.timesteps[1:2],
        out.prompt_embeds, out.pooled_prompt_embeds, 4.5, 0.7,
        out.negative_prompt_embeds, out.negative_pooled_prompt_embeds,
    )
    log_prob.sum().backward()
    grads = [p.grad for p in tiny_pipe.transformer.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    tiny_pipe.transformer.zero_grad(set_to_none=True)


class ScaledPooled(torch.nn.Module):
    """A stand-in transformer whose velocity is `weight * pooled` at every latent element: hand-computable."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, **kwargs):
        return (self.weight * pooled_projections[:, :1, None, None].expand_as(hidden_states),)


@pytest.mark.parametrize("detach, expected_grad", [(False, 2 + 4.5 * (3 - 2)), (True, 4.5 * 3)])
def test_detached_unconditional_half_passes_the_gradient_through_the_conditional_half_only(detach, expected_grad):
    # v = w p: unconditional p = 2, conditional p = 3, guidance 4.5. The guided velocity is w (2 + 4.5 (3 - 2)) = 6.5 w
    # either way; its gradient in w is 6.5 through both halves, and 4.5 * 3 = 13.5 with the unconditional one detached
    # (Flow-GRPO's compute_log_prob before its 2025-08-19 fix).
    model, latents = ScaledPooled(), torch.zeros(1, 2, 2, 2)
    embeds, pooled, negative_pooled = torch.zeros(1, 3, 4), torch.full((1, 4), 3.0), torch.full((1, 4), 2.0)
    velocity = guided_velocity(model, latents, torch.tensor([500.0]), embeds, pooled, 4.5, embeds, negative_pooled,
                               detach_unconditional=detach)
    torch.testing.assert_close(velocity, torch.full_like(latents, 6.5))
    velocity.sum().backward()  # 8 elements
    torch.testing.assert_close(model.weight.grad, torch.tensor(8 * expected_grad))


def test_detached_unconditional_half_on_the_tiny_model_equals_the_conditional_half_s_gradient(tiny_pipe):
    # Same log-probability; the gradient with the unconditional half detached is that of the guided velocity with the
    # unconditional half held at its value, i.e. what back-propagating w * v_cond alone gives.
    out = tiny_pipe(PROMPTS[:2], num_inference_steps=3, guidance_scale=4.5, noise_level=0.7, output_type="latent")
    transformer = tiny_pipe.transformer
    args = (transformer, tiny_pipe.scheduler, out.latents[:, 1], out.latents[:, 2], out.timesteps[1:2].expand(2),
            out.prompt_embeds, out.pooled_prompt_embeds, 4.5, 0.7, out.negative_prompt_embeds,
            out.negative_pooled_prompt_embeds)
    grads, values = {}, {}
    for detach in (False, True):
        transformer.zero_grad(set_to_none=True)
        log_prob, _, _ = transition_log_probs(*args, detach_unconditional=detach)
        log_prob.sum().backward()
        values[detach] = log_prob.detach()
        grads[detach] = torch.cat([p.grad.flatten() for p in transformer.parameters() if p.grad is not None])
    transformer.zero_grad(set_to_none=True)
    torch.testing.assert_close(values[True], values[False], rtol=0, atol=0)
    assert not torch.allclose(grads[True], grads[False])

    # By hand: d log_prob / d v at the guided velocity, then back through w * v_cond only.
    timestep = out.timesteps[1:2].expand(2)
    v = guided_velocity(transformer, out.latents[:, 1], timestep, out.prompt_embeds, out.pooled_prompt_embeds, 4.5,
                        out.negative_prompt_embeds, out.negative_pooled_prompt_embeds).detach().requires_grad_()
    from pipelines.sde import sde_step_with_logprob

    _, log_prob, _, _ = sde_step_with_logprob(tiny_pipe.scheduler, v, timestep, out.latents[:, 1], 0.7,
                                              prev_sample=out.latents[:, 2])
    (dlogp_dv,) = torch.autograd.grad(log_prob.sum(), v)
    both = guided_velocity(transformer, out.latents[:, 1], timestep, out.prompt_embeds, out.pooled_prompt_embeds, 4.5,
                           out.negative_prompt_embeds, out.negative_pooled_prompt_embeds, return_conditional=True)[1]
    transformer.zero_grad(set_to_none=True)
    (4.5 * both.float() * dlogp_dv).sum().backward()
    by_hand = torch.cat([p.grad.flatten() for p in transformer.parameters() if p.grad is not None])
    transformer.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[True], by_hand, rtol=1e-4, atol=1e-7)


def test_per_image_generators_make_images_independent_of_the_batch(tiny_pipe):
    def sample(prompts, seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return tiny_pipe(prompts, num_inference_steps=3, guidance_scale=4.5, noise_level=0.7,
                         generator=generators, output_type="latent").latents

    together = sample(PROMPTS[:2], [10, 11])
    alone = sample(PROMPTS[1:2], [11])
    torch.testing.assert_close(together[1:], alone, atol=1e-4, rtol=1e-4)


def test_sde_window_is_stochastic_only_inside(tiny_pipe):
    latents = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(prompt=PROMPTS[:2], num_inference_steps=6, guidance_scale=4.5, latents=latents, output_type="latent")
    ode = tiny_pipe(**kwargs)
    window = tiny_pipe(noise_level=0.7, sde_steps=[1, 2], generator=torch.Generator().manual_seed(1), **kwargs)
    assert window.sde_steps == [1, 2] and window.log_probs.shape == (2, 2)
    torch.testing.assert_close(window.latents[:, :2], ode.latents[:, :2])  # identical up to the window
    assert not torch.allclose(window.latents[:, 3], ode.latents[:, 3])
    assert tiny_pipe(noise_level=0.7, **kwargs).sde_steps == list(range(6))
    assert ode.sde_steps == []


def source_images(n: int = 2) -> torch.Tensor:
    """Real photographs (scikit-image), 32x32, in [0, 1]: the tiny model's size."""
    import numpy as np
    import PIL.Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee()][:n]
    return torch.stack([torch.from_numpy(np.asarray(PIL.Image.fromarray(p).resize((32, 32)))).permute(2, 0, 1)
                        for p in photos]).float() / 255


@pytest.mark.parametrize("strength, steps, guidance_scale, per_image", [
    (0.6, 5, 4.5, False), (1.0, 3, 1.0, False), (0.3, 10, 7.0, True), (0.5, 4, 4.5, False)])
def test_image_to_image_at_zero_noise_reproduces_the_stock_img2img_pipeline(tiny_pipe, strength, steps,
                                                                           guidance_scale, per_image):
    from diffusers import StableDiffusion3Img2ImgPipeline

    stock = StableDiffusion3Img2ImgPipeline(**tiny_pipe.components)
    stock.set_progress_bar_config(disable=True)
    images = source_images()
    kwargs = dict(prompt=PROMPTS[:2], image=images, strength=strength, num_inference_steps=steps,
                  guidance_scale=guidance_scale, output_type="pt")

    def generator():
        return [torch.Generator().manual_seed(s) for s in (5, 6)] if per_image else torch.Generator().manual_seed(5)

    expected = stock(generator=generator(), **kwargs).images
    out = tiny_pipe(generator=generator(), noise_level=0.0, **kwargs)
    assert (out.images - expected).abs().max().item() <= 1e-5
    taken = steps - int(max(steps - steps * strength, 0))
    assert out.latents.shape[1] == taken + 1 and out.timesteps.shape == (taken,) and out.sigmas.shape == (taken + 1,)
    tiny_pipe.scheduler.set_timesteps(steps)
    assert torch.equal(out.timesteps, tiny_pipe.scheduler.timesteps[steps - taken:])


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_image_to_image_sde_rescores_its_stored_transitions(tiny_pipe, sde_type):
    out = tiny_pipe(PROMPTS[:2], image=source_images(), strength=0.5, num_inference_steps=8, guidance_scale=4.5,
                    noise_level=0.7, sde_type=sde_type, generator=torch.Generator().manual_seed(3),
                    output_type="latent")
    assert out.latents.shape[1] == 5 and out.log_probs.shape == (2, len(out.sde_steps))
    assert out.sde_steps == ([0, 1, 2, 3] if sde_type == "sde" else [0, 1, 2])
    batch = torch.arange(2)
    for column, step in enumerate(out.sde_steps):
        steps = torch.full((2,), step)
        log_prob, _, _ = rescore(tiny_pipe, out, batch, steps, 4.5, sde_type)
        torch.testing.assert_close(log_prob, out.log_probs[:, column], atol=1e-4, rtol=1e-4)


def test_image_to_image_starts_from_the_noised_source_and_checks_strength(tiny_pipe):
    """The first latents are `s x_noise + (1 - s) x_source` at the first step's sigma s (by hand, with the same random
    numbers: the encoding's sample first, then the noise)."""
    images = source_images()
    out = tiny_pipe(PROMPTS[:2], image=images, strength=0.3, num_inference_steps=10, output_type="latent",
                    generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    pixels = tiny_pipe.image_processor.preprocess(images, height=32, width=32)
    with torch.no_grad():
        source = tiny_pipe.vae.encode(pixels).latent_dist.sample(generator)
    source = (source - tiny_pipe.vae.config.shift_factor) * tiny_pipe.vae.config.scaling_factor
    noise = torch.randn(source.shape, generator=generator)
    sigma = out.sigmas[0]
    tiny_pipe.scheduler.set_timesteps(10)
    assert sigma == tiny_pipe.scheduler.sigmas[7] and out.latents.shape[1] == 4  # int(10 * 0.3) = 3 steps taken
    torch.testing.assert_close(out.latents[:, 0], sigma * noise + (1 - sigma) * source)
    for strength in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            tiny_pipe(PROMPTS[:1], image=images[:1], strength=strength, num_inference_steps=2)
