"""Rewards: the protocol, multi-reward aggregation, reward-model adapters, remote rewards, VLM judges
over the OpenAI-compatible chat API, the Pref-GRPO win rate and the latent process reward model.

A reward is called as `reward(images_or_latents, prompts, meta)` and returns fp32 [N] (or a dict
of them); see base.py for the conventions and docs/rewards.md for the whole picture. The CLIP-family
adapters import transformers (and open_clip) only when built.
"""
from .base import FunctionReward, Reward, RewardError, as_reward, reward
from .chat import ChatJudge, ChatPairwiseJudge, ReplyParser
from .clip import AestheticMLP, AestheticScore, CLIPScore, HPSv2Score, PickScore
from .jpeg import JpegCompressibility, JpegIncompressibility
from .multi import MultiReward, RewardOutputs
from .ocr import OCRReward
from .pairwise import PairwiseJudge, WinRateReward
from .preprocess import CLIP_MEAN, CLIP_STD, ImagePreprocess, clip_preprocess
from .prm import LatentPRM
from .remote import RemoteReward, RemoteRewardError, RewardServer, ServerLimits, serve, serve_main

__all__ = [
    "AestheticMLP",
    "AestheticScore",
    "CLIPScore",
    "CLIP_MEAN",
    "CLIP_STD",
    "ChatJudge",
    "ChatPairwiseJudge",
    "FunctionReward",
    "HPSv2Score",
    "ImagePreprocess",
    "JpegCompressibility",
    "JpegIncompressibility",
    "LatentPRM",
    "MultiReward",
    "OCRReward",
    "PairwiseJudge",
    "PickScore",
    "RemoteReward",
    "RemoteRewardError",
    "ReplyParser",
    "Reward",
    "RewardError",
    "RewardOutputs",
    "RewardServer",
    "ServerLimits",
    "WinRateReward",
    "as_reward",
    "clip_preprocess",
    "reward",
    "serve",
    "serve_main",
]
