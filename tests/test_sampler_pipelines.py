"""flowsteer.sample on tiny SD3, FLUX and Wan pipelines built offline with random weights."""
import pytest
import torch

import flowsteer
from flowsteer.sampler import Branch

pipelines = pytest.importorskip("flowsteer.testing.pipelines")

PROMPTS = ["a red circle", "two blue squares"]
CASES = {
    "sd3": (pipelines.tiny_sd3_pipeline, dict(height=32, width=32), 4.5),
    "flux": (pipelines.tiny_flux_pipeline, dict(height=32, width=32), 3.5),
    "wan": (pipelines.tiny_wan_pipeline, dict(height=16, width=16, num_frames=5), 4.5),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    build, size, cfg = CASES[request.param]
    return request.param, build(0), size, cfg


def _pipeline_latents(name, pipe, size, cfg, steps, seed, **kwargs):
    per_prompt = "num_videos_per_prompt" if name == "wan" else "num_images_per_prompt"
    out = pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=cfg, output_type="latent",
               generator=torch.Generator().manual_seed(seed), **{per_prompt: 2}, **size, **kwargs)
    return out.frames if name == "wan" else out.images


def test_ode_reproduces_the_pipeline(case):
    """noise_level = 0: the same latents as the pipeline's own __call__ at the same seed."""
    name, pipe, size, cfg = case
    want = _pipeline_latents(name, pipe, size, cfg, steps=3, seed=5)
    r = flowsteer.sample(pipe, PROMPTS, group_size=2, num_steps=3, guidance_scale=cfg, kind="ode", noise_level=0.0,
                         seed=5, decode=False, **size)
    # fp32 rounding: CFG runs as one batch of 2B here and as two forwards in Wan's pipeline.
    assert torch.allclose(r.final_latents, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_sde_rollout_and_on_policy_ratio(case):
    name, pipe, size, cfg = case
    r = flowsteer.sample(pipe, PROMPTS, group_size=2, num_steps=3, guidance_scale=cfg, seed=1, decode=True, **size)
    assert r.log_probs.shape == (4, len(r.steps)) and torch.isfinite(r.log_probs).all()
    if name == "wan":
        assert r.images.shape[:3] == (4, 5, 3) and r.latents.ndim == 6  # [N, S, C, F, H, W]
    else:
        assert r.images.shape == (4, 3, 32, 32)
    assert float(r.images.min()) >= 0.0 and float(r.images.max()) <= 1.0
    for j in range(len(r.steps)):
        lp, _ = flowsteer.evaluate(r, j)
        assert float((torch.exp(lp.detach() - r.log_probs[:, j]) - 1).abs().max()) < 1e-6
    # Gradients reach the transformer through the fused backward.
    pipe.transformer.requires_grad_(True)
    try:
        lp, _ = flowsteer.evaluate(r, 0, [0, 3])
        lp.sum().backward()
        grads = [p.grad for p in pipe.transformer.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    finally:
        pipe.transformer.zero_grad(set_to_none=True)
        pipe.transformer.requires_grad_(False)


def test_branch_mode_on_a_pipeline(case):
    name, pipe, size, cfg = case
    r = flowsteer.sample(pipe, PROMPTS, group_size=2, num_steps=4, guidance_scale=cfg, seed=2, decode=False,
                         window=Branch(2), **size)
    assert r.steps == [2, 3]
    assert torch.equal(r.latents[0, 0], r.latents[1, 0]) and not torch.equal(r.next_latents[0, 0], r.next_latents[1, 0])
    # The branch step's forward ran on one row per prompt; evaluate runs it on all four rows.
    with torch.no_grad():
        for j in range(len(r.steps)):
            lp, _ = flowsteer.evaluate(r, j)
            assert float((torch.exp(lp - r.log_probs[:, j]) - 1).abs().max()) < 1e-6


def test_kl_against_a_reference_model(case):
    name, pipe, size, cfg = case
    r = flowsteer.sample(pipe, PROMPTS, group_size=2, num_steps=3, guidance_scale=cfg, seed=1, decode=False, **size)
    lp, kl = flowsteer.evaluate(r, 0, ref_model=pipe)
    assert torch.equal(kl, torch.zeros_like(kl))  # the policy is its own reference


def test_sd35_medium_benchmark_pipeline_wiring():
    """The GPU rollout benchmark's pipeline, built on the meta device (no memory): 2.24B parameters,
    333 text tokens of width 4096, pooled 2048, latents [B, 16, 64, 64] at 512 px."""
    pipe = pipelines.sd35_medium_pipeline("meta", torch.bfloat16)
    assert abs(sum(p.numel() for p in pipe.transformer.parameters()) / 1e9 - 2.243) < 0.01
    meta = torch.device("meta")
    pe, ne, pp, npool = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None, device=meta,
                                           do_classifier_free_guidance=True, negative_prompt=["", ""])
    assert pe.shape == (2, 333, 4096) and pp.shape == (2, 2048)
    x = pipe.prepare_latents(2, 16, 512, 512, torch.bfloat16, meta, None)
    assert x.shape == (2, 16, 64, 64)
    v = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=torch.full((4,), 500.0, device=meta),
                         encoder_hidden_states=torch.cat([ne, pe]), pooled_projections=torch.cat([npool, pp]),
                         return_dict=False)[0]
    assert v.shape == (4, 16, 64, 64)


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_rollout_ratio_is_one(name):
    build, size, cfg = CASES[name]
    pipe = build(0, dtype=torch.bfloat16)
    r = flowsteer.sample(pipe, PROMPTS, group_size=2, num_steps=2, guidance_scale=cfg, seed=1, decode=False, **size)
    assert r.next_latents.dtype == (torch.float32 if name == "wan" else torch.bfloat16)  # Wan keeps fp32 latents
    with torch.no_grad():
        lp, _ = flowsteer.evaluate(r, 0)
    assert torch.isfinite(r.log_probs).all() and torch.equal(lp, r.log_probs[:, 0])


