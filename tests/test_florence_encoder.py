"""florence_encoder.py against transformers' Florence2ForConditionalGeneration and image processor.

Every checkpoint here is a random transformers model (weights moved away from their init) written with
save_pretrained; our code loads it from disk. Reference attention is transformers' eager path.
Parity: max abs difference <= 1e-4 in fp32; each parity test has a negative control (one perturbed weight
or one swapped key pushes the same comparison past the tolerance)."""
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessorPil, Florence2Config, Florence2ForConditionalGeneration

import checkpoint as ckpt
from davit import DaViTConfig
from florence_encoder import (FlorenceConfig, FlorenceVision, TASK_PROMPTS, florence_tokenizer, preprocess,
                              prompt_ids, to_original_state_dict, tokenize_prompts)
from helpers import florence2_hf_config, randomize_

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "florence2"
IMAGE_TOKEN = 51289          # transformers' placeholder id; the vocab gets one extra row for it
VOCAB = 51290


# ----------------------------------------------------------------------------------------------
# Random transformers checkpoints

def hf_config(cfg: FlorenceConfig, decoder_layers=1) -> Florence2Config:
    return florence2_hf_config(cfg, VOCAB, IMAGE_TOKEN, decoder_layers)


ODD = FlorenceConfig(   # heads 3 and 6, a first grid 16x24 that window 5 does not divide, last grid 2x3
    DaViTConfig(dims=(24, 48, 72, 96), heads=(3, 6, 3, 6), groups=(2, 3, 6, 3), depths=(1, 2, 1, 1), window=5),
    d_model=48, encoder_layers=2, encoder_heads=3, encoder_ffn_dim=80, max_position_embeddings=64, image_size=64)
CASES = {"tiny": (FlorenceConfig.from_name("tiny"), (2, 3, 64, 64)), "odd": (ODD, (2, 3, 64, 96))}
_built = {}


