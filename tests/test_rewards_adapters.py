"""Reward-model adapters on tiny random models built offline: CLIP score, PickScore, the LAION
aesthetic predictor, HPSv2 (open_clip) and OCR. Each checks shapes, determinism, batching, the
published preprocessing constants, the gradient path, and the errors for missing weights."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from flowsteer.rewards import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    AestheticMLP,
    AestheticScore,
    CLIPScore,
    HPSv2Score,
    ImagePreprocess,
    OCRReward,
    PickScore,
)
from flowsteer.rewards import ocr as ocr_mod  # noqa: E402
from flowsteer.testing.pipelines import _bytes_to_unicode  # noqa: E402

IMAGE_SIZE = 32
PROMPTS = ["a red circle", "two blue squares", "a red circle", "a green triangle left of a cat"]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIPModel (2 layers, width 32, 32 px images) with a byte-level CLIP tokenizer and a
    CLIPImageProcessor config, saved as a local checkpoint directory."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("tiny_clip")
    chars = _bytes_to_unicode()  # the tiny pipelines' CLIP alphabet
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer.from_pretrained(str(d), local_files_only=True, model_max_length=77)
    tok.save_pretrained(str(d))
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(str(d))
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": IMAGE_SIZE},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD), "do_convert_rgb": True}))
    return d


def images(n=4, h=40, w=52, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


def _reference_cosine(model_dir, x, prompts):
    """cos(image, text) the transformers way: CLIPModel's logits_per_image diagonal / logit_scale."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    pixels = ImagePreprocess(resize=IMAGE_SIZE, crop=(IMAGE_SIZE, IMAGE_SIZE))(x)
    with torch.no_grad():
        t = tok(prompts, padding=True, return_tensors="pt")
        out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=pixels)
        return out.logits_per_image.diagonal() / model.logit_scale.exp(), model.logit_scale.exp()


# ------------------------------------------------------------------------------ preprocessing


def test_clip_constants_are_openai_clip():
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert tuple(OPENAI_CLIP_MEAN) == CLIP_MEAN and tuple(OPENAI_CLIP_STD) == CLIP_STD
    assert ImagePreprocess() == ImagePreprocess(resize=224, crop=(224, 224), mean=CLIP_MEAN, std=CLIP_STD)