@pytest.mark.parametrize("kind", ["flow", "cps"])
def test_benchmark_reference_loop_is_the_same_rollout(kind):
    """The research-style loop that `flowsteer bench rollout` times computes what flowsteer.sample
    does: with the same noise, the same final latents and per-step log-probs (fp32 rounding)."""
    from flowsteer.bench import reference_rollout

    pipe = pipelines.tiny_sd3_pipeline(0)
    latents, log_probs = reference_rollout(pipe, PROMPTS, 2, 4, 4.5, kind, 0.7, 3, 16, 16, 32, noise="philox")
    model = flowsteer.sampler.SD3Adapter(pipe, max_sequence_length=32)
    r = flowsteer.sample(model, PROMPTS, group_size=2, num_steps=4, guidance_scale=4.5, kind=kind, noise_level=0.7,
                         seed=3, height=16, width=16, decode=False)
    # A cps step onto sigma = 0 has std 0, no log-prob: flowsteer.sample runs it as ODE, the same mean.
    assert r.steps == ([0, 1, 2, 3] if kind == "flow" else [0, 1, 2])
    scale = float(latents.abs().max())
    assert torch.allclose(r.final_latents, latents, rtol=1e-5, atol=1e-5 * scale)
    assert torch.allclose(r.log_probs, log_probs[:, r.steps].float(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="noise must be 'torch' or 'philox'"):
        reference_rollout(pipe, PROMPTS, 2, 4, 4.5, kind, 0.7, 3, 16, 16, 32, noise="numpy")


def test_max_batch_size_gives_the_same_rollout(case, monkeypatch):
    """Model calls and decodes in chunks of 3 samples (6 rows with CFG) instead of one batch of 4."""
    name, pipe, size, cfg = case
    kw = dict(group_size=2, num_steps=2, guidance_scale=cfg, seed=4, decode=True, **size)
    want = flowsteer.sample(pipe, PROMPTS, **kw)
    decoded = []
    decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda z, **k: decoded.append(z.shape[0]) or decode(z, **k))
    got = flowsteer.sample(pipe, PROMPTS, max_batch_size=3, **kw)
    assert decoded == [3, 1]
    assert torch.allclose(got.images, want.images, rtol=1e-4, atol=1e-4)
    # Batch-size rounding only: up to ~1e-6 relative in the latents here; the log-probs come out equal.
    scale = float(want.final_latents.abs().max())
    assert torch.allclose(got.final_latents, want.final_latents, rtol=1e-5, atol=1e-5 * scale)
    assert torch.allclose(got.log_probs, want.log_probs, rtol=1e-5, atol=1e-5)


