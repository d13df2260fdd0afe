"""Tiny diffusers pipelines with random weights, built offline and deterministically from a seed.

The architectures follow diffusers' own fast-test configs
(tests/pipelines/{stable_diffusion_3,flux,wan}/); the schedulers carry the configs of the real
checkpoints, so shift and dynamic shift behave as they do on SD3.5, FLUX.1-dev and Wan 2.1.
Tokenizers are built here from small vocabularies instead of being fetched from the hub.

Shapes at the sizes the tests use (B prompts):

| pipeline | call | latents (output_type="latent") | prompt_embeds | pooled |
|---|---|---|---|---|
| SD3  | 32x32 px           | [B, 4, 32, 32]         | [B, 77 + 256, 32] | [B, 64] |
| FLUX | 32x32 px           | [B, 256, 4] (packed)   | [B, 512, 32]      | [B, 32] |
| Wan  | 16x16 px, 5 frames | [B, 16, 2, 2, 2]       | [B, 226, 32]      | -       |

SD3 and FLUX have `vae_scale_factor == 1` (a one-block VAE). Wan's VAE downsamples 8x in space
and 4x in time, as the real one does.

Each component is initialised in fp32 from its own offset of `seed`, then cast to `dtype`, so one
seed gives the same weights (up to rounding) in every dtype, and building leaves the caller's RNG
untouched. The weights also depend on the library versions: transformers 4.57 and 5.24
initialise the text encoders differently (diffusers 0.35 and 0.42 agree on the rest).

`tiny_sd35_medium_transformer` builds the full-size SD3.5-Medium transformer for GPU benchmarks.
"""
import json
import os
import string
import tempfile
from contextlib import contextmanager
from typing import Optional

import torch

from .._optional import require

for _module in ("diffusers", "transformers", "tokenizers"):
    require(_module, "diffusers", "flowsteer.testing.pipelines (tiny random-weight diffusers pipelines)")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors  # noqa: E402
from tokenizers.models import Unigram  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

__all__ = [
    "tiny_sd3_pipeline",
    "tiny_flux_pipeline",
    "tiny_wan_pipeline",
    "sd35_medium_config",
    "tiny_sd35_medium_transformer",
]

# CLIP's context length; SD3 and FLUX read it from `tokenizer.model_max_length`.
CLIP_MAX_LENGTH = 77
# The longest T5 sequence any of the pipelines asks for (FLUX's default max_sequence_length).
T5_MAX_LENGTH = 512

# Words that become single tokens in both tokenizers, so that prompts of the kind the demo task
# draws ("two red circles left of a blue square") are short. Other text still encodes: CLIP falls
# back to bytes, T5 to characters (<unk> outside ASCII letters, digits and punctuation).
_WORDS = (
    "a an the of and or to on in at with without next is are photo painting picture image video "
    "one two three four five six seven eight nine ten zero no many "
    "red green blue yellow orange purple pink brown black white gray grey "
    "circle circles square squares triangle triangles star stars shape shapes dot dots "
    "left right above below top bottom middle center near far big small large tiny "
    "cat dog bird car tree house person man woman dance monkey squirrel burger eating"
).split()


@contextmanager
def _seeded(seed):
    # Fork the CPU generator so that building a pipeline leaves the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _bytes_to_unicode():
    # GPT-2 / CLIP byte-level alphabet: printable bytes map to themselves, the rest to 256 + n.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return [chr(c) for c in chars]


