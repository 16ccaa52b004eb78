"""fusion.py: the whole Florence-VL model against a reference assembled from transformers parts.

The reference is written here, in the open, from the paper and the official code's data flow:
  transformers Florence2ForConditionalGeneration -> V (its image features) and V'_k (its encoder run on
      [image features ++ prompt k], the three task prompts as one batch of 3, pad id 1, no attention mask)
  channel concat [V, V'_1, V'_2, V'_3] -> Linear-GELU-Linear-GELU-Linear (plain F.linear, same weights)
  the projected visual tokens spliced in place of the -200 placeholder, right padding, attention mask
  -> transformers LlamaForCausalLM / Phi3ForCausalLM(inputs_embeds=...)
Our side is a Florence-VL checkpoint in the official LLaVA layout: FlorenceVL.from_parts(florence, llm),
save_pretrained, then FlorenceVL.from_pretrained of that folder. Every checkpoint is a tiny random
transformers model (weights moved away from their init) written with save_pretrained.
Parity: max abs difference <= 1e-4 in fp32 on logits and loss; each parity test has a negative control.
"""
import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (Florence2Config, Florence2ForConditionalGeneration, LlamaConfig, LlamaForCausalLM,
                          Phi3Config, Phi3ForCausalLM)

REPO = Path(__file__).resolve().parents[1]
from checkpoint import CheckpointError  # noqa: E402
from data import tokenize_prompt  # noqa: E402
from florence_encoder import preprocess  # noqa: E402
from fusion import IGNORE_INDEX, IMAGE_TOKEN_INDEX, DBFusion, FlorenceVL, FlorenceVLConfig  # noqa: E402
from synthetic import synthetic_tokenizer  # noqa: E402
from helpers import random_hf_model, randomize_, reference_splice

TOL = 1e-4
FLORENCE_VOCAB = 51290          # Florence-2's 51289 + transformers' image placeholder
FLORENCE_IMAGE_TOKEN = 51289
LLM_VOCAB = 400                 # >= the synthetic tokenizer's 398 ids (sample.py needs a tokenizer)
IMAGE_SIZE = 80                 # DaViT grids 20, 10, 5, 3 (window 3 pads the first three): N = 1 + 3*3
N_VISUAL = 10
# The three task prompts as the Florence-2 tokenizer gives them, padded to 14 with <pad> = 1
# (facts file, section 1): written out here, not taken from florence_encoder.prompt_ids.
PROMPT_IDS = torch.tensor([
    [0, 47066, 21700, 11, 4617, 99, 16, 2343, 11, 5, 2274, 4, 2, 1],      # detailed caption
    [0, 2264, 16, 5, 2788, 11, 5, 2274, 116, 2, 1, 1, 1, 1],              # OCR
    [0, 574, 22486, 5, 8720, 11, 5, 2274, 6, 19, 49, 24173, 4, 2],        # dense region caption
])


# ----------------------------------------------------------------------------------------------
# Tiny random transformers checkpoints