def test_execution_device_is_read_again_only_when_the_transformer_moves(monkeypatch):
    pipe = pipelines.tiny_sd3_pipeline(0)
    reads = []
    original = type(pipe)._execution_device

    def counted(self):
        reads.append(1)
        return original.fget(self)

    monkeypatch.setattr(type(pipe), "_execution_device", property(counted))
    model = flowsteer.sampler.SD3Adapter(pipe)
    model.prepare()
    model.prepare()
    assert len(reads) == 1 and model.device == torch.device("cpu")
    pipe.transformer.to("meta")  # moved: the next call reads the pipeline's device again
    model.prepare()
    assert len(reads) == 2


WAN_SIZE = dict(height=16, width=16, num_frames=5)


@pytest.fixture(scope="module")
def wan22():
    """Wan2.2-A14B's layout: a high-noise and a low-noise expert, switching at 0.875 * 1000."""
    return pipelines.tiny_wan_pipeline(0, boundary_ratio=0.875)


def _wan_latents(pipe, steps, size=WAN_SIZE, **kwargs):
    return pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=4.5, output_type="latent",
                generator=torch.Generator().manual_seed(5), num_videos_per_prompt=2, **size, **kwargs).frames


def test_wan22_two_experts_reproduce_the_pipeline(wan22):
    """Each step runs the expert the pipeline runs: ODE latents equal to its __call__, and with
    only the first expert they would differ."""
    want = _wan_latents(wan22, 4)
    r = flowsteer.sample(wan22, PROMPTS, group_size=2, num_steps=4, guidance_scale=4.5, kind="ode", noise_level=0.0,
                         seed=5, decode=False, **WAN_SIZE)
    assert r.adapter._low_noise == [False, True, True, True]  # timesteps 1000, 857.7, 602.2, 8.9 against 875
    assert torch.allclose(r.final_latents, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    one_expert = flowsteer.sample(pipelines.tiny_wan_pipeline(0), PROMPTS, group_size=2, num_steps=4,
                                  guidance_scale=4.5, kind="ode", noise_level=0.0, seed=5, decode=False, **WAN_SIZE)
    assert not torch.allclose(one_expert.final_latents, want, rtol=1e-3, atol=1e-3)
    # guidance_scale_2: the low-noise expert's own CFG scale, as the pipeline's argument.
    want_2 = _wan_latents(wan22, 4, guidance_scale_2=2.0)
    model = flowsteer.sampler.WanAdapter(wan22, guidance_scale_2=2.0)
    r_2 = flowsteer.sample(model, PROMPTS, group_size=2, num_steps=4, guidance_scale=4.5, kind="ode", noise_level=0.0,
                           seed=5, decode=False, **WAN_SIZE)
    assert torch.allclose(r_2.final_latents, want_2, rtol=1e-5, atol=1e-5 * float(want_2.abs().max()))
    assert not torch.allclose(want_2, want, rtol=1e-3, atol=1e-3)


def test_wan22_on_policy_ratio_and_gradients_reach_the_step_s_expert(wan22):
    r = flowsteer.sample(wan22, PROMPTS, group_size=2, num_steps=3, guidance_scale=4.5, seed=1, decode=False,
                         **WAN_SIZE)
    assert r.adapter._low_noise == [False, True, True]
    with torch.no_grad():
        for j in range(len(r.steps)):
            lp, _ = flowsteer.evaluate(r, j)
            assert float((torch.exp(lp - r.log_probs[:, j]) - 1).abs().max()) < 1e-6
    with torch.no_grad():
        _, kl = flowsteer.evaluate(r, 1, ref_model=wan22)  # the reference also picks the step's expert
    assert torch.equal(kl, torch.zeros_like(kl))
    experts = {"transformer": wan22.transformer, "transformer_2": wan22.transformer_2}
    for j, trained in [(0, "transformer"), (1, "transformer_2")]:
        for module in experts.values():
            module.requires_grad_(True)
        try:
            lp, _ = flowsteer.evaluate(r, j, [0, 3])
            lp.sum().backward()
            for name, module in experts.items():
                has_grad = any(p.grad is not None for p in module.parameters())
                assert has_grad == (name == trained), (j, name)
        finally:
            for module in experts.values():
                module.zero_grad(set_to_none=True)
                module.requires_grad_(False)


def test_wan22_expand_timesteps_reproduces_the_pipeline():
    """Wan2.2-TI2V-5B's per-token timesteps ([B, F * H/2 * W/2])."""
    pipe = pipelines.tiny_wan_pipeline(0, expand_timesteps=True)
    size = dict(height=32, width=32, num_frames=5)
    want = _wan_latents(pipe, 3, size)
    r = flowsteer.sample(pipe, PROMPTS, group_size=2, num_steps=3, guidance_scale=4.5, kind="ode", noise_level=0.0,
                         seed=5, decode=False, **size)
    assert torch.allclose(r.final_latents, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_wan_adapter_errors(wan22):
    with pytest.raises(ValueError, match="guidance_scale_2 is for Wan 2.2 pipelines"):
        flowsteer.sampler.WanAdapter(pipelines.tiny_wan_pipeline(0), guidance_scale_2=2.0)
    with pytest.raises(RuntimeError, match="call schedule"):
        model = flowsteer.sampler.WanAdapter(wan22)
        model.velocity(torch.zeros(1, 16, 2, 2, 2), 0, torch.zeros(3), 1.0, {}, 4.5)


@pytest.mark.parametrize("name", ["sd3", "wan"])
def test_negative_prompt_matches_the_pipeline(name):
    build, size, cfg = CASES[name]
    pipe = build(0)
    want = _pipeline_latents(name, pipe, size, cfg, steps=3, seed=5, negative_prompt="blurry, low quality")
    default = _pipeline_latents(name, pipe, size, cfg, steps=3, seed=5)
    r = flowsteer.sample(pipe, PROMPTS, group_size=2, num_steps=3, guidance_scale=cfg, kind="ode", noise_level=0.0,
                         seed=5, decode=False, negative_prompt="blurry, low quality", **size)
    assert torch.allclose(r.final_latents, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert not torch.allclose(default, want, rtol=1e-3, atol=1e-3)


def test_negative_prompt_errors():
    with pytest.raises(ValueError, match="negative_prompt is not used with FluxPipeline"):
        flowsteer.sample(pipelines.tiny_flux_pipeline(0), PROMPTS, negative_prompt="x", decode=False)
    model = flowsteer.sampler.SD3Adapter(pipelines.tiny_sd3_pipeline(0))
    with pytest.raises(ValueError, match="set it on the adapter"):
        flowsteer.sample(model, PROMPTS, negative_prompt="x", decode=False)
    with pytest.raises(TypeError, match="negative_prompt must be a string"):
        flowsteer.sampler.SD3Adapter(pipelines.tiny_sd3_pipeline(0), negative_prompt=["x"])


def test_adapter_follows_the_pipeline_s_current_transformer():
    """A trainer may replace or wrap pipe.transformer (LoRA) after building the adapter: the adapter
    runs what the pipeline holds now."""
    pipe = pipelines.tiny_sd3_pipeline(0)
    model = flowsteer.sampler.SD3Adapter(pipe)
    kw = dict(group_size=1, num_steps=2, height=16, width=16, decode=False, seed=3)
    before = flowsteer.sample(model, PROMPTS, **kw).final_latents
    pipe.transformer = pipelines.tiny_sd3_pipeline(1).transformer
    after = flowsteer.sample(model, PROMPTS, **kw).final_latents
    assert torch.equal(after, flowsteer.sample(pipe, PROMPTS, **kw).final_latents)
    assert not torch.allclose(after, before, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", list(CASES) + ["wan22"])
def test_evaluate_with_one_step_per_sample_on_pipelines(name, wan22):
    """Per-row timesteps through each transformer (Wan 2.2: rows on both experts, split by expert)."""
    if name == "wan22":
        pipe, size, cfg = wan22, WAN_SIZE, 4.5
    else:
        build, size, cfg = CASES[name]
        pipe = build(0)
    r = flowsteer.sample(pipe, PROMPTS, group_size=2, num_steps=3, guidance_scale=cfg, seed=1, decode=False, **size)
    j = [0, 2, 1, 2] if len(r.steps) == 3 else [0, 1, 1, 0]
    modules = [pipe.transformer] + ([pipe.transformer_2] if name == "wan22" else [])
    for m in modules:
        m.requires_grad_(True)
    try:
        lp, kl = flowsteer.evaluate(r, j, ref_model=pipe)
        want = r.log_probs[torch.arange(4), torch.tensor(j)]
        assert float((torch.exp(lp.detach() - want) - 1).abs().max()) < 1e-6
        assert float(kl.detach().abs().max()) == 0.0
        lp.sum().backward()
        assert all(any(p.grad is not None for p in m.parameters()) for m in modules)
    finally:
        for m in modules:
            m.zero_grad(set_to_none=True)
            m.requires_grad_(False)


@pytest.mark.parametrize("how", ["diffusers", "peft"])
def test_ref_model_base_switches_the_lora_adapters_off(how):
    """LoRA training's reference: the policy with its adapters off. Its KL equals the KL against a
    separate copy of the base model; gradients reach only the LoRA weights; the adapters are back
    on afterwards."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                             init_lora_weights=False)  # random A and B: the policy differs from the base
    pipe, base = pipelines.tiny_sd3_pipeline(0), pipelines.tiny_sd3_pipeline(0)
    if how == "diffusers":
        pipe.transformer.add_adapter(config)
    else:
        pipe.transformer = peft.get_peft_model(pipe.transformer, config)
    lora = [p for n, p in pipe.transformer.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    kw = dict(group_size=2, num_steps=3, height=16, width=16, decode=False, seed=2)
    r = flowsteer.sample(pipe, PROMPTS, **kw)
    lp, kl = flowsteer.evaluate(r, 1, ref_model="base")
    with torch.no_grad():
        _, kl_copy = flowsteer.evaluate(r, 1, ref_model=base)
    assert float(kl.detach().abs().max()) > 0
    assert torch.allclose(kl.detach(), kl_copy, rtol=1e-5, atol=1e-7)
    (lp.sum() + kl.sum()).backward()
    named = dict(pipe.transformer.named_parameters())
    assert all(p.grad is not None for p in lora)
    assert all(named[n].grad is None for n in named if "lora_" not in n)
    # The adapters are on again: the policy's rollout is reproduced.
    again = flowsteer.sample(pipe, PROMPTS, **kw)
    assert torch.equal(again.log_probs, r.log_probs)
    # Frozen LoRA weights stay frozen (peft's switch back on would make them all trainable).
    lora_a = [p for n, p in pipe.transformer.named_parameters() if "lora_A" in n]
    for p in lora_a:
        p.requires_grad_(False)
    flowsteer.evaluate(r, 1, ref_model="base")
    assert not any(p.requires_grad for p in lora_a) and all(p.requires_grad for n, p in
                                                             pipe.transformer.named_parameters() if "lora_B" in n)


def test_ref_model_base_keeps_adapters_the_user_switched_off():
    peft = pytest.importorskip("peft")
    pipe = pipelines.tiny_sd3_pipeline(0)
    pipe.transformer.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"], init_lora_weights=False))
    kw = dict(group_size=2, num_steps=2, height=16, width=16, decode=False, seed=2)
    r = flowsteer.sample(pipe, PROMPTS, **kw)
    pipe.transformer.disable_adapters()
    flowsteer.evaluate(r, 0, ref_model="base")
    assert torch.equal(flowsteer.sample(pipe, PROMPTS, **kw).log_probs,
                       flowsteer.sample(pipelines.tiny_sd3_pipeline(0), PROMPTS, **kw).log_probs)  # still off


def test_evaluate_with_the_sampling_pipeline_keeps_its_adapter():
    pipe = pipelines.tiny_sd3_pipeline(0)
    model = flowsteer.sampler.SD3Adapter(pipe, compile=True)
    assert model.like(pipe) is model  # the same pipeline: the same (compiled) adapter
    other = pipelines.tiny_sd3_pipeline(1)
    assert model.like(other).compile and model.like(other).pipe is other


def test_ref_model_base_errors():
    pipe = pipelines.tiny_sd3_pipeline(0)
    r = flowsteer.sample(pipe, PROMPTS, group_size=2, num_steps=2, height=16, width=16, decode=False)
    with pytest.raises(ValueError, match="needs LoRA adapters on the transformer"):
        flowsteer.evaluate(r, 0, ref_model="base")
    with pytest.raises(ValueError, match="ref_model must be a pipeline, an adapter, or 'base'"):
        flowsteer.evaluate(r, 0, ref_model="frozen")


def test_readme_trainer_snippet_runs():
    """README.md's "Rollouts inside your own trainer" block, on the tiny SD3 pipeline on the CPU."""
    import pathlib
    import re

    pytest.importorskip("peft")
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Rollouts inside your own trainer", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    line = next(ln for ln in code.splitlines() if "from_pretrained" in ln)
    code = code.replace(line, "pipe = pipelines.tiny_sd3_pipeline(0)")
    code = code.replace("group_size=16", "group_size=2, height=16, width=16")
    before = {n: p.detach().clone() for n, p in pipelines.tiny_sd3_pipeline(0).transformer.named_parameters()}
    scope = dict(pipelines=pipelines, torch=torch, prompts=PROMPTS, step=0,
                 my_reward=lambda images, prompts: images.mean(dim=(1, 2, 3)))
    exec(compile(code, "README.md", "exec"), scope)
    pipe = scope["pipe"]
    after = {n.replace(".base_layer", ""): p for n, p in pipe.transformer.named_parameters()}
    assert any("lora_" in n for n in after)
    assert all(torch.equal(after[n], before[n]) for n in before)  # the base weights stay frozen
    assert any(not torch.equal(p, 0 * p) for n, p in after.items() if "lora_B" in n)  # the LoRA ones moved


def test_compiled_adapter_compiles_each_transformer_once(monkeypatch):
    """compile=True: torch.compile once per module object, again when the pipeline's transformer
    is replaced (LoRA wrapping), both experts of Wan 2.2. (torch.compile stubbed: the wiring only.)"""
    compiled = []

    def fake_compile(module, **kwargs):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    pipe = pipelines.tiny_sd3_pipeline(0)
    model = flowsteer.sampler.SD3Adapter(pipe, compile=True)
    kw = dict(group_size=1, num_steps=2, height=16, width=16, decode=False)
    flowsteer.sample(model, PROMPTS, **kw)
    flowsteer.sample(model, PROMPTS, **kw)
    assert compiled == [pipe.transformer]
    pipe.transformer = pipelines.tiny_sd3_pipeline(1).transformer
    flowsteer.sample(model, PROMPTS, **kw)
    assert len(compiled) == 2 and compiled[1] is pipe.transformer
    wan = pipelines.tiny_wan_pipeline(0, boundary_ratio=0.875)
    compiled.clear()
    flowsteer.sample(wan, PROMPTS, compile=True, num_steps=3, decode=False, **WAN_SIZE)
    assert compiled == [wan.transformer, wan.transformer_2]


def test_wan_with_its_checkpoint_scheduler():
    """Wan's checkpoints ship UniPCMultistepScheduler(use_flow_sigmas, flow_shift): the rollout
    takes the Euler schedule of the same shift (sigmas from exactly 1, where Flow-GRPO's std needs
    sigma_max; UniPC's own start at 1 - 1e-6 and made the first step's std ~1000 a). Its ODE
    latents are those of the pipeline with the Euler scheduler."""
    from diffusers import DDIMScheduler, UniPCMultistepScheduler

    pipe = pipelines.tiny_wan_pipeline(0)
    euler = pipe.scheduler
    pipe.scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, flow_shift=3.0, use_flow_sigmas=True,
                                             prediction_type="flow_prediction")
    r = flowsteer.sample(pipe, PROMPTS, group_size=2, num_steps=4, seed=1, decode=False, **WAN_SIZE)
    assert r.sigmas[0] == 1.0
    assert float(r.next_latents.abs().max()) < 10 * float(r.latents[:, 0].abs().max())
    ode = flowsteer.sample(pipe, PROMPTS, group_size=2, num_steps=4, seed=5, kind="ode", noise_level=0.0,
                           decode=False, **WAN_SIZE)
    pipe.scheduler = euler
    want = _wan_latents(pipe, 4)
    assert torch.allclose(ode.final_latents, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    pipe.scheduler = DDIMScheduler()
    try:
        with pytest.raises(ValueError, match="DDIMScheduler is not a flow-matching scheduler"):
            flowsteer.sample(pipe, PROMPTS, decode=False, **WAN_SIZE)
    finally:
        pipe.scheduler = euler


def test_evaluate_with_pipelines_keeps_the_rollout_s_adapter_settings(wan22):
    """guidance_scale_2 (and the negative prompt, T5 length) carry over when evaluate is given a
    pipeline as the policy or the reference."""
    model = flowsteer.sampler.WanAdapter(wan22, guidance_scale_2=2.0)
    r = flowsteer.sample(model, PROMPTS, group_size=2, num_steps=3, guidance_scale=4.5, seed=1, decode=False,
                         **WAN_SIZE)
    with torch.no_grad():
        for j in range(len(r.steps)):
            lp, kl = flowsteer.evaluate(r, j, model=wan22, ref_model=wan22)
            assert torch.equal(lp, r.log_probs[:, j]) and torch.equal(kl, torch.zeros_like(kl))


def test_pipeline_size_and_model_errors():
    flux = pipelines.tiny_flux_pipeline(0)
    r = flowsteer.sample(flux, PROMPTS, num_steps=2, height=32, decode=True)  # width from the default
    assert r.images.shape[0] == 2
    with pytest.raises(ValueError, match="height must be a multiple of 16"):
        flowsteer.sample(pipelines.tiny_wan_pipeline(0), PROMPTS, decode=False, height=24, width=16, num_frames=5)
    sd3 = pipelines.tiny_sd3_pipeline(0)
    with pytest.raises(TypeError, match="pass the pipeline that holds it"):
        flowsteer.sample(sd3.transformer, PROMPTS, decode=False)
    r = flowsteer.sample(sd3, PROMPTS, num_steps=2, height=16, width=16, decode=False)
    with pytest.raises(TypeError, match="pass the pipeline that holds it"):
        flowsteer.evaluate(r, 0, ref_model=sd3.transformer)


@pytest.mark.parametrize("extra", [{}, {"same_noise": True}, {"window": Branch(1)}], ids=["plain", "same_noise", "branch"])
def test_noise_keys_give_each_sample_its_noise_whatever_the_batch(extra):
    """With NoiseKeys a sample is the same whichever call draws it: the first two prompts alone,
    or members 2-3 of every group (a group split over processes), equal those rows of the whole
    batch (to the transformer's batch-size rounding; the noise itself is identical)."""
    pipe = pipelines.tiny_sd3_pipeline(0)
    prompts = ["a red circle", "two blue squares", "a green star", "a cat"]
    kw = dict(num_steps=4, height=16, width=16, decode=False, seed=7, guidance_scale=1.0, **extra)
    full = flowsteer.sample(pipe, prompts, group_size=4, noise_keys=flowsteer.NoiseKeys(range(4)), **kw)
    head = flowsteer.sample(pipe, prompts[:2], group_size=4, noise_keys=flowsteer.NoiseKeys((0, 1)), **kw)
    split = flowsteer.sample(pipe, prompts, group_size=2, noise_keys=flowsteer.NoiseKeys(range(4), first_member=2), **kw)
    rows = torch.tensor([p * 4 + j for p in range(4) for j in (2, 3)])
    for part, idx in ((head, torch.arange(8)), (split, rows)):
        torch.testing.assert_close(part.final_latents, full.final_latents[idx], rtol=0, atol=1e-5)
        torch.testing.assert_close(part.log_probs, full.log_probs[idx], rtol=0, atol=1e-5)
    # other prompt ids: other noise
    other = flowsteer.sample(pipe, prompts[:2], group_size=4, noise_keys=flowsteer.NoiseKeys((5, 6)), **kw)
    assert (other.final_latents - head.final_latents).abs().max() > 0.1
    with pytest.raises(ValueError, match=r"noise_keys.prompt_ids has 3 ids for 2 prompts"):
        flowsteer.sample(pipe, prompts[:2], noise_keys=flowsteer.NoiseKeys((0, 1, 2)), **kw)
    with pytest.raises(ValueError, match=r"noise_keys.prompt_ids\[1\] must be an int >= 0"):
        flowsteer.NoiseKeys((0, -1))