def _clip_tokenizer():
    """A byte-level BPE tokenizer laid out as CLIP's: the 256 byte symbols, the same with the
    end-of-word suffix `</w>`, one token per prefix of each word in `_WORDS`, then
    `<|startoftext|>` and `<|endoftext|>` as the last two ids. Padding and unknown are
    `<|endoftext|>`, as in SD3's and FLUX's first CLIP tokenizer. Every word of `_WORDS` is one token.
    """
    alphabet = _bytes_to_unicode()
    vocab = {}
    for symbol in alphabet + [c + "</w>" for c in alphabet]:
        vocab[symbol] = len(vocab)
    # Each word is built left to right: (w0, w1), (w0w1, w2), ... BPE applies the lowest-ranked
    # pair first, so the prefix merges rank above every character pair, and each word's first
    # pair ranks above any other word's first pair that also occurs inside it.
    prefix_merges, first_pairs, inner_pairs = [], [], {}
    for word in _WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        if len(symbols) == 1:
            continue
        pairs = list(zip(symbols, symbols[1:]))
        if pairs[0] not in inner_pairs:
            first_pairs.append(pairs[0])
            inner_pairs[pairs[0]] = set()
        inner_pairs[pairs[0]].update(pairs[1:])
        left = symbols[0] + symbols[1]
        for right in symbols[2:]:
            if (left, right) not in prefix_merges:
                prefix_merges.append((left, right))
            left += right
    pending, char_merges = list(first_pairs), []
    while pending:
        # Kahn's order; on a cycle (none for `_WORDS`) the word keeps a split, which is still valid.
        ready = [p for p in pending if not any(p in inner_pairs[q] for q in pending if q != p)]
        chosen = ready[0] if ready else pending[0]
        char_merges.append(chosen)
        pending.remove(chosen)
    merges = prefix_merges + char_merges
    for left, right in char_merges + prefix_merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    # Loading from files works the same way under transformers 4 (slow or fast CLIPTokenizer) and 5.
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        # Naming the class stops transformers 4 from guessing a model type from the folder's name.
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"tokenizer_class": "CLIPTokenizer"}, f)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer.from_pretrained(
            folder, local_files_only=True, model_max_length=CLIP_MAX_LENGTH
        )


