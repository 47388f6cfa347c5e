"""ImageReward: THUDM's checkpoint layout (``ImageReward.pt``) loaded strictly, and the score computed independently
twice: with transformers' BLIP modules directly, and with timm's ViT plus BLIP's cross-attending BERT written out
from ``med.py``. The reference key names and shapes are written here from THUDM's module definitions (vit.py,
med.py, blip_pretrain.py, ImageReward.py), not derived from the project's conversion."""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from rewards import MissingWeightsError, WeightsMismatchError, get_reward
from rewards.imagereward import IGNORED_REFERENCE_KEYS, to_reference_key

MEAN, STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse"]
TINY = dict(vision_width=48, vision_depth=2, vision_heads=2, text_width=32, text_depth=2, text_heads=2, text_mlp=64)
REAL = dict(
    vision_width=1024, vision_depth=24, vision_heads=16, text_width=768, text_depth=12, text_heads=12, text_mlp=3072
)
VOCAB_SIZE = 30524  # bert-base-uncased + [DEC] + [ENC] (med_config.json)
MAX_POSITIONS = 512


def reference_shapes(vision_width, vision_depth, text_width, text_depth, text_mlp, **_):
    """``ImageReward(med_config).state_dict()`` shapes: BLIP_Pretrain (timm-style ViT/16 at 224 with 4x MLP;
    BertModel without pooler whose layers cross-attend to the ViT width; vision_proj/text_proj to 256) + MLP."""
    vw, tw, patches = vision_width, text_width, (224 // 16) ** 2
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    shapes = {
        f"{v}cls_token": (1, 1, vw),
        f"{v}pos_embed": (1, patches + 1, vw),
        f"{v}patch_embed.proj.weight": (vw, 3, 16, 16),
        f"{v}patch_embed.proj.bias": (vw,),
        f"{v}norm.weight": (vw,),
        f"{v}norm.bias": (vw,),
    }
    for i in range(vision_depth):
        block = f"{v}blocks.{i}."
        for name, out, inp in [
            ("attn.qkv", 3 * vw, vw),
            ("attn.proj", vw, vw),
            ("mlp.fc1", 4 * vw, vw),
            ("mlp.fc2", vw, 4 * vw),
        ]:
            shapes[f"{block}{name}.weight"], shapes[f"{block}{name}.bias"] = (out, inp), (out,)
        for norm in ("norm1", "norm2"):
            shapes[f"{block}{norm}.weight"], shapes[f"{block}{norm}.bias"] = (vw,), (vw,)
    shapes[f"{t}embeddings.word_embeddings.weight"] = (VOCAB_SIZE, tw)
    shapes[f"{t}embeddings.position_embeddings.weight"] = (MAX_POSITIONS, tw)
    shapes[f"{t}embeddings.LayerNorm.weight"] = shapes[f"{t}embeddings.LayerNorm.bias"] = (tw,)
    shapes[f"{t}embeddings.position_ids"] = (1, MAX_POSITIONS)
    for i in range(text_depth):
        layer = f"{t}encoder.layer.{i}."
        linears = [
            ("attention.self.query", tw, tw),
            ("attention.self.key", tw, tw),
            ("attention.self.value", tw, tw),
            ("attention.output.dense", tw, tw),
            ("crossattention.self.query", tw, tw),
            ("crossattention.self.key", tw, vw),
            ("crossattention.self.value", tw, vw),
            ("crossattention.output.dense", tw, tw),
            ("intermediate.dense", text_mlp, tw),
            ("output.dense", tw, text_mlp),
        ]
        for name, out, inp in linears:
            shapes[f"{layer}{name}.weight"], shapes[f"{layer}{name}.bias"] = (out, inp), (out,)
        for norm in ("attention.output.LayerNorm", "crossattention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"{layer}{norm}.weight"], shapes[f"{layer}{norm}.bias"] = (tw,), (tw,)
    shapes["blip.vision_proj.weight"], shapes["blip.vision_proj.bias"] = (256, vw), (256,)
    shapes["blip.text_proj.weight"], shapes["blip.text_proj.bias"] = (256, tw), (256,)
    for i, (out, inp) in zip((0, 2, 4, 6, 7), [(1024, tw), (128, 1024), (64, 128), (16, 64), (1, 16)], strict=True):
        shapes[f"mlp.layers.{i}.weight"], shapes[f"mlp.layers.{i}.bias"] = (out, inp), (out,)
    return shapes


def random_reference_state(seed=0):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in reference_shapes(**TINY).items():
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[-1]).expand(shape).clone()
        elif "norm" in key.lower() and key.endswith("weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=generator)
    return state


def write_vocab(directory):
    """A small bert-uncased-style WordPiece vocabulary file (the real one is 30,522 lines)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters)]
    tokens += ["photo", "of", "cat", "an", "oil", "painting", "light", "##house", "red", "car"]
    path = directory / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n")
    return path


def blip_tokenizer(vocab):
    """BLIP's ``init_tokenizer``: BertTokenizer + bos [DEC] + additional special [ENC]."""
    tokenizer = BertTokenizer(vocab=str(vocab))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def preprocess(images):
    """``Resize(224, bicubic)`` + ``CenterCrop(224)`` + OpenAI mean/std; clamped as PIL's uint8 output is."""
    x = TF.resize(images, [224], interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    return TF.normalize(TF.center_crop(x, [224, 224]), CLIP_MEAN, CLIP_STD)


def reference_head(state, width):
    head = nn.Sequential(
        nn.Linear(width, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )
    head.load_state_dict({k.removeprefix("mlp.layers."): v for k, v in state.items() if k.startswith("mlp.")})
    return head.eval()


def score_with_transformers_blip(state, vocab, images, prompts):
    """transformers' BlipVisionModel + BlipTextModel built here, the checkpoint renamed by hand here."""
    vision = BlipVisionModel(
        BlipVisionConfig(
            hidden_size=48,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=16,
            image_size=224,
            layer_norm_eps=1e-6,
            hidden_act="gelu",
        )
    ).eval()
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            encoder_hidden_size=48,
            layer_norm_eps=1e-12,
            is_decoder=True,
        ),
        add_pooling_layer=False,
    ).eval()
    vision_state = {}
    for key, value in state.items():
        if not key.startswith("blip.visual_encoder."):
            continue
        name = key.removeprefix("blip.visual_encoder.")
        for old, new in [
            ("cls_token", "embeddings.class_embedding"),
            ("pos_embed", "embeddings.position_embedding"),
            ("patch_embed.proj", "embeddings.patch_embedding"),
            ("blocks.", "encoder.layers."),
            ("attn.proj", "self_attn.projection"),
            ("attn.qkv", "self_attn.qkv"),
            ("norm1", "layer_norm1"),
            ("norm2", "layer_norm2"),
        ]:
            name = name.replace(old, new)
        vision_state["post_layernorm." + name[5:] if name.startswith("norm.") else name] = value
    vision.load_state_dict(vision_state, strict=True)
    text_state = {
        k.removeprefix("blip.text_encoder."): v
        for k, v in state.items()
        if k.startswith("blip.text_encoder.") and not k.endswith("position_ids")
    }
    text.load_state_dict(text_state, strict=True)
    tokens = blip_tokenizer(vocab)(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        image_embeds = vision(pixel_values=preprocess(images)).last_hidden_state
        out = text(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
            is_decoder=False,
        ).last_hidden_state
        return ((reference_head(state, 32)(out[:, 0]) - MEAN) / STD).squeeze(-1)


def med_bert(state, input_ids, attention_mask, image_embeds, heads, layers, eps=1e-12):
    """BLIP's ``med.py`` BertModel in multimodal mode, written out: post-LN BERT whose layers run bidirectional
    self-attention (padding masked with -10000), cross-attention to every image token, then the feed-forward."""

    def p(name):
        return state[f"blip.text_encoder.{name}"]

    def linear(x, name):
        return F.linear(x, p(f"{name}.weight"), p(f"{name}.bias"))

    def layer_norm(x, name):
        return F.layer_norm(x, x.shape[-1:], p(f"{name}.weight"), p(f"{name}.bias"), eps)

    def attention(x, context, name, bias):
        b, length, width = x.shape

        def split(t):
            return t.view(b, -1, heads, width // heads).transpose(1, 2)

        q = split(linear(x, f"{name}.self.query"))
        k = split(linear(context, f"{name}.self.key"))
        v = split(linear(context, f"{name}.self.value"))
        probs = (q @ k.transpose(-1, -2) / math.sqrt(width // heads) + bias).softmax(dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(b, length, width)
        return layer_norm(linear(out, f"{name}.output.dense") + x, f"{name}.output.LayerNorm")

    length = input_ids.shape[1]
    h = F.embedding(input_ids, p("embeddings.word_embeddings.weight"))
    h = layer_norm(h + p("embeddings.position_embeddings.weight")[:length], "embeddings.LayerNorm")
    padding = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    for i in range(layers):
        name = f"encoder.layer.{i}"
        h = attention(h, h, f"{name}.attention", padding)
        h = attention(h, image_embeds, f"{name}.crossattention", 0.0)
        inner = F.gelu(linear(h, f"{name}.intermediate.dense"))
        h = layer_norm(linear(inner, f"{name}.output.dense") + h, f"{name}.output.LayerNorm")
    return h


def score_with_timm_and_med(state, vocab, images, prompts):
    """The reference recipe on the reference layout: timm's VisionTransformer (BLIP's vit.py is timm's, eps 1e-6)
    loaded strictly from ``blip.visual_encoder.*``, the written-out BERT above, the MLP, the z-scoring."""
    vit = VisionTransformer(
        img_size=224, patch_size=16, embed_dim=48, depth=2, num_heads=2, qkv_bias=True, num_classes=0, global_pool=""
    ).eval()
    prefix = "blip.visual_encoder."
    vit.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    tokens = blip_tokenizer(vocab)(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        image_embeds = vit.forward_features(preprocess(images))
        out = med_bert(state, tokens.input_ids, tokens.attention_mask, image_embeds, heads=2, layers=2)
        return ((reference_head(state, 32)(out[:, 0]) - MEAN) / STD).squeeze(-1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ImageReward")
    state = random_reference_state()
    torch.save(state, directory / "ImageReward.pt")
    vocab = write_vocab(directory)
    return state, directory, vocab


@pytest.fixture(scope="module")
def loaded(checkpoint):
    _, directory, vocab = checkpoint
    return get_reward(
        "imagereward", pretrained=False, tiny=True, weights={"model": directory / "ImageReward.pt", "tokenizer": vocab}
    )


def test_ignored_keys_are_exactly_blips_unused_parts():
    blip_unused = {
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
        "blip.text_encoder.embeddings.position_ids",
    }
    assert blip_unused == IGNORED_REFERENCE_KEYS


def test_reference_layout_loads_strictly(checkpoint, loaded):
    state, _, _ = checkpoint
    ours = {to_reference_key(k): v for k, v in loaded.state_dict().items()}
    assert set(ours) == set(state) - IGNORED_REFERENCE_KEYS
    for key, value in ours.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    probes = {  # a few tensors reached through the transformers modules, named here by hand
        "blip.visual_encoder.cls_token": loaded.vision.embeddings.class_embedding,
        "blip.visual_encoder.pos_embed": loaded.vision.embeddings.position_embedding,
        "blip.visual_encoder.blocks.1.attn.qkv.weight": loaded.vision.encoder.layers[1].self_attn.qkv.weight,
        "blip.visual_encoder.norm.bias": loaded.vision.post_layernorm.bias,
        "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight": (
            loaded.text.encoder.layer[1].crossattention.self.key.weight
        ),
        "mlp.layers.7.weight": loaded.mlp.layers[7].weight,
    }
    for key, tensor in probes.items():
        torch.testing.assert_close(tensor.detach(), state[key], rtol=0, atol=0)


def test_directory_safetensors_and_absent_ignored_keys(checkpoint, loaded, tmp_path):
    from safetensors.torch import save_file

    state, directory, vocab = checkpoint
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expected = loaded(images, PROMPTS)
        from_directory = get_reward(
            "imagereward", pretrained=False, tiny=True, weights={"model": directory, "tokenizer": directory}
        )
        torch.testing.assert_close(from_directory(images, PROMPTS), expected, rtol=0, atol=0)
        trimmed = {k: v.contiguous() for k, v in state.items() if k not in IGNORED_REFERENCE_KEYS}
        save_file(trimmed, str(tmp_path / "ImageReward.safetensors"))
        weights = {"model": tmp_path / "ImageReward.safetensors", "tokenizer": vocab}
        from_safetensors = get_reward("imagereward", pretrained=False, tiny=True, weights=weights)
        torch.testing.assert_close(from_safetensors(images, PROMPTS), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("drop", r"missing: blip\.text_encoder\.encoder\.layer\.1\.crossattention\.self\.value\.weight"),
        ("extra", r"unexpected: blip\.itm_head\.weight"),
        ("decoder", r"unexpected: blip\.text_decoder\.cls\.predictions\.bias"),
        ("shape", r"wrong shape: blip\.visual_encoder\.pos_embed: checkpoint \(1, 50, 48\) vs model \(1, 197, 48\)"),
        ("layout", r"unexpected: vision\.embeddings\.class_embedding"),
    ],
)
def test_mismatched_checkpoint_names_the_key(checkpoint, tmp_path, edit, message):
    state, _, vocab = checkpoint
    state = dict(state)
    if edit == "drop":
        del state["blip.text_encoder.encoder.layer.1.crossattention.self.value.weight"]
    elif edit == "extra":
        state["blip.itm_head.weight"] = torch.zeros(2, 32)
    elif edit == "decoder":
        state["blip.text_decoder.cls.predictions.bias"] = torch.zeros(VOCAB_SIZE)
    elif edit == "shape":
        state["blip.visual_encoder.pos_embed"] = torch.zeros(1, 50, 48)
    else:  # this module's own names are not the reference layout
        state["vision.embeddings.class_embedding"] = state.pop("blip.visual_encoder.cls_token")
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(WeightsMismatchError, match=message):
        get_reward(
            "imagereward",
            pretrained=False,
            tiny=True,
            weights={"model": tmp_path / "ImageReward.pt", "tokenizer": vocab},
        )


def test_score_matches_independent_computations(checkpoint, loaded):
    state, _, vocab = checkpoint
    images = torch.rand(2, 3, 240, 300)  # not square: resize the short side to 224, centre crop
    images[1] = images[1] ** 4  # a darker second image
    prompts = [PROMPTS[0], PROMPTS[0]]
    with torch.no_grad():
        ours = loaded(images, prompts)
        swapped = loaded(images, PROMPTS[::-1])
    torch.testing.assert_close(ours, score_with_transformers_blip(state, vocab, images, prompts), rtol=0, atol=1e-4)
    torch.testing.assert_close(ours, score_with_timm_and_med(state, vocab, images, prompts), rtol=0, atol=1e-4)
    torch.testing.assert_close(swapped, score_with_timm_and_med(state, vocab, images, PROMPTS[::-1]), rtol=0, atol=1e-4)
    assert (ours[0] - ours[1]).abs() > 1e-2, "different images should score differently"
    assert (ours[0] - swapped[0]).abs() > 1e-2, "different prompts should score differently"


def test_tokens_are_cached_and_start_with_cls(checkpoint, loaded):
    _, _, vocab = checkpoint
    lines = vocab.read_text().split()
    tokenizer = loaded.prompt_processor.tokenizer
    assert [tokenizer.token_to_id(t) for t in ("[DEC]", "[ENC]")] == [len(lines), len(lines) + 1]
    with torch.no_grad():
        loaded(torch.rand(2, 3, 64, 64), PROMPTS)
        loaded(torch.rand(1, 3, 64, 64), PROMPTS[:1])
    tokens = loaded.prompt_cache(PROMPTS, torch.device("cpu"), torch.float32)
    assert len(loaded.prompt_cache) == 2 and tokens.keys() == {"input_ids", "attention_mask"}
    assert tokens["input_ids"].dtype == torch.long and tokens["input_ids"].shape == (2, 35)
    # The reference scores with the tokenizer's ids as they are: [CLS] first (never replaced by [ENC]), then padding.
    assert (tokens["input_ids"][:, 0] == lines.index("[CLS]")).all()
    long = "a painting of " + "a very red cat " * 20 + "[DEC]"  # truncated to 35 tokens
    reference = blip_tokenizer(vocab)
    for prompts in (PROMPTS, [long, "[ENC] a dog"]):
        ours = loaded.prompt_processor(prompts)
        expected = reference(prompts, padding="max_length", max_length=35, truncation=True, return_tensors="pt")
        assert torch.equal(ours["input_ids"], expected.input_ids)
        assert torch.equal(ours["attention_mask"], expected.attention_mask)


def test_gradient_batch_and_bf16_autocast(loaded):
    x = torch.rand(3, 3, 96, 128, requires_grad=True)
    prompts = [PROMPTS[0], PROMPTS[1], "a red car"]
    scores = loaded(x, prompts)
    scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        items = torch.cat([loaded(x[i : i + 1], prompts[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(scores.detach(), items, rtol=1e-5, atol=1e-5)

    y = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loaded(y, prompts)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    low.sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert (low - scores.detach()).abs().max() < 0.1 * max(1.0, scores.abs().max().item())


def test_offline_errors(checkpoint, tmp_path):
    _, directory, _ = checkpoint
    expected = r"THUDM/ImageReward.*weights=\{'model': 'MODEL_DIR/ImageReward\.pt', 'tokenizer': 'TOKENIZER_DIR/vocab"
    with pytest.raises(MissingWeightsError, match=expected):  # both files, though only the first was looked for
        get_reward("imagereward")
    # Trained weights need the reference vocabulary: not cached, offline, it names what to download.
    with pytest.raises(MissingWeightsError, match=r"'vocab\.txt' of hub repo 'bert-base-uncased'.*'tokenizer'"):
        get_reward("imagereward", pretrained=False, tiny=True, weights={"model": directory / "ImageReward.pt"})
    with pytest.raises(MissingWeightsError, match=r"no vocab\.txt in"):
        get_reward("imagereward", pretrained=False, tiny=True, weights={"tokenizer": tmp_path})
    with pytest.raises(WeightsMismatchError, match=r"not a WordPiece vocabulary"):
        get_reward("imagereward", pretrained=False, tiny=True, weights={"tokenizer": directory / "ImageReward.pt"})
    with pytest.raises(ValueError, match="tiny=True has no pretrained weights"):
        get_reward("imagereward", tiny=True)


def test_random_weights_need_no_download():
    reward = get_reward("imagereward", pretrained=False, tiny=True)
    assert reward.prompt_processor.tokenizer.token_to_id("[CLS]") == 2
    with torch.no_grad():
        scores = reward(torch.rand(2, 3, 64, 64), PROMPTS)
    assert scores.shape == (2,) and torch.isfinite(scores).all()


@pytest.mark.slow
def test_real_geometry_matches_the_reference_layout():
    """ViT-L/16 (24 x 1024, 16 heads) + BERT-base (12 x 768, 12 heads) cross-attending to 1024, on the meta device."""
    with torch.device("meta"):
        reward = get_reward("imagereward", pretrained=False)
        timm_vit = VisionTransformer(
            img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, num_classes=0, global_pool=""
        )
    ours = {to_reference_key(k): tuple(v.shape) for k, v in reward.state_dict().items()}
    reference = {k: tuple(s) for k, s in reference_shapes(**REAL).items() if k not in IGNORED_REFERENCE_KEYS}
    assert ours == reference
    assert {f"blip.visual_encoder.{k}": tuple(v.shape) for k, v in timm_vit.state_dict().items()} == {
        k: s for k, s in reference.items() if k.startswith("blip.visual_encoder.")
    }
    count = sum(p.numel() for p in reward.parameters())
    assert count == sum(math.prod(s) for s in reference.values()) == 446_206_689
    vision, text = reward.vision.config, reward.text.config
    assert (vision.num_attention_heads, vision.layer_norm_eps, vision.hidden_act) == (16, 1e-6, "gelu")
    assert (text.num_attention_heads, text.encoder_hidden_size, text.layer_norm_eps) == (12, 1024, 1e-12)