def test_preprocess_matches_transformers_processor(tiny_clip_dir):
    """Our torch preprocessing against CLIPImageProcessor (PIL) on a smooth non-square image."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(str(tiny_clip_dir), local_files_only=True)
    cfg = ImagePreprocess.from_processor_config(str(tiny_clip_dir), default_size=224)
    assert cfg == ImagePreprocess(resize=IMAGE_SIZE, crop=(IMAGE_SIZE, IMAGE_SIZE), mean=CLIP_MEAN, std=CLIP_STD)
    g = torch.Generator().manual_seed(1)
    x = F.interpolate(torch.rand(2, 3, 10, 14, generator=g), size=(45, 61), mode="bilinear")
    x = (x * 255).round() / 255  # what PIL sees: uint8
    ref = proc([(a * 255).round().byte().permute(1, 2, 0).numpy() for a in x], return_tensors="pt")["pixel_values"]
    ours = cfg(x)
    assert ours.shape == ref.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    # PIL rounds its resized image to uint8: one level is 1 / 255 / std ~ 0.0146 after normalising.
    one_level = 1 / 255 / min(CLIP_STD)
    err = (ours - ref).abs()
    assert float(err.max()) <= 2 * one_level and float(err.mean()) <= one_level / 2, (float(err.max()), float(err.mean()))


def test_preprocess_is_differentiable_and_exact_at_size():
    x = torch.rand(2, 3, 224, 224, requires_grad=True)
    y = ImagePreprocess()(x)
    mean = torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).reshape(1, 3, 1, 1)
    torch.testing.assert_close(y, (x - mean) / std)  # no resize or crop at the model's size
    y.sum().backward()
    torch.testing.assert_close(x.grad, (1 / std).expand_as(x))


# ----------------------------------------------------------------------------------- CLIP score


def test_clip_score_shapes_values_determinism(tiny_clip_dir):
    r = CLIPScore(str(tiny_clip_dir), batch_size=3)
    assert (r.name, r.input, r.differentiable) == ("clip_score", "pixels", False)
    assert r.preprocess.mean == CLIP_MEAN and r.preprocess.std == CLIP_STD and r.preprocess.crop == (32, 32)
    assert not r.model.training and not any(p.requires_grad for p in r.model.parameters())
    x = images()
    out = r(x, PROMPTS)
    assert out.shape == (4,) and out.dtype == torch.float32 and not out.requires_grad
    want, _ = _reference_cosine(tiny_clip_dir, x, PROMPTS)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r(x, PROMPTS), out, rtol=0, atol=0)  # deterministic
    whole = CLIPScore(str(tiny_clip_dir), batch_size=None)(x, PROMPTS)
    torch.testing.assert_close(whole, out, rtol=1e-5, atol=1e-6)  # batching changes nothing
    torch.testing.assert_close(CLIPScore(str(tiny_clip_dir), scale=100)(x, PROMPTS), 100 * out, rtol=1e-5, atol=1e-4)


def test_clip_score_gradient_path(tiny_clip_dir):
    r = CLIPScore(str(tiny_clip_dir), differentiable=True)
    x = images(2).requires_grad_(True)
    out = r(x, PROMPTS[:2])
    assert out.requires_grad
    out.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
    assert all(p.grad is None for p in r.model.parameters())  # the reward model stays frozen
    # A step along the gradient raises the score (first order).
    with torch.no_grad():
        stepped = r((x + 1e-2 * x.grad.sign()).clamp(0, 1), PROMPTS[:2])
    assert bool((stepped.sum() > out.detach().sum()))


def test_clip_score_video_averages_frames(tiny_clip_dir):
    r = CLIPScore(str(tiny_clip_dir))
    v = torch.rand(2, 3, 3, 32, 32)
    frames = v.permute(0, 2, 1, 3, 4).reshape(6, 3, 32, 32)
    per_frame = r(frames, [p for p in PROMPTS[:2] for _ in range(3)])
    torch.testing.assert_close(r(v, PROMPTS[:2]), per_frame.reshape(2, 3).mean(1), rtol=1e-5, atol=1e-6)


def test_clip_score_errors(tiny_clip_dir, tmp_path):
    with pytest.raises(TypeError, match=r"CLIPScore needs a CLIP checkpoint directory: pass CLIPScore\(path=DIR\)"):
        CLIPScore()
    with pytest.raises(FileNotFoundError, match="CLIPScore: a CLIP checkpoint directory not found at .*never downloads"):
        CLIPScore(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="is not a transformers checkpoint directory"):
        CLIPScore(str(tmp_path))
    with pytest.raises(ValueError, match="reward 'clip_score' scores image-text agreement: pass prompts"):
        CLIPScore(str(tiny_clip_dir))(images(2))


# ------------------------------------------------------------------------------------ PickScore


def test_pickscore_is_logit_scale_times_cosine(tiny_clip_dir):
    r = PickScore(str(tiny_clip_dir), processor_path=str(tiny_clip_dir))
    assert r.name == "pickscore" and r.preprocess.mean == CLIP_MEAN
    x = images()
    cos, scale = _reference_cosine(tiny_clip_dir, x, PROMPTS)
    torch.testing.assert_close(r(x, PROMPTS), scale * cos, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r(x, PROMPTS), r(x, PROMPTS), rtol=0, atol=0)
    d = PickScore(str(tiny_clip_dir), differentiable=True)
    xg = images(2).requires_grad_(True)
    d(xg, PROMPTS[:2]).sum().backward()
    assert bool(torch.isfinite(xg.grad).all()) and float(xg.grad.abs().sum()) > 0
    with pytest.raises(TypeError, match=r"PickScore needs a CLIP checkpoint directory: pass PickScore\(path=DIR\).*PickScore_v1"):
        PickScore()


# ----------------------------------------------------------------------------------- aesthetic


def test_aesthetic_mlp_is_the_published_architecture():
    mlp = AestheticMLP()
    linears = [m for m in mlp.layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    assert [m.p for m in mlp.layers if isinstance(m, nn.Dropout)] == [0.2, 0.2, 0.1]
    assert sorted(k for k in mlp.state_dict()) == sorted(
        f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))


@pytest.fixture(scope="module")
def aesthetic_pth(tiny_clip_dir, tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(AestheticMLP(16).state_dict(), path)
    return path


def test_aesthetic_score(tiny_clip_dir, aesthetic_pth):
    from transformers import CLIPModel

    r = AestheticScore(str(aesthetic_pth), str(tiny_clip_dir), batch_size=3)
    assert r.name == "aesthetic" and not r.mlp.training
    x = images()
    out = r(x)  # prompts are not needed
    assert out.shape == (4,)
    model = CLIPModel.from_pretrained(str(tiny_clip_dir), local_files_only=True).eval()
    mlp = AestheticMLP(16).eval()
    mlp.load_state_dict(torch.load(aesthetic_pth, weights_only=True))
    with torch.no_grad():
        pixels = ImagePreprocess(resize=IMAGE_SIZE, crop=(IMAGE_SIZE, IMAGE_SIZE))(x)
        emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        want = mlp(emb / emb.norm(dim=-1, keepdim=True)).squeeze(1)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r(x), out, rtol=0, atol=0)
    d = AestheticScore(str(aesthetic_pth), str(tiny_clip_dir), differentiable=True)
    xg = images(2).requires_grad_(True)
    d(xg).sum().backward()
    assert bool(torch.isfinite(xg.grad).all()) and float(xg.grad.abs().sum()) > 0


def test_aesthetic_errors(tiny_clip_dir, tmp_path):
    with pytest.raises(TypeError, match=r"AestheticScore needs the aesthetic MLP weights: pass AestheticScore\(mlp_path=FILE"):
        AestheticScore(None, str(tiny_clip_dir))
    wrong = tmp_path / "wrong.pth"
    torch.save(AestheticMLP(768).state_dict(), wrong)
    with pytest.raises(ValueError, match="the MLP takes 768-d embeddings but the CLIP model .* gives 16-d"):
        AestheticScore(str(wrong), str(tiny_clip_dir))
    with pytest.raises(TypeError, match=r"pass AestheticScore\(clip_path=DIR\)"):
        AestheticScore(str(wrong))


# ---------------------------------------------------------------------------------------- HPSv2


def _open_clip_importable():
    try:
        import open_clip  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - e.g. a torchvision built for another torch
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


OPEN_CLIP_OK, OPEN_CLIP_WHY = _open_clip_importable()


def test_hpsv2_without_open_clip_says_what_to_install(tmp_path, monkeypatch):
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {}}, ckpt)
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        HPSv2Score(str(ckpt))
    with pytest.raises(TypeError, match=r"pass HPSv2Score\(checkpoint=FILE\)"):
        HPSv2Score()


class _FakeOpenCLIPModel(nn.Module):
    """The open_clip surface HPSv2Score uses: visual.image_size, encode_image, encode_text."""

    def __init__(self):
        super().__init__()
        self.visual = nn.Linear(3 * 16 * 16, 8)
        self.visual.image_size = 16
        self.text = nn.Embedding(128, 8)

    def encode_image(self, x, normalize=False):
        f = self.visual(x.flatten(1))
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens, normalize=False):
        f = self.text(tokens).mean(1)
        return F.normalize(f, dim=-1) if normalize else f


def _fake_open_clip():
    mod = types.ModuleType("open_clip")
    mod.calls = []
    mod.create_model = lambda name, **kw: (mod.calls.append((name, kw)), _FakeOpenCLIPModel())[1]
    mod.add_model_config = lambda path: mod.calls.append(("config", str(path)))
    mod.get_tokenizer = lambda name: (lambda texts: torch.tensor([[ord(c) % 128 for c in t[:8].ljust(8)] for t in texts]))
    mod.get_model_preprocess_cfg = lambda model: {"size": 16, "mean": CLIP_MEAN, "std": CLIP_STD,
                                                  "interpolation": "bicubic", "resize_mode": "shortest"}
    return mod


def test_hpsv2_glue_with_a_stand_in_open_clip(tmp_path, monkeypatch):
    """HPSv2Score's own code (checkpoint loading, preprocessing, scoring) against a stand-in for the
    open_clip API; the real-package test below runs where open_clip is importable."""
    fake = _fake_open_clip()
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    torch.manual_seed(0)
    ref = _FakeOpenCLIPModel()
    ckpt = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, ckpt)  # DDP-saved keys
    r = HPSv2Score(str(ckpt), batch_size=3)
    assert fake.calls[0][0] == "ViT-H-14" and fake.calls[0][1]["pretrained"] is None
    assert r.preprocess == ImagePreprocess(resize=16, crop=(16, 16), crop_rounding="round")
    x = images(4, 24, 20)
    out = r(x, PROMPTS)
    with torch.no_grad():
        img = ref.encode_image(ImagePreprocess(resize=16, crop=(16, 16), crop_rounding="round")(x), normalize=True)
        txt = ref.encode_text(fake.get_tokenizer("")(PROMPTS), normalize=True)
    torch.testing.assert_close(out, (img * txt).sum(1), rtol=1e-5, atol=1e-6)
    d = HPSv2Score(str(ckpt), differentiable=True)
    xg = images(2, 24, 20).requires_grad_(True)
    d(xg, PROMPTS[:2]).sum().backward()
    assert bool(torch.isfinite(xg.grad).all()) and float(xg.grad.abs().sum()) > 0


@pytest.mark.skipif(not OPEN_CLIP_OK, reason=f"open_clip is not importable here ({OPEN_CLIP_WHY})")
def test_hpsv2_tiny_open_clip(tmp_path):
    import open_clip

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    cfg_path = tmp_path / "tiny-hps-vit.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(cfg_path))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-hps-vit", pretrained=None, output_dict=True).eval()
    ckpt = tmp_path / "hps.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    r = HPSv2Score(str(ckpt), "tiny-hps-vit", model_config=str(cfg_path), batch_size=3)
    assert r.preprocess.mean == CLIP_MEAN and r.preprocess.std == CLIP_STD and r.preprocess.crop == (32, 32)
    x = images()
    out = r(x, PROMPTS)
    assert out.shape == (4,)
    tok = open_clip.get_tokenizer("tiny-hps-vit")
    with torch.no_grad():
        res = model(r.preprocess(x), tok(PROMPTS))
        want = (res["image_features"] @ res["text_features"].T).diagonal()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r(x, PROMPTS), out, rtol=0, atol=0)
    d = HPSv2Score(str(ckpt), "tiny-hps-vit", differentiable=True)
    xg = images(2).requires_grad_(True)
    d(xg, PROMPTS[:2]).sum().backward()
    assert bool(torch.isfinite(xg.grad).all())


# ------------------------------------------------------------------------------------------ OCR


@pytest.mark.parametrize("recognized,target,want", [
    ("Hello World", "hello world", 1.0),
    ("xx HELLO worldxx", "hello world", 1.0),  # contained: distance 0
    ("helo world", "hello world", 1 - 1 / 10),  # spaces removed: 10 characters, one deletion
    ("", "abc", 0.0),
    ("zzzzzzzzzzzz", "ab", 0.0),  # distance capped at len(target)
    ("kitten", "sitting", 1 - 3 / 7),
])
def test_ocr_similarity_hand_computed(recognized, target, want):
    assert ocr_mod.ocr_similarity(recognized, target) == pytest.approx(want)


def test_ocr_reward_with_a_given_engine():
    seen = []

    def engine(arr):
        seen.append(arr.shape)
        return "Hello Wrld"

    r = OCRReward(engine=engine, batch_size=2)
    prompts = ['a neon sign that says "Hello World"', 'a sign "hello world" at night', 'graffiti "xyz"']
    out = r(images(3, 20, 30), prompts)
    torch.testing.assert_close(out, torch.tensor([1 - 1 / 10, 1 - 1 / 10, 0.0]))
    assert seen == [(20, 30, 3)] * 3
    out = r(images(2, 20, 30), ["no quotes", "none"], {"text": ["hello wrld", "HELLOWRLD"]})
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0]))
    out = r(images(2, 20, 30), None, [{"text": "hello wrld"}, {"text": "zzzz"}])
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="reward 'ocr': prompt 1 has no text in double quotes"):
        r(images(2), ['"a"', "plain"])


def test_ocr_engine_failure_scores_zero():
    def broken(arr):
        raise RuntimeError("engine crashed")

    r = OCRReward(engine=broken)
    with pytest.warns(RuntimeWarning, match="OCR engine 'broken' failed on sample 0"):
        out = r(images(1), ['"abc"'])
    assert out.tolist() == [0.0] and r.failures == 1


def test_ocr_without_engines_says_what_to_install(monkeypatch):
    for name in ("pytesseract", "paddleocr", "easyocr"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="none is installed; install one of: pip install pytesseract.*pip install easyocr"):
        OCRReward()
    with pytest.raises(ImportError, match=r"OCRReward\(engine='paddleocr'\) needs pip install paddleocr"):
        OCRReward(engine="paddleocr")
    with pytest.raises(ValueError, match="engine must be 'auto', one of"):
        OCRReward(engine="abbyy")


def _tesseract_available():
    try:
        ocr_mod.load_engine("tesseract")
    except ImportError as exc:
        return False, str(exc)
    return True, ""


TESSERACT_OK, TESSERACT_WHY = _tesseract_available()


@pytest.mark.skipif(not TESSERACT_OK, reason=f"tesseract is not installed here ({TESSERACT_WHY})")
def test_ocr_tesseract_reads_rendered_text():
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (256, 96), "white")
    ImageDraw.Draw(img).text((10, 20), "Hello World", fill="black", font=ImageFont.load_default(size=40))
    x = torch.stack([torch.from_numpy(__import__("numpy").asarray(img).copy()).permute(2, 0, 1).float() / 255,
                     torch.ones(3, 96, 256)])
    out = OCRReward(engine="tesseract")(x, ['a sign saying "Hello World"'] * 2)
    assert out[0] > 0.8 and out[1] == 0.0