def _t5_tokenizer():
    """A SentencePiece-style Unigram tokenizer laid out as T5's: `<pad>` = 0, `</s>` = 1,
    `<unk>` = 2, then `▁word` pieces for `_WORDS` and single characters as the fallback.
    Text is lowercased. Each sequence ends with `</s>`; padding is `<pad>` with attention mask 0.
    """
    scores = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -4.0}
    # Whole words score far above their spelling, so Viterbi keeps known words in one piece.
    scores.update(("▁" + word, -3.0) for word in _WORDS)
    for char in string.ascii_lowercase + string.digits + string.punctuation:
        # setdefault: "▁a" is both a word and a character; a repeated piece would leave an id
        # that `len(tokenizer)` does not count.
        scores.setdefault(char, -8.0)
        scores.setdefault("▁" + char, -8.0)
    backend = Tokenizer(Unigram(list(scores.items()), unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=T5_MAX_LENGTH,
        padding_side="right",
    )


def _clip_config(tokenizer, hidden_size, projection_dim):
    # diffusers' test CLIP (5 layers, intermediate 37), with the special ids taken from our
    # tokenizer: eos_token_id != 2 makes CLIP pool at the first `<|endoftext|>`, as the real one does.
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        projection_dim=projection_dim,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae(latent_channels: int) -> AutoencoderKL:
    """A one-block AutoencoderKL (vae_scale_factor 1) with SD3's shift and scaling factors."""
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def _t5_kwargs(tokenizer):
    # hf-internal-testing/tiny-random-t5's encoder, without dropout; vocab sized to our tokenizer.
    return dict(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=5,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="relu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def _ready(module, dtype):
    """Cast `module` to `dtype` as `from_pretrained(torch_dtype=dtype)` would leave it: modules the
    class keeps in fp32 (diffusers' `_keep_in_fp32_modules`, for example Wan's time embedding and
    norms; transformers' for fp16 only, or `_keep_in_fp32_modules_strict`) stay fp32. A plain
    `.to(dtype)` would cast those too, and diffusers warns about it.
    """
    if isinstance(module, PreTrainedModel):
        keep = set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
        if dtype == torch.float16:
            keep |= set(module._keep_in_fp32_modules or ())
    else:
        keep = set(module._keep_in_fp32_modules or ())
    for prefix, sub in module.named_modules():
        target = torch.float32 if keep & set(prefix.split(".")) else dtype
        for name, param in sub.named_parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(torch.float32 if name in keep else target)
        # Buffers are replaced, not given new .data: a buffer made as a view (SD3's position table is
        # `table.unsqueeze(0)`) would keep a base of the old dtype, which torch.compile rejects.
        for name, buf in list(sub.named_buffers(recurse=False)):
            if buf is not None and buf.is_floating_point():
                sub._buffers[name] = buf.to(torch.float32 if name in keep else target)
    return module.eval()


def tiny_sd3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusion3Pipeline:
    """A StableDiffusion3Pipeline with random weights, on the CPU, in eval mode.

    - transformer: SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
      attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
      pooled_projection_dim=64, out_channels=4), as in diffusers' test.
    - text_encoder, text_encoder_2: CLIPTextModelWithProjection, hidden 16, projection 32, different
      weights. Their concatenated hidden states (16 + 16) fill the T5 width (32) and their pooled
      outputs (32 + 32) give pooled_projection_dim, so nothing is cut when SD3 joins them.
    - text_encoder_3: T5EncoderModel with d_model 32 = joint_attention_dim.
    - vae: one-block AutoencoderKL, 4 latent channels, so `vae_scale_factor == 1`.
    - scheduler: FlowMatchEulerDiscreteScheduler(shift=3.0), SD3 and SD3.5-Medium's config.

    At height = width = 32: latents [B, 4, 32, 32]; prompt_embeds [B, 333, 32] (77 CLIP + 256 T5
    tokens); pooled_prompt_embeds [B, 64].
    """
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer()
    tokenizer_3 = _t5_tokenizer()
    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=32,
            patch_size=1,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
        )
    with _seeded(seed + 1):
        text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, 16, 32))
    with _seeded(seed + 2):
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, 16, 32))
    with _seeded(seed + 3):
        text_encoder_3 = T5EncoderModel(T5Config(**_t5_kwargs(tokenizer_3)))
    with _seeded(seed + 4):
        vae = _tiny_vae(latent_channels=4)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=_ready(transformer, dtype),
        scheduler=scheduler,
        vae=_ready(vae, dtype),
        text_encoder=_ready(text_encoder, dtype),
        tokenizer=tokenizer,
        text_encoder_2=_ready(text_encoder_2, dtype),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_ready(text_encoder_3, dtype),
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> FluxPipeline:
    """A FluxPipeline with random weights, on the CPU, in eval mode, guidance-distilled like FLUX.1-dev.

    - transformer: FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1,
      num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
      pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)) as in diffusers' test, plus
      guidance_embeds=True, so `guidance_scale` feeds a guidance embedding and there is no CFG batch.
    - text_encoder: CLIPTextModel, hidden 32 = pooled_projection_dim.
    - text_encoder_2: T5EncoderModel, d_model 32 = joint_attention_dim.
    - vae: one-block AutoencoderKL with 1 latent channel (in_channels = 4 after 2x2 packing), so
      `vae_scale_factor == 1` and height and width must be even.
    - scheduler: FLUX.1-dev's FlowMatchEulerDiscreteScheduler: use_dynamic_shifting=True,
      base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096.

    At height = width = 32: packed latents [B, 256, 4] (unpacked [B, 1, 32, 32]); prompt_embeds
    [B, 512, 32]; pooled_prompt_embeds [B, 32]; text_ids [512, 3].
    """
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        )
    with _seeded(seed + 1):
        text_encoder = CLIPTextModel(_clip_config(tokenizer, 32, 32))
    with _seeded(seed + 2):
        text_encoder_2 = T5EncoderModel(T5Config(**_t5_kwargs(tokenizer_2)))
    with _seeded(seed + 3):
        vae = _tiny_vae(latent_channels=1)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=_ready(transformer, dtype),
        scheduler=scheduler,
        vae=_ready(vae, dtype),
        text_encoder=_ready(text_encoder, dtype),
        tokenizer=tokenizer,
        text_encoder_2=_ready(text_encoder_2, dtype),
        tokenizer_2=tokenizer_2,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, *, boundary_ratio: Optional[float] = None,
                      expand_timesteps: bool = False) -> WanPipeline:
    """A WanPipeline (text to video) with random weights, on the CPU, in eval mode.

    Wan 2.2 variants: boundary_ratio adds a second expert `transformer_2` (the same config, other
    weights) for the low-noise steps, as Wan2.2-A14B; expand_timesteps gives the transformer one
    timestep per latent token, as Wan2.2-TI2V-5B.

    - transformer: WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2,
      attention_head_dim=12, in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
      num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
      as in diffusers' test.
    - text_encoder: UMT5EncoderModel (Wan's encoder class), d_model 32 = text_dim.
    - vae: AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
      temperal_downsample=[False, True, True]): 8x spatial, 4x temporal, as the real VAE.
    - scheduler: FlowMatchEulerDiscreteScheduler(shift=3.0). Wan's checkpoints ship
      UniPCMultistepScheduler(flow_shift=3.0); flowsteer samples with Euler-type steps, so the tiny
      pipeline carries the Euler scheduler with the same shift.

    num_frames must be 4k + 1 and height, width multiples of 16. At 16x16 px and 5 frames:
    latents [B, 16, 2, 2, 2]; prompt_embeds [B, 226, 32] (zero past each prompt's length);
    decoded frames (output_type="pt") [B, 5, 3, 16, 16].
    """
    tokenizer = _t5_tokenizer()
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    with _seeded(seed):
        transformer = WanTransformer3DModel(**config)
    transformer_2 = None
    if boundary_ratio is not None:
        with _seeded(seed + 3):
            transformer_2 = _ready(WanTransformer3DModel(**config), dtype)
    with _seeded(seed + 1):
        text_encoder = UMT5EncoderModel(UMT5Config(**_t5_kwargs(tokenizer)))
    with _seeded(seed + 2):
        vae = AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_ready(text_encoder, dtype),
        vae=_ready(vae, dtype),
        scheduler=scheduler,
        transformer=_ready(transformer, dtype),
        # Wan 2.2's arguments (diffusers >= 0.35) only when asked for.
        **({} if boundary_ratio is None else dict(transformer_2=transformer_2, boundary_ratio=boundary_ratio)),
        **(dict(expand_timesteps=True) if expand_timesteps else {}),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd35_medium_config() -> dict:
    """The SD3Transformer2DModel keyword arguments of Stable Diffusion 3.5 Medium (2.24B parameters).

    Latents at 512 px are [B, 16, 64, 64]; text tokens are 333 (77 CLIP + 256 T5) of width 4096.
    """
    return dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=24,
        num_attention_heads=24,
        attention_head_dim=64,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    )