def florence_hf_config() -> Florence2Config:
    vision = dict(embed_dim=[16, 32, 48, 64], num_heads=[1, 2, 3, 4], num_groups=[2, 2, 3, 4], depths=[1, 1, 2, 1],
                  window_size=3, patch_size=[7, 3, 3, 3], patch_stride=[4, 2, 2, 2], patch_padding=[3, 1, 1, 1],
                  patch_prenorm=[False, True, True, True], drop_path_rate=0.0, projection_dim=48,
                  max_position_embeddings=50, max_temporal_embeddings=100)
    text = dict(model_type="bart", vocab_size=FLORENCE_VOCAB, d_model=48, encoder_layers=2, encoder_attention_heads=3,
                encoder_ffn_dim=80, decoder_layers=1, decoder_attention_heads=3, decoder_ffn_dim=80,
                max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return Florence2Config(vision_config=vision, text_config=text, image_token_id=FLORENCE_IMAGE_TOKEN)


def llm_hf_model(family: str):
    """A transformers LLM with weights away from init: norms ~ 1 + 0.2 N(0,1), embeddings N(0,1), matrices
    N(0, 4 / fan_in), so that logits are peaked and greedy decoding keeps moving."""
    if family == "llama":  # 9 query heads over 3 KV heads; llama3 rope with all three branches in use
        cfg = LlamaConfig(vocab_size=LLM_VOCAB, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256,
                          rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=0,
                          rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=16))
        cls = LlamaForCausalLM
    else:  # longrope with its attention factor; every sequence here stays within the original 64 positions
        g = torch.Generator().manual_seed(1)
        cfg = Phi3Config(vocab_size=LLM_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         original_max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=None,
                         pad_token_id=0,
                         rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                              short_factor=(1 + torch.rand(8, generator=g)).tolist(),
                                              long_factor=(1 + 7 * torch.rand(8, generator=g)).tolist()))
        cls = Phi3ForCausalLM
    return random_hf_model(cls, cfg)


def projector_weights(in_dim: int, hidden: int, seed: int = 2) -> dict:
    """mlp3x_gelu weights under the official names (encoder_mlp.0, then (GELU, Linear) pairs)."""
    g = torch.Generator().manual_seed(seed)
    w = {}
    for name, fan_in in (("encoder_mlp.0", in_dim), ("encoder_mlp.1.1", hidden), ("encoder_mlp.2.1", hidden)):
        w[name + ".weight"] = torch.randn(hidden, fan_in, generator=g) * 1.5 / fan_in ** 0.5
        w[name + ".bias"] = 0.1 * torch.randn(hidden, generator=g)
    return w


# ----------------------------------------------------------------------------------------------
# A batch: the image at the start, in the middle and at the end of the text, and one text-only sample

# (text tokens before the image, has an image, text tokens after, supervised positions of the raw sample)
LAYOUT = [(0, True, 12, slice(8, 13)),    # image first
          (6, True, 8, slice(11, 15)),    # image in the middle
          (14, True, 0, slice(5, 11)),    # image last: text before it supervised
          (9, False, 0, slice(6, 9))]     # no image


def text_batch():
    """Raw samples (ids with at most one -200, labels of the same length), right-padded to (B, T)."""
    g = torch.Generator().manual_seed(5)
    tok = lambda n: torch.randint(1, LLM_VOCAB, (n,), generator=g).tolist()  # noqa: E731
    samples = []
    for before, has_image, after, supervised in LAYOUT:
        ids = tok(before) + ([IMAGE_TOKEN_INDEX] if has_image else []) + tok(after)
        labels = [IGNORE_INDEX] * len(ids)
        labels[supervised] = ids[supervised]
        samples.append((ids, labels))
    T = max(len(ids) for ids, _ in samples)
    input_ids = torch.zeros(len(samples), T, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE_INDEX)
    mask = torch.zeros(len(samples), T, dtype=torch.long)
    for b, (ids, lab) in enumerate(samples):
        input_ids[b, :len(ids)], labels[b, :len(ids)], mask[b, :len(ids)] = torch.tensor(ids), torch.tensor(lab), 1
    return input_ids, mask, labels


# ----------------------------------------------------------------------------------------------
# The reference, from transformers parts

@torch.no_grad()
def reference_features(florence, pixels) -> list:
    """Per image [V, V'_1, V'_2, V'_3], each (N, D). V'_k as transformers' Florence2Model builds its encoder
    input (placeholders in input_ids replaced by the image features, then the prompt), the three prompts
    as one batch of 3, no attention mask: pads attended, as in the official Florence-VL code."""
    out = []
    for m in range(pixels.shape[0]):
        image = pixels[m:m + 1]
        V = florence.model.get_image_features(image).pooler_output[0]                       # (N, D)
        N = V.shape[0]
        ids = torch.cat([torch.full((3, N), FLORENCE_IMAGE_TOKEN), PROMPT_IDS], 1)           # (3, N + 14)
        enc = florence.model(input_ids=ids, pixel_values=image.expand(3, -1, -1, -1)).encoder_last_hidden_state
        out.append([V] + [enc[k, :N] for k in range(3)])
    return out


