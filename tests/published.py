"""The step formulas as the published research code states them, transcribed as test oracles.

These are independent of flowsteer's reference (which follows the design's notation): Flow-GRPO
writes the step with dt = sigma_next - sigma < 0 and DanceGRPO through a score estimate.
"""
import math

import torch


def flow_grpo_sde_step(v, x, sigma, sigma_next, noise_level, sigma_max, noise=None, prev_sample=None):
    """Flow-GRPO's sde_step_with_logprob (SDE branch): (prev_sample, log_prob, prev_sample_mean, std_dev_t)."""
    dt = sigma_next - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, torch.full_like(sigma, sigma_max), sigma))) * noise_level
    prev_sample_mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    if prev_sample is None:
        prev_sample = prev_sample_mean + std_dev_t * torch.sqrt(-1 * dt) * noise
    log_prob = (
        -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
        - torch.log(std_dev_t * torch.sqrt(-1 * dt))
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), prev_sample_mean, std_dev_t


def flow_grpo_cps_step(v, x, sigma, sigma_next, noise_level, noise=None, prev_sample=None):
    """Flow-GRPO's CPS branch, with its simplified log-prob -mean (x' - mean)^2."""
    std_dev_t = sigma_next * math.sin(noise_level * math.pi / 2)
    pred_original_sample = x - sigma * v
    noise_estimate = x + v * (1 - sigma)
    prev_sample_mean = pred_original_sample * (1 - sigma_next) + noise_estimate * torch.sqrt(sigma_next**2 - std_dev_t**2)
    if prev_sample is None:
        prev_sample = prev_sample_mean + std_dev_t * noise
    log_prob = -((prev_sample.detach() - prev_sample_mean) ** 2)
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), prev_sample_mean


def dance_grpo_step(v, x, eta, sigma, sigma_next, noise=None, prev_sample=None):
    """DanceGRPO's flux_step with sde_solver=True and grpo=True."""
    dsigma = sigma_next - sigma
    prev_sample_mean = x + dsigma * v
    pred_original_sample = x - sigma * v
    delta_t = sigma - sigma_next
    std_dev_t = eta * torch.sqrt(delta_t)
    score_estimate = -(x - pred_original_sample * (1 - sigma)) / sigma**2
    log_term = -0.5 * eta**2 * score_estimate
    prev_sample_mean = prev_sample_mean + log_term * dsigma
    if prev_sample is None:
        prev_sample = prev_sample_mean + noise * std_dev_t
    log_prob = (
        -((prev_sample.detach().to(torch.float32) - prev_sample_mean.to(torch.float32)) ** 2) / (2 * (std_dev_t**2))
        - torch.log(std_dev_t)
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), prev_sample_mean
