"""GRPOTrainer: one training loop for the GRPO family over flowsteer.sample, the rewards and the
fused ops.

An iteration: sample (no grad) -> rewards -> group advantages -> inner epochs x minibatches x
trained steps, gradients accumulated over the steps, one optimizer step per minibatch -> EMA ->
metrics (one host transfer) -> evaluation and checkpoint when due. The algorithm object supplies the
window, the guidance and the advantages; the numbers come from the config.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from .. import __version__
from ..ops import grpo_loss
from ..rewards import MultiReward, Reward, RewardOutputs
from ..rewards.multi import check_weighted_finite
from ..sampler import NoiseKeys, sample
from ..sampler import evaluate as evaluate_step
from . import checkpoint as ckpt
from . import parallel as par
from .algorithms import grouped_advantages, make_algorithm
from .config import Config, ConfigError, diff_configs, dump_yaml, load_config, num_trained
from .data import PromptSampler, load_prompts
from .distributed import Dist, Layout, env_world_size, gather_rows
from .images import image_stats, write_grid
from .models import (EMA, add_lora, load_pipeline, make_adapter, networks_of, reference_model, save_lora,
                     trainable_parameters)
from .rewards import build_multi_reward
from .scoring import RewardScorer, cat_rollouts

Tensor = torch.Tensor
# metrics that measure the machine, not the run: excluded when a resumed run is compared
TIMING_KEYS = ("time/", "images_per_s", "reward/latency_s")


def _versions() -> Dict[str, str]:
    out = {"flowsteer": __version__, "torch": torch.__version__}
    for mod in ("diffusers", "transformers", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


def _as_multi_reward(reward, cfg: Config) -> MultiReward:
    if reward is None:
        return build_multi_reward(cfg.rewards, cfg.rewards_mode, "rewards", cfg.sampling.group_size)
    if isinstance(reward, MultiReward):
        return reward
    if isinstance(reward, Reward):
        return MultiReward({reward.name: reward}, mode=cfg.rewards_mode)
    if callable(reward):
        return MultiReward({getattr(reward, "__name__", "reward"): reward}, mode=cfg.rewards_mode)
    raise TypeError(f"reward must be a flowsteer Reward, a MultiReward or a callable (got {type(reward).__name__})")


class GRPOTrainer:
    """Online RL post-training of a flow-matching model with the GRPO family.

    Args:
        pipe: a diffusers pipeline (SD3, FLUX, Wan), a ModelAdapter with networks(), or a velocity
            function that is an nn.Module (with `latent_shape`); None: loaded from config.model.path.
        reward: a flowsteer Reward, a MultiReward or a plain callable (images, prompts, meta) -> [N];
            None: built from config.rewards.
        config: a Config, a recipe name, a YAML path or a mapping (validated strictly).
        run_dir: where config.yaml, metrics.jsonl, checkpoints/ and samples/ go (None: nothing is
            written, for use inside other code).
        eval_rewards: extra rewards scored at evaluation but not trained on ({name: reward}).
    """

    def __init__(self, pipe, reward, config: Union[Config, str, Dict[str, Any]], *, run_dir: Optional[str] = None,
                 eval_rewards: Optional[Dict[str, Any]] = None, _resuming: bool = False):
        cfg = config if isinstance(config, Config) else load_config(config)
        self.config = cfg
        self.algorithm = make_algorithm(cfg.algorithm)
        world = env_world_size()
        if world > 1 and pipe is None and torch.cuda.is_available() and cfg.model.device in (None, "cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one process per GPU
        self.model = load_pipeline(cfg) if pipe is None else pipe
        self.adapter = make_adapter(self.model, cfg)
        self.dist = Dist.from_env(cfg.distributed.timeout_s, self.adapter.device)
        self.layout = Layout.of(cfg, self.dist.world, self.dist.rank)
        if self.dist.world > 1 and cfg.algorithm == "euphonium":
            raise ConfigError("algorithm 'euphonium' runs on one process for now: its PRM is fitted on each "
                              "process's own rollouts; start it without torchrun")
        self.reward = _as_multi_reward(reward, cfg)
        if eval_rewards is None and cfg.eval.extra_rewards:
            eval_rewards = build_multi_reward(cfg.eval.extra_rewards, "sum", "eval.extra_rewards",
                                              cfg.sampling.group_size).rewards
        self.eval_rewards = dict(eval_rewards or {})
        self.algorithm.check(cfg, self.reward)
        self.train_prompts, self.train_meta = load_prompts(cfg.prompts.train, "prompts.train")
        self.eval_prompts, self.eval_meta = (load_prompts(cfg.prompts.eval, "prompts.eval")
                                             if cfg.prompts.eval is not None else (None, None))
        if cfg.eval.every and self.eval_prompts is None:
            warnings.warn(f"eval.every = {cfg.eval.every}, but prompts.eval is not set: the run will not evaluate; "
                          "set prompts.eval (or eval.every = 0 to silence this)", UserWarning, stacklevel=2)
        self.window = self.algorithm.window(cfg)
        self.device = self.adapter.device
        # the trained networks
        self.nets = networks_of(self.adapter)
        if cfg.model.lora is not None:
            add_lora(self.nets, cfg.model.lora, self.derived_seed("lora"))
        for net in self.nets:
            if cfg.model.gradient_checkpointing and hasattr(net, "enable_gradient_checkpointing"):
                net.enable_gradient_checkpointing()
            net.eval()
        # The trained weights are fp32 masters whatever model.dtype is (autocast runs the compute in
        # bf16 or fp16): an AdamW step of lr 1e-5 on a bf16 weight of magnitude above ~3e-3 rounds
        # to nothing, and GradScaler cannot unscale fp16 gradients.
        with torch.no_grad():
            for _, p in trainable_parameters(self.nets):
                if p.dtype != torch.float32:
                    p.data = p.data.float()
        self.parallel = par.resolve(cfg, self.dist.world, self.nets)
        if self.parallel == "ddp":
            par.broadcast_parameters(self.dist, self.nets)  # every process starts from rank 0's weights
        self.ref = reference_model(self.model, self.adapter, self.nets, cfg) if cfg.train.beta > 0 else None
        if self.parallel == "fsdp":
            par.shard(self.nets, cfg)
            if self.ref is not None and self.ref != "base":
                par.shard(networks_of(self.ref), cfg)
        self.named_params = trainable_parameters(self.nets)
        self.params = [p for _, p in self.named_params]
        t = cfg.train
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                           weight_decay=t.weight_decay)
        self.ema = EMA(self.named_params, t.ema_decay) if t.ema else None
        self.scaler = None
        if t.mixed_precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.prm = None
        self.sampler = PromptSampler(len(self.train_prompts), self.derived_seed("prompts"))
        self.scorer = RewardScorer(cfg.scoring)
        self.iteration = 0
        self.optimizer_steps = 0
        self.skipped_steps = 0
        self._warned_on_policy = False
        self.run_dir = run_dir
        self._tb = None
        if run_dir is not None and not _resuming:
            error = None
            if self.dist.main:
                try:
                    self._init_run_dir()
                except FileExistsError as exc:
                    error = str(exc)
            error = self.dist.broadcast_object(error)  # every process fails alike, none waits for the others
            if error is not None:
                raise FileExistsError(error)

    # ------------------------------------------------------------------------------ helpers

    def derived_seed(self, tag: str, iteration: Optional[int] = None) -> int:
        """A seed in [0, 2**62) from (config.seed, tag, iteration): the same in every run and process."""
        text = f"{self.config.seed}/{tag}/{'' if iteration is None else iteration}"
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2

    def _autocast(self):
        mp = self.config.train.mixed_precision
        if mp == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if mp == "bf16" else torch.float16)

    def ensure_prm(self, rollout=None, latent_channels: Optional[int] = None, video: Optional[bool] = None):
        """The LatentPRM (Euphonium), built at the first rollout from its latent shape."""
        if self.prm is None:
            from ..rewards import LatentPRM

            if rollout is not None:
                if rollout.latents.ndim not in (5, 6):
                    raise ConfigError("algorithm 'euphonium' fits a convolutional PRM on spatial latents [N, C, H, W] "
                                      f"or [N, C, F, H, W]; this model's latents are {tuple(rollout.latents.shape[2:])} "
                                      "per sample (packed FLUX latents are not supported)")
                latent_channels, video = int(rollout.latents.shape[2]), rollout.latents.ndim == 6
            p = self.config.prm
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.derived_seed("prm-init"))
                self.prm = LatentPRM(latent_channels, hidden=p.hidden, depth=p.depth, video=video).to(self.device)
            self.prm.eval()
        return self.prm

    # ------------------------------------------------------------------------------ run dir

    def _init_run_dir(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        if ckpt.list_checkpoints(os.path.join(self.run_dir, "checkpoints")):
            raise FileExistsError(f"{self.run_dir} already holds checkpoints of a run: resume it "
                                  "(flowsteer train ... --resume, or GRPOTrainer.resume) or pick another output directory")
        for sub in ("checkpoints", "samples"):
            os.makedirs(os.path.join(self.run_dir, sub), exist_ok=True)
        head = {"config_hash": self.config.hash(), **{f"version {k}": v for k, v in _versions().items()}}
        with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
            f.write(dump_yaml(self.config, head))
        open(os.path.join(self.run_dir, "metrics.jsonl"), "w").close()

    def _log_row(self, row: Dict[str, Any]) -> None:
        if self.run_dir is None or not self.dist.main:  # rank 0 logs the global metrics
            return
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.config.logging.tensorboard:
            if self._tb is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(os.path.join(self.run_dir, "tensorboard"), purge_step=row["iteration"])
                except ImportError:
                    self._tb = False
            if self._tb:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k != "iteration":
                        self._tb.add_scalar(k, v, row["iteration"])

    # ----------------------------------------------------------------------------- rollout

    def _rollout(self, prompts: List[str], keys: NoiseKeys, group_size: int):
        s = self.config.sampling
        kwargs = dict(group_size=group_size, num_steps=s.num_steps, guidance_scale=s.guidance_scale, kind=s.kind,
                      noise_level=s.noise_level, window=self.window, iteration=self.iteration,
                      seed=self.derived_seed("rollout", self.iteration), same_noise=s.same_noise,
                      decode=self.adapter.can_decode, max_batch_size=s.max_batch_size, cps_logprob=s.cps_logprob,
                      noise_keys=keys)
        kwargs.update({k: v for k, v in dict(height=s.height, width=s.width, num_frames=s.num_frames).items()
                       if v is not None and not _is_callable_adapter(self.adapter)})
        kwargs.update(self.algorithm.sample_kwargs(self))
        with self._autocast():
            return sample(self.adapter, prompts, **kwargs)

    def _rollout_and_score(self, positions: List[int], prompt_ids: List[int]):
        """This process's rollout of the global prompt positions, and its RewardOutputs (None when
        the scores are taken over whole groups after a gather: split groups and a pairwise judge).
        With scoring.chunk_prompts, chunks are scored in the background while the next is sampled."""
        lay, G_loc = self.layout, len(self.layout.members)
        prompts = [self.train_prompts[i] for i in prompt_ids]
        meta = None if self.train_meta is None else [self.train_meta[i] for i in prompt_ids for _ in range(G_loc)]
        deferred = self._gathered_scoring()
        c = self.config.scoring.chunk_prompts
        whole = c is None or c >= len(positions) or deferred
        chunks = [(0, len(positions))] if whole else [(a, min(a + c, len(positions)))
                                                       for a in range(0, len(positions), c)]

        def produce(span):
            a, b = span
            r = self._rollout(prompts[a:b], NoiseKeys(tuple(positions[a:b]), lay.members.start), G_loc)
            return r, span

        def score(item):
            r, (a, b) = item
            if deferred:
                return None
            return self._score(self.reward, r, r.prompts, None if meta is None else meta[a * G_loc:b * G_loc])

        if len(chunks) == 1:
            item = produce(chunks[0])
            self._t_rollout_done = time.perf_counter()
            return item[0], self.scorer.call(lambda: score(item))
        pairs = self.scorer.pipeline(chunks, produce, score)
        self._t_rollout_done = time.perf_counter()
        rollout = cat_rollouts([r for (r, _), _ in pairs])
        outs = [o for _, o in pairs]
        return rollout, replace_rewards(outs[0], torch.cat([o.rewards for o in outs]))

    def _gathered_scoring(self) -> bool:
        """Split groups with a pairwise judge: the judge must see whole groups, so the samples are
        gathered and each process scores whole groups."""
        from ..rewards import WinRateReward

        return (self.dist.world > 1 and self.layout.groups == "split"
                and any(isinstance(r, WinRateReward) for r in self.reward.rewards.values()))

    def _global_outputs(self, rollout, local: Optional[RewardOutputs], prompt_ids: List[int]) -> RewardOutputs:
        """The RewardOutputs of the whole batch, in global sample order, on every process."""
        d, lay = self.dist, self.layout
        if local is not None:
            return replace_rewards(local, gather_rows(d, lay, local.rewards.float().contiguous()))
        # whole groups: gather the samples, score the groups g = rank, rank + W, ... here, gather the scores
        G = lay.G
        images = None if rollout.images is None else gather_rows(d, lay, rollout.images.contiguous())
        finals = gather_rows(d, lay, rollout.final_latents.contiguous())
        mine = [g for g in range(lay.P) if g % d.world == d.rank]
        rows = torch.tensor([g * G + j for g in mine for j in range(G)], dtype=torch.long)

        class _R:  # the fields _score reads
            pass

        part = _R()
        part.images = None if images is None else images[rows.to(images.device)]
        part.final_latents = finals[rows.to(finals.device)]
        prompts = [self.train_prompts[prompt_ids[g]] for g in mine for _ in range(G)]
        meta = None if self.train_meta is None else [self.train_meta[prompt_ids[g]] for g in mine for _ in range(G)]
        out = self.scorer.call(lambda: self._score(self.reward, part, prompts, meta))
        pieces = d.all_gather_object((rows, out.rewards.detach().float().cpu()))
        full = torch.empty(lay.P * G, out.rewards.shape[1])
        for r, v in pieces:
            full[r] = v
        return replace_rewards(out, full.to(out.rewards.device))

    def _score(self, reward: MultiReward, rollout, prompts: List[str], meta) -> RewardOutputs:
        images = rollout.images
        if images is not None and images.ndim == 5 and images.shape[2] == 3:  # video [N, F, 3, H, W] -> [N, 3, F, H, W]
            images = images.transpose(1, 2)
        if images is not None:
            images = images.float().clamp(0, 1)
        return reward(images, prompts, meta, latents=rollout.final_latents.float())

    def _advantages(self, outputs: RewardOutputs, group_ids: Tensor) -> Tensor:
        active = outputs.weights != 0
        if not bool(active.any()):
            raise ValueError(f"every reward component has weight 0 ({', '.join(outputs.names)}); nothing to optimise")
        idx = active.nonzero().flatten().to(outputs.rewards.device)
        r = outputs.rewards.detach().index_select(1, idx)
        check_weighted_finite([outputs.names[int(j)] for j in idx.tolist()], r, outputs.weights[active])
        adv = grouped_advantages(r, group_ids.to(r.device), outputs.weights[active].tolist(), self.reward.mode,
                                 self.config)
        if self.reward.pareto:
            from ..ops import pareto_mask

            mask = pareto_mask(r * torch.sign(outputs.weights[active]).to(r.device), group_ids.to(r.device))
            adv = torch.where(mask, adv, torch.zeros_like(adv))
        return adv

    # ------------------------------------------------------------------------------- train

    def _trained_steps(self, S: int, N: int, gen: torch.Generator) -> Tensor:
        """[N, K] indices into rollout.steps: the first K in order, or a random permutation per sample."""
        K = num_trained(S, self.config.train.timestep_fraction)
        if self.config.train.timestep_order == "in_order":
            return torch.arange(K).expand(N, K)
        return torch.stack([torch.randperm(S, generator=gen)[:K] for _ in range(N)])

    def _lr(self) -> float:
        t = self.config.train
        if t.lr_warmup_steps <= 0:
            return t.lr
        return t.lr * min(1.0, (self.optimizer_steps + 1) / t.lr_warmup_steps)

    def step(self) -> Dict[str, Any]:
        """One iteration; returns its metrics (also written to metrics.jsonl when there is a run dir).
        An iteration that fails (a reward that keeps failing, a non-finite reward) leaves the
        trainer as it was before it: the same prompts are drawn again by the next call."""
        consumed = self.sampler.consumed
        try:
            return self._step()
        except BaseException:
            self.sampler.consumed = consumed
            raise

    def _step(self) -> Dict[str, Any]:
        cfg, t = self.config, self.config.train
        P, G = t.prompts_per_iteration, cfg.sampling.group_size
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        self.scorer.reset_stats()
        idx = self.sampler.next(P)  # the global batch: the same prompts on every process
        positions = self.layout.prompts
        rollout, local_outputs = self._rollout_and_score(positions, [idx[p] for p in positions])
        sync()
        t1 = self._t_rollout_done
        outputs = self._global_outputs(rollout, local_outputs, idx)
        rewards = outputs.rewards.detach()
        t2 = time.perf_counter()
        group_ids = torch.arange(P).repeat_interleave(G)
        outcome = self._advantages(outputs, group_ids).to(self.device)
        if self.dist.world == 1:
            adv = self.algorithm.advantages(self, outcome, rollout)
            extra = self.algorithm.after_rewards(self, rollout, outputs.weighted_sum().detach())
        else:  # euphonium (the one algorithm with process advantages) runs on one process
            adv, extra = outcome, {}
        train_stats = self._train_on(rollout, adv)
        sync()
        t3 = time.perf_counter()
        N = P * G
        m: Dict[str, Tensor] = {}
        for k, name in enumerate(outputs.names):
            col = rewards[:, k].float()
            m[f"reward/{name}/mean"], m[f"reward/{name}/std"] = col.mean(), col.std(unbiased=False)
        ws = outputs.weighted_sum().detach().float()
        m["reward/mean"], m["reward/std"] = ws.mean(), ws.std(unbiased=False)
        gmean = torch.zeros(P, device=ws.device).index_add_(0, group_ids.to(ws.device), ws) / G
        gvar = torch.zeros(P, device=ws.device).index_add_(0, group_ids.to(ws.device), (ws - gmean[group_ids.to(ws.device)]) ** 2)
        m["zero_std_group_frac"] = (gvar == 0).float().mean()
        a = adv.float()
        m.update({"advantage/mean": a.mean(), "advantage/std": a.std(unbiased=False), "advantage/min": a.min(),
                  "advantage/max": a.max(), "advantage/zero_frac": (a == 0).float().mean()})
        if rollout.images is not None:  # means over equal shares: the mean of the processes' means
            hack = torch.stack(image_stats(rollout.images)).float()
            hack = self.dist.all_reduce(hack) / self.dist.world
            m["hack/saturation"], m["hack/high_freq"] = hack[0], hack[1]
        m.update(train_stats)
        m.update(extra)
        keys = list(m)
        values = _to_host([m[k] for k in keys])
        row: Dict[str, Any] = {"iteration": self.iteration + 1}
        row.update({k: (v if math.isfinite(v) else None) for k, v in zip(keys, values)})
        row.update({"optimizer_steps": self.optimizer_steps, "skipped_steps_total": self.skipped_steps,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "prompts_consumed": self.sampler.consumed,
                    "time/rollout": t1 - t0, "time/reward": t2 - t1, "time/train": t3 - t2, "time/total": t3 - t0,
                    "images_per_s": N / max(t1 - t0, 1e-9)})
        lat = self.scorer.latencies
        row.update({"reward/latency_s": max(lat) if lat else None, "reward/retries": self.scorer.retried,
                    "reward/queue_depth_max": self.scorer.max_queue})
        if self.dist.world > 1:
            row["world_size"] = self.dist.world
        if row.get("onpolicy/max_dev") not in (0.0, None) and not self._warned_on_policy and self.dist.main:
            self._warned_on_policy = True
            warnings.warn(f"on-policy check: the first minibatch's ratio deviates from 1 by {row['onpolicy/max_dev']:.3g} "
                          "(exactly 0 expected): the training forward differs from the rollout's (a different "
                          "batch composition, dropout, or nondeterministic kernels)", RuntimeWarning, stacklevel=2)
        self.iteration += 1
        if cfg.eval.every and self.iteration % cfg.eval.every == 0 and self.eval_prompts is not None:
            row.update(self.evaluate())
        self._log_row(row)
        return row

    def _train_on(self, rollout, adv: Tensor) -> Dict[str, Tensor]:
        """Inner epochs x global minibatches x trained steps. Every process walks the same global
        minibatches (drawn from the iteration's seed over the whole batch) and back-propagates its
        own samples of each, weighted by their share n_local / n_minibatch, so that the summed
        gradient is the one-process gradient of the minibatch's mean loss."""
        t, d = self.config.train, self.dist
        N = adv.shape[0]  # the global batch
        S = rollout.log_probs.shape[1]
        gen = torch.Generator().manual_seed(self.derived_seed("train", self.iteration))
        sel = self._trained_steps(S, N, gen) if S else torch.zeros(N, 0, dtype=torch.long)  # [N, K]
        K = sel.shape[1]
        per_step = adv.ndim == 2
        if t.mask_zero_advantage:
            nonzero = (adv != 0).any(dim=1) if per_step else adv != 0
            keep = nonzero.nonzero().flatten().cpu()
        else:
            keep = torch.arange(N)
        local_of = torch.full((N,), -1, dtype=torch.long)  # global sample -> its row in this process's rollout
        local_of[self.layout.global_index()] = torch.arange(self.layout.num_local)
        lo, hi = t.clip_range if isinstance(t.clip_range, tuple) else (t.clip_range, t.clip_range)
        ref, dev, fsdp = self.ref, self.device, self.parallel == "fsdp"
        # per (minibatch, step) entry: this process's share-weighted loss, clip fractions, approx-KL,
        # KL and mean ratio (summed over the processes), and its min and max ratio
        sums: List[Tensor] = []
        mins: List[Tensor] = []
        maxs: List[Tensor] = []
        norms: List[Tensor] = []
        has_kl = False
        onpolicy = torch.zeros((), device=dev)
        skipped = 0
        steps_done = 0
        bs = keep.numel() if t.batch_size is None else t.batch_size
        inf = torch.tensor(float("inf"), device=dev)
        for net in self.nets:
            net.train()
        try:
            for epoch in range(t.inner_epochs):
                if keep.numel() == 0 or K == 0:  # nothing to train on: no optimizer step, no EMA update
                    break
                order = keep[torch.randperm(keep.numel(), generator=gen)]
                for mb_i, start in enumerate(range(0, order.numel(), bs)):
                    mb_global = order[start:start + bs]
                    mine = mb_global[local_of[mb_global] >= 0]
                    share = mine.numel() / mb_global.numel()
                    # FSDP gathers each block's weights inside the forward: every process runs one,
                    # a process without samples here on its first row, with weight 0
                    run = mine.numel() > 0 or fsdp
                    rows = mine if mine.numel() else self.layout.global_index()[:1]
                    mb = local_of[rows]
                    mb_dev = mb.to(dev)
                    first = epoch == 0 and mb_i == 0
                    # FSDP averages the reduce-scatter over the processes; the shares sum to 1
                    weight = share * (d.world if fsdp else 1)
                    for k in range(K):
                        entry = torch.zeros(6, device=dev)
                        low, high = inf.clone(), -inf
                        if run:
                            par.set_gradient_sync(self.nets, k == K - 1)
                            steps_k = sel[rows, k]
                            same = bool((steps_k == steps_k[0]).all())
                            step_arg = int(steps_k[0]) if same else steps_k
                            with self._autocast():
                                lp, kl = evaluate_step(rollout, step_arg, mb, ref_model=ref, kl=t.kl)
                            steps_dev = steps_k.to(dev)
                            old = rollout.log_probs[mb_dev, steps_dev]
                            rows_dev = rows.to(adv.device)
                            a = adv[rows_dev, steps_k.to(adv.device)] if per_step else adv[rows_dev]
                            loss, st = grpo_loss(lp.float(), old, a.to(dev), (lo, hi), kl=kl, beta=t.beta)
                            scaled = loss * (weight / K)
                            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                            has_kl = kl is not None
                            if mine.numel():
                                with torch.no_grad():
                                    ratio = torch.exp(lp.detach().float() - old.float())
                                    entry = torch.stack([
                                        loss.detach().float(), (ratio < 1 - lo).float().mean(),
                                        (ratio > 1 + hi).float().mean(), st.approx_kl.float().reshape(()),
                                        kl.detach().float().mean() if kl is not None else torch.zeros((), device=dev),
                                        st.ratio_mean.float().reshape(())]) * share
                                    low, high = st.ratio_min.float().reshape(()), st.ratio_max.float().reshape(())
                                    if first:
                                        onpolicy = torch.maximum(onpolicy, (ratio - 1).abs().max())
                        sums.append(entry)
                        mins.append(low)
                        maxs.append(high)
                    par.set_gradient_sync(self.nets, True)
                    ok, norm = self._optimizer_step()
                    norms.append(norm)
                    skipped += 0 if ok else 1
                    steps_done += 1
        finally:
            par.set_gradient_sync(self.nets, True)
            for net in self.nets:
                net.eval()
        nan = torch.tensor(float("nan"))
        if sums:
            total = d.all_reduce(torch.stack(sums)).mean(dim=0)
            low = d.all_reduce(torch.stack(mins).min().reshape(1), "min")[0]
            high = d.all_reduce(torch.stack(maxs).max().reshape(1), "max")[0]
            d.all_reduce(onpolicy.reshape(1), "max")
        else:
            total, low, high = torch.full((6,), float("nan")), nan, nan
        out = {"loss": total[0], "clip_frac/low": total[1], "clip_frac/high": total[2], "approx_kl": total[3],
               "ratio/mean": total[5], "ratio/min": low, "ratio/max": high,
               "grad_norm": torch.stack(norms).mean() if norms else nan, "onpolicy/max_dev": onpolicy,
               "trained_samples": torch.tensor(float(keep.numel())), "skipped_steps": torch.tensor(float(skipped)),
               "minibatch_steps": torch.tensor(float(steps_done))}
        out["clip_frac"] = out["clip_frac/low"] + out["clip_frac/high"]
        if has_kl or (sums and self.config.train.beta > 0):
            out["kl"] = total[4]
        return out

    def _optimizer_step(self):
        """Clip, check finiteness, step (or skip and count), EMA; returns (applied, grad norm)."""
        t = self.config.train
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        if self.parallel == "ddp":
            par.all_reduce_gradients(self.dist, self.params)  # the one all-reduce of the optimizer step
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = t.max_grad_norm if t.max_grad_norm is not None else float("inf")
        norm = par.full_norm(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        finite = bool(torch.isfinite(norm))  # one flag per optimizer step
        if self.scaler is not None:
            if finite:
                self.scaler.step(self.optimizer)
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.optimizer_steps += 1
            if self.ema is not None:
                self.ema.update()
        else:
            self.skipped_steps += 1
        return finite, norm.detach().float()

    # ------------------------------------------------------------------------------- train loop

    def train(self, on_step: Optional[Callable[[Dict[str, Any]], None]] = None) -> List[Dict[str, Any]]:
        """Run to config.train.iterations, checkpointing every checkpoint.every and at the end.
        on_step(row), if given, runs after each iteration (and its checkpoint), for example a
        held-out evaluation."""
        cfg = self.config
        rows = []
        bar = None
        if cfg.logging.tqdm and self.dist.main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.train.iterations, initial=self.iteration, desc=f"flowsteer {cfg.algorithm}",
                       unit="it", dynamic_ncols=True)
        try:
            while self.iteration < cfg.train.iterations:
                row = self.step()
                rows.append(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=_fmt(row.get("reward/mean"), ".4g"), kl=_fmt(row.get("approx_kl"), ".2g"))
                every = cfg.checkpoint.every
                if self.run_dir is not None and ((every and self.iteration % every == 0)
                                                 or self.iteration == cfg.train.iterations):
                    self.save()
                if on_step is not None:
                    on_step(row)
        finally:
            if bar is not None:
                bar.close()
            if self._tb:
                self._tb.flush()
        return rows

    # ------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """ODE samples of the held-out prompts with the eval steps and CFG, fixed seeds and the EMA
        weights when EMA is on; the training and extra rewards' means, and a grid in samples/."""
        cfg, e = self.config, self.config.eval
        if self.eval_prompts is None:
            raise ConfigError("evaluate needs prompts.eval")
        prompts = self.eval_prompts[:e.max_prompts] if e.max_prompts else self.eval_prompts
        meta = None if self.eval_meta is None else self.eval_meta[:len(prompts)]
        gs = cfg.sampling.guidance_scale if e.guidance_scale is None else e.guidance_scale
        s = cfg.sampling
        size = {k: v for k, v in dict(height=s.height, width=s.width, num_frames=s.num_frames).items()
                if v is not None and not _is_callable_adapter(self.adapter)}
        # chunk c (seed eval.seed + c) runs on process c % W; under FSDP a process short of a chunk
        # in the last round runs one anyway (every process must join each forward) and drops it
        d = self.dist
        chunks = list(enumerate(range(0, len(prompts), e.batch_size)))
        mine = chunks[d.rank::d.world]
        rounds = -(-len(chunks) // d.world)
        done = []
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext(), self._autocast():
            for j in range(rounds):
                if j >= len(mine) and self.parallel != "fsdp":
                    break
                c, start = mine[j] if j < len(mine) else chunks[0]
                r = sample(self.adapter, prompts[start:start + e.batch_size], num_steps=e.num_steps, guidance_scale=gs,
                           kind="ode", noise_level=0.0, seed=e.seed + c, decode=self.adapter.can_decode, **size)
                if j < len(mine):
                    done.append((c, start, r))

        class _R:  # the fields _score reads
            pass

        roll = _R()
        roll.images = torch.cat([r.images.float() for _, _, r in done]) if done and done[0][2].images is not None else None
        roll.final_latents = torch.cat([r.final_latents.float() for _, _, r in done]) if done else None
        local_prompts = [q for _, start, r in done for q in prompts[start:start + r.num_samples]]
        local_meta = None if meta is None else [m for _, start, r in done for m in meta[start:start + r.num_samples]]
        # a pairwise win rate needs a group; one ODE sample per prompt has none, so it is left out here
        from ..rewards import WinRateReward

        pointwise = {n: r for n, r in self.reward.rewards.items() if not isinstance(r, WinRateReward)}
        reward = None
        if pointwise:
            reward = self.reward if len(pointwise) == len(self.reward.rewards) else MultiReward(
                pointwise, {n: w for n, w in self.reward.weights.items() if n.split("/")[0] in pointwise})
        scored, extra = None, None
        if done and reward is not None:
            scored = self._score(reward, roll, local_prompts, local_meta)
        if done and self.eval_rewards:
            extra = self._score(MultiReward(self.eval_rewards), roll, local_prompts, local_meta)
        want_images = self.run_dir is not None and roll.images is not None
        pieces = d.all_gather_object((
            [c for c, _, _ in done],
            None if scored is None else (scored.rewards.detach().float().cpu(), scored.names, scored.weights),
            None if extra is None else (extra.rewards.detach().float().cpu(), extra.names),
            (roll.images.clamp(0, 1) * 255).round().to(torch.uint8).cpu() if want_images and d.world > 1 else None))
        order = sorted((c, k) for k, piece in enumerate(pieces) for c in piece[0])  # the chunks in prompt order

        def rows(slot):
            parts, at = {}, {}
            for k, piece in enumerate(pieces):
                if piece[slot] is None:
                    continue
                start = 0
                for c in piece[0]:
                    n = min(e.batch_size, len(prompts) - c * e.batch_size)
                    at[c] = (k, start, n)
                    start += n
                parts[k] = piece[slot]
            return parts, at

        out: Dict[str, float] = {}
        for slot, prefix in ((1, "eval/reward/"), (2, "eval/extra/")):
            parts, at = rows(slot)
            if not parts:
                continue
            first = next(iter(parts.values()))
            values = torch.cat([parts[at[c][0]][0][at[c][1]:at[c][1] + at[c][2]] for c, _ in order])
            for k, name in enumerate(first[1]):
                out[f"{prefix}{name}"] = float(values[:, k].mean())
            if slot == 1:
                out["eval/reward/mean"] = float((values @ first[2].float()).mean())
        if want_images and d.main:
            if d.world > 1:
                parts, at = rows(3)
                grid = torch.cat([parts[at[c][0]][at[c][1]:at[c][1] + at[c][2]] for c, _ in order]).float() / 255
            else:
                grid = roll.images
            write_grid(os.path.join(self.run_dir, "samples", f"eval-{self.iteration:06d}.png"), grid, prompts)
        return out

    # ----------------------------------------------------------------------------- checkpoints

    def state(self, rng_all: Optional[List[Any]] = None):
        """(tensors, meta) of everything a run needs to continue bit for bit. rng_all: every
        process's ckpt.rng_state(), in rank order (default: this process's only). Under FSDP the
        weights, optimizer and EMA are not here: they go to the sharded checkpoint."""
        sharded = self.parallel == "fsdp"
        tensors: Dict[str, Tensor] = {} if sharded else {f"model.{n}": p for n, p in self.named_params}
        opt_m: Dict[str, Any] = {}
        if not sharded:
            opt_t, opt_m = ckpt.flatten_optimizer(self.optimizer, "optimizer")
            tensors.update(opt_t)
            if self.ema is not None:
                tensors.update(self.ema.tensors())
        rng_all = rng_all or [ckpt.rng_state()]
        rng_t, rng_m = rng_all[0]
        tensors.update(rng_t)
        for r, (t_r, _) in enumerate(rng_all[1:], 1):  # the other processes' generators
            tensors.update({f"rng.rank{r}.{k[4:]}": v for k, v in t_r.items()})
        meta: Dict[str, Any] = {
            "format": 1, "step": self.iteration, "config_hash": self.config.hash(), "config": self.config.to_dict(),
            "optimizer": opt_m, "optimizer_steps": self.optimizer_steps, "skipped_steps": self.skipped_steps,
            "sampler": self.sampler.state_dict(), "rng": rng_m, "versions": _versions(),
            "window": {"type": self.config.sampling.window.type, "iteration": self.iteration},
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "world_size": self.dist.world, "parallel": self.parallel, "sharded": sharded,
            "rng_ranks": [m for _, m in rng_all[1:]],
        }
        if self.prm is not None:
            tensors.update({f"prm.{k}": v for k, v in self.prm.state_dict().items()})
            meta["prm"] = {"latent_channels": self.prm.latent_channels, "video": self.prm.video}
            if self.prm._optimizer is not None:
                pt, pm = ckpt.flatten_optimizer(self.prm._optimizer, "prm_optimizer")
                tensors.update(pt)
                meta["prm"]["optimizer"] = pm
        return tensors, meta

    def save(self, directory: Optional[str] = None) -> str:
        """Write a checkpoint atomically: into `directory`'s checkpoints/ (default: the run dir).
        With several processes every one of them calls it: rank 0 writes (with every process's
        generator states); under FSDP each writes its shards first. The checkpoint is complete, and
        `latest` names it, only once every process has written its part."""
        root = directory if directory is not None else self.run_dir
        if root is None:
            raise ValueError("save needs a directory (the trainer has no run_dir)")
        d = self.dist
        ckpt_root = os.path.join(root, "checkpoints")
        rng_all = d.all_gather_object(ckpt.rng_state())
        tmp = None
        if self.parallel == "fsdp":
            done = os.path.isfile(os.path.join(ckpt_root, f"step-{self.iteration:06d}", "state.json"))
            if not d.broadcast_object(done):
                tmp = d.broadcast_object(ckpt.tmp_dir(ckpt_root, self.iteration) if d.main else None)
                if d.main:
                    if os.path.exists(tmp):
                        shutil.rmtree(tmp)
                    os.makedirs(tmp)
                d.barrier()
                self._save_sharded(os.path.join(tmp, "sharded"))
        path, error = None, None
        if d.main:
            try:
                path = self._write_checkpoint(ckpt_root, rng_all, tmp)
            except Exception as exc:  # noqa: BLE001 -- every process raises it below
                error = f"{type(exc).__name__}: {exc}"
        path, error = d.broadcast_object((path, error))  # also the barrier: nobody runs ahead of the write
        if error is not None:
            raise RuntimeError(f"writing the checkpoint of iteration {self.iteration} failed on rank 0: {error}")
        return path

    def _write_checkpoint(self, ckpt_root: str, rng_all, tmp: Optional[str]) -> str:
        tensors, meta = self.state(rng_all)
        lora = self.config.model.lora is not None

        def extra(tmp):
            if lora:
                save_lora(self.model, self.nets, os.path.join(tmp, "lora"))
                if self.ema is not None:
                    with self.ema.applied():
                        save_lora(self.model, self.nets, os.path.join(tmp, "lora_ema"))
            net = self.nets[0]
            if hasattr(net, "config"):
                with open(os.path.join(tmp, "network_config.json"), "w") as f:
                    json.dump({k: v for k, v in dict(net.config).items()}, f, indent=1, default=list)

        return ckpt.save_checkpoint(ckpt_root, self.iteration, tensors, meta, extra,
                                    keep=self.config.checkpoint.keep, tmp=tmp)

    def _sharded_state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        nets = torch.nn.ModuleList(self.nets)
        model_sd, optim_sd = get_state_dict(nets, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        if self.ema is not None:
            state["ema"] = dict(zip(self.ema.names, self.ema.shadow))
        return nets, state

    def _save_sharded(self, path: str) -> None:
        """torch.distributed.checkpoint of the sharded weights, optimizer and EMA (every process
        writes its shards; loadable on another world size)."""
        import torch.distributed.checkpoint as dcp

        _, state = self._sharded_state()
        dcp.save(state, checkpoint_id=path)

    def _load_sharded(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        nets, state = self._sharded_state()
        dcp.load(state, checkpoint_id=path)
        set_state_dict(nets, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        if self.ema is not None:
            with torch.no_grad():
                for shadow, value in zip(self.ema.shadow, state["ema"].values()):
                    if value is not shadow:
                        shadow.copy_(value)

    def load_state(self, path: str) -> None:
        tensors, meta = ckpt.load_checkpoint(path)
        sharded = bool(meta.get("sharded"))
        if self.parallel == "fsdp" and not sharded:
            raise ValueError(f"checkpoint {path} holds whole weights (written by one process or under 'ddp'); resume "
                             "it with train.parallel 'ddp' or on one process (a sharded checkpoint loads on any "
                             "world size and mode)")
        if sharded:  # torch.distributed.checkpoint reshards to this run's layout (or to whole tensors)
            self._load_sharded(os.path.join(path, "sharded"))
        else:
            with torch.no_grad():
                for n, p in self.named_params:
                    if f"model.{n}" not in tensors:
                        raise ValueError(f"checkpoint {path} has no weights for {n}: it was written for another model")
                    p.copy_(tensors[f"model.{n}"])
            ckpt.unflatten_optimizer(self.optimizer, tensors, meta["optimizer"], "optimizer")
            if self.ema is not None:
                self.ema.load(tensors)
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        if "prm" in meta:
            p = meta["prm"]
            prm = self.ensure_prm(latent_channels=p["latent_channels"], video=p["video"])
            prm.load_state_dict({k[4:]: v.to(self.device) for k, v in tensors.items() if k.startswith("prm.")})
            if "optimizer" in p:
                prm._optimizer = torch.optim.AdamW(prm.parameters(), lr=self.config.prm.fit_lr, weight_decay=0.0)
                ckpt.unflatten_optimizer(prm._optimizer, tensors, p["optimizer"], "prm_optimizer")
        self.sampler.load_state_dict(meta["sampler"])
        self.iteration = int(meta["step"])
        self.optimizer_steps = int(meta["optimizer_steps"])
        self.skipped_steps = int(meta["skipped_steps"])
        r = self.dist.rank
        if 0 < r <= len(meta.get("rng_ranks", [])):  # this rank's own generators, when the run had this rank
            own = {f"rng.{k[len(f'rng.rank{r}.'):]}": v for k, v in tensors.items() if k.startswith(f"rng.rank{r}.")}
            ckpt.set_rng_state(own, meta["rng_ranks"][r - 1])
        else:
            ckpt.set_rng_state(tensors, meta["rng"])

    @classmethod
    def resume(cls, run_dir: str, pipe=None, reward=None, config: Union[Config, str, Dict[str, Any], None] = None,
               **kwargs) -> "GRPOTrainer":
        """The trainer of run_dir at its latest complete checkpoint. config: None (the run's own), or
        a config that may differ from it only in train.iterations (and logging)."""
        cfg_path = os.path.join(run_dir, "config.yaml")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{run_dir} is not a flowsteer run directory (no config.yaml)")
        saved = load_config(cfg_path)
        path = ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
        if path is None:
            raise FileNotFoundError(f"{run_dir} has no complete checkpoint to resume from")
        if config is not None:
            new = config if isinstance(config, Config) else load_config(config)
            diff = diff_configs(saved, new)
            if diff:
                raise ConfigError(f"resuming {run_dir} with a config that changes the run: {', '.join(diff)} differ "
                                  "(only train.iterations, logging, distributed, scoring and train.parallel may change)")
            cfg = new
        else:
            cfg = saved
        with open(os.path.join(path, "state.json")) as f:
            step = json.load(f)["step"]
        trainer = cls(pipe, reward, cfg, run_dir=run_dir, _resuming=True, **kwargs)
        trainer.load_state(path)
        if not trainer.dist.main:  # rank 0 owns the run directory's files
            return trainer
        _truncate_metrics(os.path.join(run_dir, "metrics.jsonl"), step)
        if config is not None:
            head = {"config_hash": cfg.hash(), **{f"version {k}": v for k, v in _versions().items()}}
            ckpt_text = dump_yaml(cfg, head)
            tmp = cfg_path + ".tmp"
            with open(tmp, "w") as f:
                f.write(ckpt_text)
            os.replace(tmp, cfg_path)
        return trainer


def replace_rewards(outputs: RewardOutputs, rewards: Tensor) -> RewardOutputs:
    return dataclasses.replace(outputs, rewards=rewards)


def _to_host(tensors: List[Tensor]) -> List[float]:
    """0-d tensors as floats, with one transfer per device they live on (the rewards may be on the
    CPU while the rest is on the GPU)."""
    out: List[float] = [0.0] * len(tensors)
    by_device: Dict[torch.device, List[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for device, idx in by_device.items():
        values = torch.stack([tensors[i].detach().float().reshape(()) for i in idx]).tolist()
        for i, v in zip(idx, values):
            out[i] = v
    return out


def _fmt(value, spec: str) -> str:
    """A logged number for the progress bar ("-" where the iteration had none, e.g. every sample masked)."""
    return "-" if value is None else format(value, spec)


def _is_callable_adapter(adapter) -> bool:
    from ..sampler import CallableAdapter

    return isinstance(adapter, CallableAdapter)


def _truncate_metrics(path: str, step: int) -> None:
    """Drop rows after `step` (iterations run after the checkpoint, before the process died)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a row cut by the kill
                continue
            if row.get("iteration", 0) <= step:
                keep.append(line)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(k + "\n" for k in keep))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