def reference_projector(x, w: dict):
    """Linear-GELU-Linear-GELU-Linear, written plainly."""
    x = F.linear(x, w["encoder_mlp.0.weight"], w["encoder_mlp.0.bias"])
    x = F.linear(F.gelu(x), w["encoder_mlp.1.1.weight"], w["encoder_mlp.1.1.bias"])
    return F.linear(F.gelu(x), w["encoder_mlp.2.1.weight"], w["encoder_mlp.2.1.bias"])


@torch.no_grad()
def reference_forward(llm, features, proj, batch, order=(0, 1, 2, 3)):
    """(logits (B, T', V), loss, mask (B, T'), labels (B, T')) of the reference; order: which feature
    blocks are concatenated, in which order (the negative control swaps two)."""
    input_ids, mask, labels = batch
    visual = torch.stack([reference_projector(torch.cat([f[i] for i in order], -1), proj) for f in features])
    embeds, new_mask, new_labels = reference_splice(llm.get_input_embeddings(), input_ids, mask, labels, visual)
    logits = llm(inputs_embeds=embeds, attention_mask=new_mask).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), new_labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    return logits, loss, new_mask, new_labels


# ----------------------------------------------------------------------------------------------
# Fixtures: the transformers parts, and our model loaded from a LLaVA-layout checkpoint built from them

@pytest.fixture(scope="module")
def florence(tmp_path_factory):
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration._from_config(florence_hf_config(), attn_implementation="eager").eval()
    randomize_(model)
    folder = tmp_path_factory.mktemp("florence2")
    model.save_pretrained(folder)
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    return {"folder": folder, "model": model, "pixels": pixels, "features": reference_features(model, pixels)}


_built = {}


def build(family, florence, root: Path):
    """{hf, proj, folder (the Florence-VL checkpoint), ours (loaded from it)}, once per family."""
    if family not in _built:
        hf = llm_hf_model(family)
        llm_folder = root / f"llm-{family}"
        hf.save_pretrained(llm_folder)
        synthetic_tokenizer().tok.save(str(llm_folder / "tokenizer.json"))
        parts = FlorenceVL.from_parts(florence["folder"], llm_folder)
        proj = projector_weights(4 * 48, hf.config.hidden_size)
        parts.mm_projector.load_state_dict(proj)
        folder = root / f"florence-vl-{family}"
        parts.save_pretrained(folder)
        _built[family] = {"hf": hf, "proj": proj, "folder": folder, "ours": FlorenceVL.from_pretrained(folder)}
    return _built[family]


@pytest.fixture(scope="module", params=["phi3", "llama"])
def vl(request, florence, tmp_path_factory):
    return build(request.param, florence, tmp_path_factory.getbasetemp())


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def ours_forward(ours, pixels, batch):
    input_ids, mask, labels = batch
    logits = ours(input_ids, mask, pixels).logits
    loss = ours(input_ids, mask, pixels, labels=labels).loss
    return logits, loss


# ----------------------------------------------------------------------------------------------
# 1 + 4. Parity of the whole model, and its negative controls

