"""Toy rewards for trying the trainer without reward-model weights (and for its tests)."""
import torch

from ..rewards import reward


@reward(name="brightness", input="pixels")
def brightness(images: torch.Tensor, prompts, meta) -> torch.Tensor:
    """The mean pixel value of each image in [0, 1]: easy to raise, and to see raised."""
    return images.float().flatten(1).mean(dim=1)