def build_case(name, root: Path, cfg=None, shape=None, decoder_layers=1):
    """A random transformers Florence-2 saved with save_pretrained under root/name: (folder, model, pixels, cfg)."""
    if name not in _built:
        cfg, shape = (cfg, shape) if cfg is not None else CASES[name]
        torch.manual_seed(0)
        model = Florence2ForConditionalGeneration._from_config(hf_config(cfg, decoder_layers),
                                                               attn_implementation="eager").eval()
        randomize_(model)
        folder = root / name
        model.save_pretrained(folder)
        _built[name] = (folder, model, torch.randn(shape), cfg)
    return _built[name]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    return build_case(request.param, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_case("tiny", tmp_path_factory.getbasetemp())


# ----------------------------------------------------------------------------------------------
# The transformers side of each comparison

def hf_encode(model, pixels, ids, mask=None):
    """Florence-2's encoder output for [image tokens ++ ids]: placeholders replaced by the image features."""
    B, N = pixels.shape[0], model.get_image_features(pixels).pooler_output.shape[1]
    input_ids = torch.cat([torch.full((B, N), IMAGE_TOKEN), ids], 1)
    attention_mask = None if mask is None else torch.cat([torch.ones(B, N, dtype=torch.long), mask], 1)
    return model.model(input_ids=input_ids, pixel_values=pixels, attention_mask=attention_mask).encoder_last_hidden_state


@torch.no_grad()
def reference(model, pixels):
    """name -> expected tensor, for V, encode (unmasked / masked) and the multi-prompt features."""
    B = pixels.shape[0]
    V = model.get_image_features(pixels).pooler_output
    N, ids = V.shape[1], prompt_ids()
    out = {"V": V, "encode": hf_encode(model, pixels, ids[:B]),
           "encode masked": hf_encode(model, pixels, ids[:B], (ids[:B] != 1).long())}
    for k in range(3):
        row = ids[k:k + 1].expand(B, -1)
        out[f"V'_{k + 1}"] = hf_encode(model, pixels, row)[:, :N]                       # pads attended
        out[f"V'_{k + 1} masked"] = hf_encode(model, pixels, row, (row != 1).long())[:, :N]
    return out


@torch.no_grad()
def ours_outputs(ours, pixels):
    B, ids = pixels.shape[0], prompt_ids()
    feats, feats_masked = ours.multi_prompt_features(pixels), ours.multi_prompt_features(pixels, masked=True)
    assert torch.equal(feats[0], feats_masked[0])
    out = {"V": ours.image_features(pixels), "encode": ours.encode(pixels, ids[:B]),
           "encode masked": ours.encode(pixels, ids[:B], (ids[:B] != 1).long())}
    for k in range(3):
        out[f"V'_{k + 1}"], out[f"V'_{k + 1} masked"] = feats[k + 1], feats_masked[k + 1]
    assert torch.equal(feats[0], out["V"])
    return out


def diffs(got: dict, expected: dict) -> dict:
    assert got.keys() == expected.keys()
    for k in got:
        assert got[k].shape == expected[k].shape, k
    return {k: (got[k] - expected[k]).abs().max().item() for k in got}


def assert_parity(ours, model, pixels, label):
    expected = reference(model, pixels)
    d = diffs(ours_outputs(ours, pixels), expected)
    print(f"\n{label}: " + ", ".join(f"{k} {v:.1e}" for k, v in d.items()))
    assert max(d.values()) <= TOL, d
    return expected


# ----------------------------------------------------------------------------------------------
# Parity with transformers

def test_parity_with_transformers(case):
    folder, model, pixels, cfg = case
    ours = FlorenceVision.from_pretrained(folder)
    assert ours.cfg == replace(cfg, vocab_size=VOCAB, image_size=768)   # config.json read back
    expected = assert_parity(ours, model, pixels, f"{folder.name} (native names)")
    N = expected["V"].shape[1]
    assert expected["encode"].shape == (pixels.shape[0], N + 14, cfg.d_model)

    # negative controls: a DaViT weight moves every output; an encoder weight moves all but V
    with torch.no_grad():
        ours.encoder.layers[0].fc1.weight[0, 0] += 0.1
    d = diffs(ours_outputs(ours, pixels), expected)
    assert d.pop("V") <= TOL and min(d.values()) > TOL, d
    with torch.no_grad():
        ours.vision_tower.blocks[-1][-1].channel_block.channel_attn.proj.weight[0, 0] += 0.1
    assert min(diffs(ours_outputs(ours, pixels), expected).values()) > TOL


def test_parity_in_float64_is_exact_up_to_rounding(case):
    """The fp32 differences above are rounding: in float64 the same comparisons agree to ~1e-14."""
    folder, model, pixels, _ = case
    ours = FlorenceVision.from_pretrained(folder, dtype=torch.float64)
    model64 = copy.deepcopy(model).double()
    d = diffs(ours_outputs(ours, pixels.double()), reference(model64, pixels.double()))
    print(f"\n{folder.name} float64: max abs diff {max(d.values()):.1e}")
    assert max(d.values()) <= 1e-10


def test_multi_prompt_features_one_davit_pass_and_subsets(tiny, monkeypatch):
    folder, model, pixels, _ = tiny
    ours = FlorenceVision.from_pretrained(folder)
    calls = []
    forward = ours.vision_tower.forward
    monkeypatch.setattr(ours.vision_tower, "forward", lambda x: calls.append(x.shape) or forward(x))
    with torch.no_grad():
        V, *rest = ours.multi_prompt_features(pixels)
        assert calls == [pixels.shape] and len(rest) == 3
        # a subset of prompts (for fusion ablations) gives the same features as in the full batch
        V2, only_ocr = ours.multi_prompt_features(pixels, prompt_ids=prompt_ids()[1:2])
    assert torch.allclose(only_ocr, rest[1], atol=1e-6) and torch.equal(V, V2)
    assert V.shape[1] == 1 + 2 * 2 and ours.num_image_tokens == 577   # cfg.image_size is 768 after loading
    assert FlorenceVision(FlorenceConfig.from_name("tiny")).num_image_tokens == 5


# ----------------------------------------------------------------------------------------------
# Microsoft's original names: written here from the facts table, independently of florence_encoder.py

def native_to_original(sd: dict) -> dict:
    out = {"language_model.final_logits_bias": torch.zeros(1, VOCAB)}
    for k, v in sd.items():
        if k.startswith("model.vision_tower."):
            k = "vision_tower." + k[len("model.vision_tower."):]
            k = re.sub(r"convs\.(\d+)\.conv\.", r"convs.\1.proj.", k)
            k = re.sub(r"\.(conv[12])\.(weight|bias)$", r".\1.fn.dw.\2", k)
            k = k.replace("spatial_block.norm1.", "spatial_block.window_attn.norm.")
            k = k.replace("channel_block.norm1.", "channel_block.channel_attn.norm.")
            k = re.sub(r"(window_attn|channel_attn)\.(qkv|proj)\.", r"\1.fn.\2.", k)
            k = k.replace("_block.norm2.", "_block.ffn.norm.")
            k = re.sub(r"ffn\.(fc[12])\.", r"ffn.fn.net.\1.", k)
        elif k == "model.multi_modal_projector.image_projection.weight":
            k, v = "image_projection", v.t().contiguous()       # (in, out), used as x @ W
        elif k.startswith("model.multi_modal_projector."):
            k = k[len("model.multi_modal_projector."):].replace("image_position_embed.", "image_pos_embed.")
        elif k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model."):]
        out[k] = v
    return out


def original_config(native: dict) -> dict:
    v = native["vision_config"]
    vision = {"model_type": "davit", "dim_embed": v["embed_dim"], "image_pos_embed": {
        "type": "learned_abs_2d", "max_pos_embeddings": v["max_position_embeddings"]}, "visual_temporal_embedding": {
        "type": "COSINE", "max_temporal_embeddings": v["max_temporal_embeddings"]}}
    for key in ("num_heads", "num_groups", "depths", "window_size", "patch_size", "patch_stride", "patch_padding",
                "patch_prenorm", "drop_path_rate", "projection_dim"):
        vision[key] = v[key]
    return {"model_type": "florence2", "projection_dim": v["projection_dim"], "vocab_size": VOCAB,
            "text_config": native["text_config"], "vision_config": vision}


def write_original(folder: Path, native_folder: Path, sd: dict, pickle: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    native_cfg = json.loads((native_folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(original_config(native_cfg)))
    if pickle:
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")


def test_original_names_load_and_match(case, tmp_path):
    folder, model, pixels, cfg = case
    sd = native_to_original(load_file(folder / "model.safetensors"))
    assert sum(k.startswith("language_model.model.decoder.") for k in sd) > 0   # present, and skipped
    write_original(tmp_path / "st", folder, sd)
    # the .bin as Microsoft ships it, with the tied copy of `shared` in the encoder
    sd_bin = dict(sd, **{"language_model.model.encoder.embed_tokens.weight": sd["language_model.model.shared.weight"]})
    write_original(tmp_path / "bin", folder, sd_bin, pickle=True)
    for sub in ("st", "bin"):
        ours = FlorenceVision.from_pretrained(tmp_path / sub)
        assert ours.cfg == replace(cfg, vocab_size=VOCAB, image_size=768)
        expected = assert_parity(ours, model, pixels, f"{folder.name} (original names, {sub})")

    # our writer gives the same tensors under the same names (minus the decoder and its bias)
    mine = to_original_state_dict(ours.state_dict(), ours.cfg)
    theirs = {k: v for k, v in sd.items() if not k.startswith(("language_model.model.decoder.", "language_model.f"))}
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    # negative control: a swapped pair of same-shaped keys loads without complaint but breaks parity
    swapped = dict(sd)
    a, b = "image_pos_embed.row_embeddings.weight", "image_pos_embed.column_embeddings.weight"
    swapped[a], swapped[b] = sd[b], sd[a]
    write_original(tmp_path / "swapped", folder, swapped)
    bad = FlorenceVision.from_pretrained(tmp_path / "swapped")
    assert min(diffs(ours_outputs(bad, pixels), expected).values()) > TOL


# ----------------------------------------------------------------------------------------------
# Strict loading

def test_strict_loading_names_the_bad_keys(tiny):
    folder, _, _, _ = tiny
    sd = load_file(folder / "model.safetensors")
    cfg = FlorenceVision.from_pretrained(folder).cfg
    name = "model.vision_tower.blocks.1.0.channel_block.norm1.weight"

    missing = {k: v for k, v in sd.items() if k != name}
    with pytest.raises(ckpt.CheckpointError, match=r"missing \(1\): vision_tower\.blocks\.1\.0\.channel_block\.norm1"):
        FlorenceVision.from_state_dict(cfg, missing)

    extra = dict(sd, **{"model.multi_modal_projector.extra.weight": torch.zeros(3)})
    with pytest.raises(ckpt.CheckpointError, match=r"unexpected \(1\): model\.multi_modal_projector\.extra\.weight"):
        FlorenceVision.from_state_dict(cfg, extra)

    misshaped = dict(sd, **{name: torch.ones(7)})
    with pytest.raises(ckpt.CheckpointError, match=r"wrong shape: vision_tower\.blocks\.1\.0\.channel_block\.norm1"):
        FlorenceVision.from_state_dict(cfg, misshaped)

    # a checkpoint with only the encoder's tied copy of the token embedding: tied back
    tied = {k: v for k, v in sd.items() if k != "model.language_model.shared.weight"}
    tied["model.language_model.encoder.embed_tokens.weight"] = sd["model.language_model.shared.weight"]
    assert torch.equal(FlorenceVision.from_state_dict(cfg, tied).encoder.embed_tokens.weight,
                       sd["model.language_model.shared.weight"])


def test_hub_id_resolves_from_offline_cache(tiny, tmp_path):
    """A repo id found in HF_HUB_CACHE loads with HF_HUB_OFFLINE=1 (fresh process: the hub reads its env at import)."""
    folder, _, _, _ = tiny
    snapshot = tmp_path / "hub" / "models--someone--florence-tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(folder / f, snapshot / f)
    (tmp_path / "hub" / "models--someone--florence-tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--florence-tiny" / "refs" / "main").write_text("0" * 40)
    script = (f"import checkpoint, florence_encoder as fe\n"
              f"m = fe.FlorenceVision.from_pretrained('someone/florence-tiny')\n"
              f"checkpoint.save_safetensors(m.state_dict(), {str(tmp_path / 'out.safetensors')!r})\n"
              f"try:\n    fe.FlorenceVision.from_pretrained('someone/not-cached')\n"
              f"except checkpoint.CheckpointError:\n    print('not cached: CheckpointError')\n")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "not cached: CheckpointError" in run.stdout
    loaded, local = load_file(tmp_path / "out.safetensors"), FlorenceVision.from_pretrained(folder).state_dict()
    assert loaded.keys() == local.keys() and all(torch.equal(loaded[k], local[k]) for k in local)


def test_configs_from_both_spellings():
    large = FlorenceConfig.from_hf_config(json.loads((REPO / "assets" / "florence2" / "config.json").read_text()))
    expected = FlorenceConfig.from_name("large")
    assert large.vision == expected.vision and large.d_model == 1024 and large.encoder_layers == 12
    assert large.encoder_heads == 16 and large.encoder_ffn_dim == 4096 and large.vocab_size == 51289
    assert (large.image_pos_embed_size, large.temporal_embed_size, large.max_position_embeddings) == (50, 100, 4096)
    base = FlorenceConfig.from_name("base")
    assert (base.vision.dims[-1], base.d_model, base.encoder_layers, base.encoder_heads) == (1024, 768, 6, 12)


# ----------------------------------------------------------------------------------------------
# Preprocessing against transformers' Florence-2 image processor (CLIPImageProcessor, PIL backend: the
# one the original Florence-2 used, and the one transformers picks when torchvision is absent)

def reference_pixels(images, pad, resample=Image.Resampling.BICUBIC, fill=None):
    processor = CLIPImageProcessorPil.from_pretrained(SHARED)
    assert processor.size == {"height": 768, "width": 768} and processor.resample == 3   # bicubic, 768x768
    fill = fill or tuple(int(m * 255) for m in processor.image_mean)
    # Florence-2's processor config has do_convert_rgb: null, so it takes RGB only; Florence-VL's data loader
    # opens images with PIL's .convert("RGB") first
    images = [im.convert("RGB") for im in images]
    if pad:   # LLaVA's expand2square, done here on the reference side (transformers has no pad-to-square)
        padded = []
        for im in images:
            side = max(im.size)
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
            padded.append(canvas)
        images = padded
    return processor(images=images, return_tensors="pt", resample=resample)["pixel_values"]


def test_preprocess_matches_transformers_processor():
    photo = Image.open(SHARED / "image.png")                        # 1000x667, landscape
    rng = np.random.default_rng(0)
    cases = {"photo": photo, "photo portrait": photo.transpose(Image.Transpose.ROTATE_90).crop((0, 0, 667, 901)),
             "rgba": Image.fromarray(rng.integers(0, 256, (50, 90, 4), dtype=np.uint8), "RGBA"),
             "gray": Image.fromarray(rng.integers(0, 256, (41, 23), dtype=np.uint8), "L")}
    for pad in (False, True):
        for name, image in cases.items():
            d = (preprocess(image, pad_to_square=pad) - reference_pixels([image], pad)).abs().max().item()
            print(f"preprocess {name} {image.size} pad={pad}: max abs diff {d:.1e}")
            assert d <= 1e-6
        batch = preprocess(list(cases.values()), pad_to_square=pad)
        assert batch.shape == (4, 3, 768, 768) and batch.dtype == torch.float32
        assert (batch - reference_pixels(list(cases.values()), pad)).abs().max() <= 1e-6
    assert torch.equal(preprocess(SHARED / "image.png"), preprocess(photo))   # paths work too

    # negative controls: another resize filter, another pad colour
    assert (preprocess(photo) - reference_pixels([photo], False, Image.Resampling.BILINEAR)).abs().max() > TOL
    assert (preprocess(photo, True) - reference_pixels([photo], True, fill=(0, 0, 0))).abs().max() > TOL


# ----------------------------------------------------------------------------------------------
# Tokenizer and prompts

def test_prompt_ids_are_florence_vl_ids():
    facts = [  # ../shared/reference/florence-vl-facts.md, section 1
        [0, 47066, 21700, 11, 4617, 99, 16, 2343, 11, 5, 2274, 4, 2, 1],
        [0, 2264, 16, 5, 2788, 11, 5, 2274, 116, 2, 1, 1, 1, 1],
        [0, 574, 22486, 5, 8720, 11, 5, 2274, 6, 19, 49, 24173, 4, 2],
    ]
    ids = prompt_ids()
    assert ids.dtype == torch.long and ids.tolist() == facts
    assert florence_tokenizer().decode(ids[1].tolist()) == TASK_PROMPTS[1]
    assert tokenize_prompts(TASK_PROMPTS[1:2]).shape == (1, 10)


# ----------------------------------------------------------------------------------------------
# The real `base` shape

@torch.no_grad()
def reference_from_features(model, pixels):
    """V and the three V'_k (pads attended) with one DaViT pass: transformers' own placeholder merge
    (get_placeholder_mask + masked_scatter) and encoder, all prompts in one batch."""
    V = model.get_image_features(pixels).pooler_output            # (1, N, D)
    N, ids = V.shape[1], prompt_ids()
    input_ids = torch.cat([torch.full((3, N), IMAGE_TOKEN), ids], 1)
    embeds = model.get_input_embeddings()(input_ids)
    features = V.expand(3, -1, -1)
    embeds = embeds.masked_scatter(model.model.get_placeholder_mask(input_ids, embeds, features), features)
    out = model.model.language_model.encoder(inputs_embeds=embeds).last_hidden_state[:, :N]
    return {"V": V, **{f"V'_{k + 1}": out[k:k + 1] for k in range(3)}}


def test_base_shape_768(tmp_path_factory):
    """Florence-2-base sizes (DaViT 128..1024, 6 encoder layers of width 768) at 768x768, batch 1.
    The slowest test (a DaViT-base pass at 768 takes ~5 s on one busy core): 3 passes in all."""
    t0 = time.time()
    cfg = FlorenceConfig.from_name("base")
    folder, model, pixels, _ = build_case("base", tmp_path_factory.getbasetemp(), cfg, (1, 3, 768, 768))
    ours = FlorenceVision.from_pretrained(folder)
    assert ours.num_image_tokens == 577
    expected = reference_from_features(model, pixels)
    with torch.no_grad():
        got = ours.multi_prompt_features(pixels)
    d = diffs(dict(zip(expected, got)), expected)
    print("\nbase 768: " + ", ".join(f"{k} {v:.1e}" for k, v in d.items()) + f" ({time.time() - t0:.0f} s)")
    assert expected["V"].shape == (1, 577, 768) and max(d.values()) <= TOL

    # negative control: one weight of the last DaViT block
    with torch.no_grad():
        ours.vision_tower.blocks[-1][-1].channel_block.ffn.fc2.weight[0, 0] += 0.1
        control = (ours.image_features(pixels) - expected["V"]).abs().max().item()
    print(f"base 768 control: {control:.1e}")
    assert control > TOL
    _built.pop("base")
    shutil.rmtree(folder)


def test_demo_runs():
    run = subprocess.run([sys.executable, "florence_encoder.py", "--image", str(SHARED / "image.png")], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr
    assert "V     (1, 5, 32)" in run.stdout and "V'_3  (1, 5, 32)" in run.stdout