def test_whole_model_matches_transformers_reference(vl, florence):
    ours, hf, pixels = vl["ours"], vl["hf"], florence["pixels"]
    family = ours.cfg.llm.family
    batch = text_batch()
    ref_logits, ref_loss, ref_mask, ref_labels = reference_forward(hf, florence["features"], vl["proj"], batch)
    # the same layout: expanded lengths 22, 24, 24, 9 -> T' = 24, right-padded
    with torch.no_grad():
        _, mask, labels = ours.prepare_inputs(batch[0], batch[1], pixels, batch[2])
    assert ref_mask.sum(1).tolist() == [22, 24, 24, 9]
    assert torch.equal(mask, ref_mask) and torch.equal(labels, ref_labels)
    logits, loss = ours_forward(ours, pixels, batch)
    real = ref_mask.bool()
    d_logits, d_loss = max_diff(logits[real], ref_logits[real]), abs(loss.item() - ref_loss.item())
    print(f"\n{family}: logits max abs diff {d_logits:.2e} (|logits| up to {ref_logits[real].abs().max():.1f}), "
          f"loss {loss.item():.6f} vs {ref_loss.item():.6f}: diff {d_loss:.2e}")
    assert logits.shape == ref_logits.shape
    assert d_logits <= TOL and d_loss <= TOL

    # negative controls: the same comparison against a reference with two feature blocks swapped, and
    # against one with one projector weight moved, must fail
    swapped, _, _, _ = reference_forward(hf, florence["features"], vl["proj"], batch, order=(0, 2, 1, 3))
    proj = dict(vl["proj"])
    proj["encoder_mlp.2.1.weight"] = proj["encoder_mlp.2.1.weight"].clone()
    proj["encoder_mlp.2.1.weight"][0, 0] += 0.05
    perturbed, perturbed_loss, _, _ = reference_forward(hf, florence["features"], proj, batch)
    d_swapped, d_perturbed = max_diff(logits[real], swapped[real]), max_diff(logits[real], perturbed[real])
    print(f"{family} controls: [V, V'_2, V'_1, V'_3] {d_swapped:.2e}, projector weight +0.05 {d_perturbed:.2e}")
    assert d_swapped > TOL and d_perturbed > TOL
    # the text-only sample does not see the images: it matches either way
    assert max_diff(logits[3, :9], swapped[3, :9]) <= TOL


def test_whole_model_float64_is_exact_up_to_rounding(vl, florence):
    """The fp32 differences above are rounding (~3e-6 on the Florence-2 features, amplified by the LLM whose
    weights are scaled up). In float64 the visual tokens agree to ~1e-14, and the logits exactly: both
    LLMs take RMSNorm statistics in float32 (as transformers does), which rounds such differences away."""
    ours = FlorenceVL.from_pretrained(vl["folder"], dtype=torch.float64)
    pixels = florence["pixels"].double()
    features = reference_features(copy.deepcopy(florence["model"]).double(), pixels)
    proj = {k: v.double() for k, v in vl["proj"].items()}
    with torch.no_grad():
        visual = ours.encode_images(pixels)
    d_visual = max_diff(visual, torch.stack([reference_projector(torch.cat(f, -1), proj) for f in features]))
    batch = text_batch()
    ref_logits, ref_loss, ref_mask, _ = reference_forward(copy.deepcopy(vl["hf"]).double(), features, proj, batch)
    logits, loss = ours_forward(ours, pixels, batch)
    d = max_diff(logits[ref_mask.bool()], ref_logits[ref_mask.bool()])
    print(f"\n{ours.cfg.llm.family} float64: visual tokens max abs diff {d_visual:.1e}, logits {d:.1e}, "
          f"loss {abs(loss - ref_loss).item():.1e}")
    assert visual.dtype == logits.dtype == torch.float64 and d_visual <= 1e-10 and d <= 1e-10
    assert abs(loss - ref_loss).item() <= 1e-6  # our loss is taken in float32 whatever the model's dtype