def tiny_sd35_medium_transformer(device, dtype: torch.dtype) -> SD3Transformer2DModel:
    """The full-size SD3.5-Medium transformer with random weights, for benchmarks.

    Parameters are created directly on `device` in `dtype` (the default device and dtype while
    constructing), so the 2.24B parameters never pass through the host. Only the architecture is
    tiny-pipeline-like (random weights); building it takes 4.5 GB in bf16, so tests either check
    `sd35_medium_config()` or build on `device="meta"`, which allocates nothing.
    """
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = SD3Transformer2DModel(**sd35_medium_config())
    finally:
        torch.set_default_dtype(previous_dtype)
    # The sin-cos position table is built in fp32 whatever the default dtype; cast it too.
    return _ready(model, dtype)


def sd35_medium_pipeline(device, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> StableDiffusion3Pipeline:
    """A StableDiffusion3Pipeline around the full-size SD3.5-Medium transformer, for throughput.

    Rollout throughput does not depend on weight values, and at 10 steps it hardly depends on the
    text encoders (encoding is once per prompt). So the text encoders keep SD3.5's widths, which
    the transformer's inputs need (CLIP-L 768 and CLIP-G 1280, pooled 768 + 1280 = 2048; T5 width
    4096; 77 + 256 tokens), but have one layer each; the VAE has SD3's 16 latent channels and
    scale factor 8 with 8 channels per block. Latents at 512 px: [B, 16, 64, 64].
    """
    tokenizer, tokenizer_2, tokenizer_3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()

    def clip(tok, width):
        cfg = _clip_config(tok, width, width)
        cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_attention_heads = 1, 4 * width, width // 64
        return CLIPTextModelWithProjection(cfg)

    t5 = dict(_t5_kwargs(tokenizer_3), d_model=4096, d_kv=64, num_heads=64, d_ff=1024, num_layers=1)
    with torch.device(device):
        with _seeded(seed + 1):
            text_encoder = clip(tokenizer, 768)
        with _seeded(seed + 2):
            text_encoder_2 = clip(tokenizer_2, 1280)
        with _seeded(seed + 3):
            text_encoder_3 = T5EncoderModel(T5Config(**t5))
        with _seeded(seed + 4):
            vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                latent_channels=16, norm_num_groups=4, scaling_factor=1.5305, shift_factor=0.0609)
    with _seeded(seed):
        transformer = tiny_sd35_medium_transformer(device, dtype)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_ready(vae, dtype),
        text_encoder=_ready(text_encoder, dtype),
        tokenizer=tokenizer,
        text_encoder_2=_ready(text_encoder_2, dtype),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_ready(text_encoder_3, dtype),
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