def test_greedy_generation_matches_transformers(vl, florence):
    """16 new tokens per sample, batched with different prompt lengths; the reference is transformers'
    generate from the reference embeddings, left-padded (as transformers needs)."""
    ours, hf, pixels = vl["ours"], vl["hf"], florence["pixels"]
    input_ids, mask, labels = text_batch()
    mine = ours.generate(input_ids, mask, pixels, max_new_tokens=16, stop_ids=())
    visual = torch.stack([reference_projector(torch.cat(f, -1), vl["proj"]) for f in florence["features"]])
    with torch.no_grad():
        embeds, emb_mask, _ = reference_splice(hf.get_input_embeddings(), input_ids, mask, labels, visual)
    left, left_mask = torch.zeros_like(embeds), torch.zeros_like(emb_mask)
    T = embeds.shape[1]
    for b, n in enumerate(emb_mask.sum(1).tolist()):
        left[b, T - n:], left_mask[b, T - n:] = embeds[b, :n], 1
    theirs = hf.generate(inputs_embeds=left, attention_mask=left_mask, max_new_tokens=16, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert theirs.shape == (4, 16)  # from inputs_embeds, transformers returns the new tokens only
    theirs = theirs.tolist()
    print(f"\n{ours.cfg.llm.family} greedy: {theirs[0]}")
    assert all(len(set(row)) >= 6 for row in theirs)  # not one token repeated
    assert mine == theirs


# ----------------------------------------------------------------------------------------------
# 3. Fusion variants: shapes and token counts

@pytest.mark.parametrize("fusion,prompts", [("channel", (0, 1, 2)), ("token", (0, 1, 2)), ("average", (0, 1, 2)),
                                            ("low", (0, 1, 2)), ("channel", (0, 2)), ("token", (0, 2))])
def test_fusion_variants_shapes_and_token_counts(fusion, prompts, tmp_path):
    torch.manual_seed(0)
    model = FlorenceVL(FlorenceVLConfig.from_name("tiny", fusion=fusion, prompts=prompts)).eval()
    D, H, N = model.cfg.vision.d_model, model.cfg.llm.hidden_size, model.vision.num_image_tokens
    K = 0 if fusion == "low" else len(prompts)
    assert N == 5  # tiny: 64x64 -> 2x2 grid + the mean token
    expected_fused = {"channel": (2, N, (K + 1) * D), "token": (2, (K + 1) * N, D),
                      "average": (2, N, D), "low": (2, N, D)}[fusion]
    assert model.num_visual_tokens == expected_fused[1]
    first = model.mm_projector.encoder_mlp[0]
    assert (first.in_features, first.out_features) == (expected_fused[2], H)

    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    seen = {}
    model.fusion.register_forward_hook(lambda m, args, out: seen.update(features=args[0], fused=out))
    with torch.no_grad():
        tokens = model.encode_images(pixels)
        everything = model.vision.multi_prompt_features(pixels)  # [V, V'_1, V'_2, V'_3], all three prompts
    assert seen["fused"].shape == expected_fused and tokens.shape == (2, model.num_visual_tokens, H)
    # the fused sets are V and the chosen prompts' V'_k, in prompt order
    chosen = [everything[0]] + ([] if fusion == "low" else [everything[1 + k] for k in prompts])
    assert len(seen["features"]) == len(chosen)
    for got, want in zip(seen["features"], chosen):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    combine = {"channel": lambda f: torch.cat(f, -1), "token": lambda f: torch.cat(f, 1),
               "average": lambda f: torch.stack(f).mean(0), "low": lambda f: f[0]}[fusion]
    torch.testing.assert_close(seen["fused"], combine(chosen), atol=1e-5, rtol=0)

    # the spliced sequence: each <image> placeholder becomes num_visual_tokens positions
    ids = torch.tensor([[5, 6, IMAGE_TOKEN_INDEX, 7, 8, 9], [IMAGE_TOKEN_INDEX, 5, 6, 0, 0, 0]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        embeds, new_mask, _ = model.prepare_inputs(ids, mask, pixels)
    assert embeds.shape == (2, 5 + model.num_visual_tokens, H)
    assert new_mask.sum(1).tolist() == [5 + model.num_visual_tokens, 2 + model.num_visual_tokens]

    # an ablation checkpoint keeps its fusion and prompts (config.json's florence_vl block)
    model.save_pretrained(tmp_path)
    loaded = FlorenceVL.from_pretrained(tmp_path)
    assert (loaded.cfg.fusion, loaded.cfg.prompts) == (fusion, prompts)
    with torch.no_grad():
        assert torch.equal(loaded.encode_images(pixels), tokens)


def test_dbfusion_rejects_bad_inputs():
    with pytest.raises(ValueError, match="unknown fusion"):
        DBFusion("sum")
    with pytest.raises(ValueError, match="expects 4 feature sets"):
        DBFusion("channel", 3)([torch.zeros(1, 2, 3)] * 3)


# ----------------------------------------------------------------------------------------------
# 5. Checkpoints: official names, exact round trip

def test_save_load_round_trip_is_exact_with_official_names(vl, tmp_path):
    ours, folder = vl["ours"], vl["folder"]
    family = ours.cfg.llm.family
    saved = load_file(folder / "model.safetensors")
    assert saved["model.mm_projector.encoder_mlp.0.weight"].shape == (ours.cfg.llm.hidden_size, 4 * 48)
    assert torch.equal(saved["model.mm_projector.encoder_mlp.2.1.weight"], vl["proj"]["encoder_mlp.2.1.weight"])
    assert {k for k in saved if k.startswith("model.mm_projector.")} == {
        f"model.mm_projector.{k}" for k in vl["proj"]}
    # the tower under Microsoft's original names: image_projection a bare (in, out) matrix
    assert saved["model.vision_tower.vision_tower.image_projection"].shape == (64, 48)
    for key in ("vision_tower.blocks.0.0.spatial_block.window_attn.fn.qkv.weight",
                "vision_tower.convs.0.proj.weight", "image_pos_embed.row_embeddings.weight",
                "language_model.model.shared.weight", "language_model.model.encoder.layers.1.fc2.weight"):
        assert "model.vision_tower.vision_tower." + key in saved, key
    original = ("vision_tower.", "image_projection", "image_proj_norm.", "image_pos_embed.", "visual_temporal_embed.",
                "language_model.model.shared.", "language_model.model.encoder.")
    assert all(k.removeprefix("model.vision_tower.vision_tower.").startswith(original)
               for k in saved if k.startswith("model.vision_tower."))
    # the LLM under its Hugging Face names, exactly transformers' own tensors
    hf_sd = vl["hf"].state_dict()
    llm_keys = {k for k in saved if not k.startswith(("model.vision_tower.", "model.mm_projector."))}
    assert llm_keys == set(hf_sd)
    assert "lm_head.weight" in llm_keys and "model.layers.0.input_layernorm.weight" in llm_keys
    assert all(torch.equal(saved[k], hf_sd[k]) for k in llm_keys)

    config = json.loads((folder / "config.json").read_text())
    arch = {"phi3": "LlavaPhiForCausalLM", "llama": "LlavaLlamaForCausalLM"}[family]
    assert config["architectures"] == [arch]
    assert config["mm_projector_type"] == "mlp3x_gelu" and config["mm_hidden_size"] == 48
    tower_config = json.loads((folder / "vision_tower" / "config.json").read_text())
    assert tower_config["vision_config"]["dim_embed"] == [16, 32, 48, 64]  # Microsoft's spelling

    # save -> load -> save -> load: every tensor equal, the files too
    ours.save_pretrained(tmp_path / "a")
    again = FlorenceVL.from_pretrained(tmp_path / "a")
    again.save_pretrained(tmp_path / "b")
    third = FlorenceVL.from_pretrained(tmp_path / "b")
    for model in (again, third):
        a, b = ours.state_dict(), model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert model.cfg == ours.cfg
    files = [load_file(f / "model.safetensors") for f in (folder, tmp_path / "a", tmp_path / "b")]
    assert all(f.keys() == saved.keys() and all(torch.equal(f[k], saved[k]) for k in saved) for f in files)
    for name in ("config.json", "vision_tower/config.json", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text() == (folder / name).read_text()


def test_prompts_longer_than_tokenizer_model_max_length_are_cut_with_a_warning(vl, florence, tmp_path):
    """The official model cuts the spliced sequence to config.json's tokenizer_model_max_length, at inference too;
    so does FlorenceVL.generate, and says so. Within the limit nothing changes (and nothing is said)."""
    folder = tmp_path / "limited"
    shutil.copytree(vl["folder"], folder)
    config = json.loads((folder / "config.json").read_text())
    ours = FlorenceVL.from_pretrained(vl["folder"])
    ids, pixels = torch.tensor([[5, 6, IMAGE_TOKEN_INDEX, 7, 8, 9]]), florence["pixels"][:1]
    mask = torch.ones_like(ids)
    embeds, full_mask, _ = ours.prepare_inputs(ids, mask, pixels)
    n = int(full_mask.sum())
    config["tokenizer_model_max_length"] = n - 3
    (folder / "config.json").write_text(json.dumps(config))
    limited = FlorenceVL.from_pretrained(folder)
    assert limited.cfg.max_length == n - 3 and ours.cfg.max_length is None
    with pytest.warns(UserWarning, match=rf"a prompt of {n} tokens .* tokenizer_model_max_length {n - 3}"):
        cut = limited.generate(ids, mask, pixels, max_new_tokens=5, stop_ids=())
    from generate import generate
    assert cut == generate(ours.llm, inputs_embeds=embeds[:, :n - 3], attention_mask=full_mask[:, :n - 3],
                           max_new_tokens=5, stop_ids=())
    assert cut != ours.generate(ids, mask, pixels, max_new_tokens=5, stop_ids=())  # the cut matters here
    config["tokenizer_model_max_length"] = n
    (folder / "config.json").write_text(json.dumps(config))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert FlorenceVL.from_pretrained(folder).generate(ids, mask, pixels, max_new_tokens=5, stop_ids=()) == \
            ours.generate(ids, mask, pixels, max_new_tokens=5, stop_ids=())


# ----------------------------------------------------------------------------------------------
# 6. The tower from vision_tower/ only; a misshaped projector weight

def test_tower_from_vision_tower_folder_and_misshaped_projector(vl, florence, tmp_path):
    ours, folder, pixels = vl["ours"], vl["folder"], florence["pixels"]
    batch = text_batch()
    expected = ours_forward(ours, pixels, batch)
    saved = load_file(folder / "model.safetensors")
    tower = {k.removeprefix("model.vision_tower.vision_tower."): v for k, v in saved.items()
             if k.startswith("model.vision_tower.vision_tower.")}
    main = {k: v for k, v in saved.items() if not k.startswith("model.vision_tower.")}

    def checkpoint(name, sd):
        out = tmp_path / name
        shutil.copytree(folder, out)
        save_file(sd, out / "model.safetensors")
        return out

    # (a) the official layout without the copy in the main file: Florence-2 original names in vision_tower/
    a = checkpoint("original", main)
    save_file(tower, a / "vision_tower" / "model.safetensors")
    # (b) vision_tower/ holding a transformers-native Florence-2 folder
    b = checkpoint("native", main)
    shutil.rmtree(b / "vision_tower")
    shutil.copytree(florence["folder"], b / "vision_tower")
    for path in (a, b):
        assert "model.vision_tower.vision_tower.image_projection" not in load_file(path / "model.safetensors")
        model = FlorenceVL.from_pretrained(path)
        logits, loss = ours_forward(model, pixels, batch)
        assert torch.equal(logits, expected[0]) and torch.equal(loss, expected[1]), path.name

    # a misshaped projector weight: CheckpointError naming the key
    bad = dict(saved)
    bad["model.mm_projector.encoder_mlp.1.1.weight"] = bad["model.mm_projector.encoder_mlp.1.1.weight"][:, :-1].clone()
    c = checkpoint("misshaped", bad)
    with pytest.raises(CheckpointError, match=r"wrong shape: encoder_mlp\.1\.1\.weight"):
        FlorenceVL.from_pretrained(c)


# ----------------------------------------------------------------------------------------------
# 7. Training stages

def test_set_stage_freezes_exactly_the_tower(vl, florence, tmp_path):
    model = FlorenceVL.from_pretrained(vl["folder"])
    pixels = florence["pixels"]
    input_ids, mask, labels = text_batch()
    parts = {"vision": model.vision, "projector": model.mm_projector, "llm": model.llm}
    assert {n for n, _ in model.named_parameters()} == {f"{p}.{n}" for p in ("vision", "mm_projector", "llm")
                                                        for n, _ in getattr(model, p).named_parameters()}

    model.set_stage("finetune").train()
    assert all(not p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.mm_projector.parameters())
    assert all(p.requires_grad for p in model.llm.parameters())
    assert not model.vision.training and model.llm.training  # the frozen tower stays in eval mode
    model(input_ids, mask, pixels, labels=labels).loss.backward()
    assert all(p.grad is None for p in model.vision.parameters())
    for name in ("projector", "llm"):
        grads = [p.grad for p in parts[name].parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name

    model.zero_grad(set_to_none=True)
    model.set_stage("pretrain").train()
    assert all(p.requires_grad for p in model.parameters()) and model.vision.training
    model(input_ids, mask, pixels, labels=labels).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.vision.image_projection.weight.grad.abs().sum() > 0
    assert model.vision.vision_tower.convs[0].conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown stage"):
        model.set_stage("stage3")


# ----------------------------------------------------------------------------------------------
# 8. sample.py

@pytest.fixture(scope="module")
def sample_model(tmp_path_factory):
    """The tiny preset (64x64 images) with the synthetic tokenizer, saved and loaded back."""
    root = tmp_path_factory.mktemp("sample")
    torch.manual_seed(0)
    model = FlorenceVL(FlorenceVLConfig.from_name("tiny"), synthetic_tokenizer())
    model.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8)).save(root / "image.png")
    return root / "model", root / "image.png"


def run_sample(args, stdin=""):
    """sample.main(args) in a fresh process; its stdout. (In this process sample.answer would keep writing to
    the sys.stdout of import time: its `out=sys.stdout` default is bound once, so capsys cannot see it.)"""
    script = f"import sys; sys.path.insert(0, {str(REPO)!r}); import sample; sample.main({args!r})"
    run = subprocess.run([sys.executable, "-c", script], input=stdin, capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_sample_answers_a_prompt(sample_model):
    folder, image = sample_model
    question = "What is at the top left?"
    out = run_sample(["--model", str(folder), "--image", str(image), "--prompt", question, "--max-new-tokens", "12",
                      "--dtype", "fp32"])
    # the printed reply is what FlorenceVL.generate gives for the same prompt (ids the tokenizer has), decoded
    # and stripped as the official evaluation prints it
    model = FlorenceVL.from_pretrained(folder)
    pixels = preprocess(Image.open(image), pad_to_square=True, size=64)
    ids = tokenize_prompt([{"from": "human", "value": "<image>\n" + question}], model.tokenizer, "phi3", True)
    reply = model.generate(torch.tensor([ids]), None, pixels, max_new_tokens=12,
                           stop_ids=set(model.cfg.llm.eos_token_ids) | set(model.tokenizer.end_ids),
                           vocab_limit=model.tokenizer.vocab_size)[0]
    text = model.tokenizer.decode(reply, skip_special_tokens=True).strip()
    print(f"\nsample.py printed {out!r}")
    assert out.strip() and out == text + "\n"


def test_sample_chat_reads_questions_from_stdin(sample_model):
    folder, image = sample_model
    out = run_sample(["--model", str(folder), "--image", str(image), "--chat", "--max-new-tokens", "6"],
                     stdin="What is at the center?\nWhere is the word?\n")
    print(f"\nsample.py --chat printed {out!r}")
    assert out.count("model> ") == 2 and out.count("you> ") == 3  # two questions, then end of input
