"""analyze.py: the PCA pictures (Figure 3) and the alignment probe (Section 4) on a tiny random model.

The PCA picture is checked pixel by pixel against numpy's SVD of the same features; the probe's
losses on a short run must be finite, decrease, and come one per feature set."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import analyze  # noqa: E402
from florence_encoder import preprocess  # noqa: E402
from fusion import FlorenceVL, FlorenceVLConfig  # noqa: E402
from synthetic import synthetic_tokenizer  # noqa: E402

IMAGE_SIZE = 128  # the tiny tower's last grid is 4x4 at 128 px: 16 grid tokens + the mean token


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Florence-VL (synthetic tokenizer) saved in the official layout, and a photo-like image."""
    root = tmp_path_factory.mktemp("analyze")
    torch.manual_seed(0)
    cfg = FlorenceVLConfig.from_name("tiny")
    cfg.vision.image_size = IMAGE_SIZE
    FlorenceVL(cfg, synthetic_tokenizer()).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8)).save(root / "image.png")
    return root / "model", root / "image.png"


def scaled_components(tokens: np.ndarray, k: int = 4) -> np.ndarray:
    """Reference: numpy's SVD of the centred tokens, the first k projections min-max scaled to 0..255."""
    x = tokens.astype(np.float64) - tokens.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:k].T
    return (proj - proj.min(0)) / (proj.max(0) - proj.min(0)) * 255  # (N, k)


def matches_up_to_sign(channel: np.ndarray, reference: np.ndarray) -> bool:
    """A component's sign is arbitrary: flipping it turns v into 255 - v after min-max scaling."""
    return bool(np.abs(channel - reference).max() <= 1 or np.abs(channel - (255 - reference)).max() <= 1)


def test_pca_picture_size_and_channels_are_the_top_components(tiny, tmp_path):
    folder, image = tiny
    out = tmp_path / "pca.png"
    analyze.main(["pca", "--model", str(folder), "--image", str(image), "--out", str(out)])
    picture = np.asarray(Image.open(out).convert("RGB"))
    grid, tile = 4, 256  # 256 is a multiple of 4: every token a 64x64 square
    assert picture.shape == (24 + tile + 8, 8 + 5 * (tile + 8), 3)  # image + V + 3 prompts, labelled band on top

    model = FlorenceVL.from_pretrained(folder)
    with torch.no_grad():
        features = model.vision.multi_prompt_features(preprocess(image, pad_to_square=True, size=IMAGE_SIZE),
                                                      prompt_ids=model.prompt_ids)
    assert len(features) == 4
    centres = (np.arange(grid) + 0.5) * tile / grid
    for i, f in enumerate(features):
        tokens = f[0, 1:].numpy()                                      # (16, D): the grid, mean token dropped
        reference = scaled_components(tokens)
        x0, y0 = analyze.tile_origin(i + 1, tile)
        pixels = picture[(y0 + centres).astype(int)][:, (x0 + centres).astype(int)].reshape(-1, 3).astype(float)
        for c in range(3):
            assert matches_up_to_sign(pixels[:, c], reference[:, c]), f"set {i} channel {c}"
        # negative control: a channel is not some other component (the order matters)
        assert not matches_up_to_sign(pixels[:, 0], reference[:, 1])
        assert not matches_up_to_sign(pixels[:, 2], reference[:, 3])


def test_pca_rgb_fixes_signs_and_leaves_missing_components_black():
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(36, 20))
    rgb = analyze.pca_rgb(tokens)
    assert rgb.shape == (36, 3) and rgb.dtype == np.uint8
    assert (rgb.min(0) == 0).all() and (rgb.max(0) == 255).all()   # each component spans 0..255
    perm = rng.permutation(36)  # the same features in another order and shifted: the same colours per token
    assert (analyze.pca_rgb(tokens[perm] + 5.0) == rgb[perm]).all()
    flipped = analyze.pca_rgb(-tokens).astype(int)  # negated features: the loadings agree, the projections flip
    assert np.abs(flipped - (255 - rgb.astype(int))).max() <= 1
    rank_one = np.outer(rng.normal(size=10), rng.normal(size=8)) + 3
    rgb = analyze.pca_rgb(rank_one)
    assert (rgb[:, 1:] == 0).all() and rgb[:, 0].max() == 255       # no rounding noise blown up to full range
    with pytest.raises(ValueError, match="square"):
        analyze.grid_tokens(torch.zeros(1 + 12, 4))


def test_alignment_probe_tiny_run(tiny, tmp_path):
    folder, _ = tiny
    out = tmp_path / "align.png"
    report = analyze.main(["align", "--model", str(folder), "--n-train", "48", "--n-heldout", "16", "--steps", "12",
                           "--batch-size", "8", "--eval-every", "4", "--lr", "1e-2", "--out", str(out)])
    names = list(report["sets"])
    assert names[:4] == ["V", "caption", "OCR", "region"] and names[4].startswith("fused") and len(names) == 5
    dims = [report["sets"][n]["in_dim"] for n in names]
    assert dims == [32, 32, 32, 32, 128]  # the fused set is the channel concatenation of the four
    for name, r in report["sets"].items():
        steps, losses = zip(*r["heldout"])
        assert steps == (0, 4, 8, 12)
        assert all(math.isfinite(v) for v in losses) and math.isfinite(r["train_loss"])
        assert all(a > b for a, b in zip(losses, losses[1:])), f"{name}: held-out loss not decreasing: {losses}"
    assert all(math.isfinite(v) for v in report["references"].values())
    assert Image.open(out).size == (720, 420)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["sets"]["V"]["final"] == pytest.approx(report["sets"]["V"]["final"])


def test_probe_reads_captions_from_a_llava_file(tiny, tmp_path):
    folder, _ = tiny
    records = []
    for i in range(5):
        Image.new("RGB", (40, 30), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
        records.append({"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                                {"from": "gpt", "value": f"caption {i}"}]})
    records[4] = {"image": "4.png", "caption": "caption 4"}  # the short form
    (tmp_path / "captions.json").write_text(json.dumps(records))
    args = analyze.parse_args(["align", "--model", str(folder), "--data", str(tmp_path / "captions.json"),
                               "--n-train", "4", "--n-heldout", "1"])
    model = FlorenceVL.from_pretrained(folder)
    train, held = analyze.caption_records(args, model)
    assert [c for _, c in train] == [f"caption {i}" for i in range(4)] and [c for _, c in held] == ["caption 4"]
    pairs, tokens = analyze.tokenize_captions(model, held, 2048)
    ids, labels = tokens[0]
    assert ids.count(-200) == 1 and model.tokenizer.decode([t for t in labels if t != -100]) == "caption 4\n"


def test_pca_of_a_plain_florence2_checkpoint(tmp_path):
    """--model may be a Florence-2 checkpoint (original layout, its input size in preprocessor_config.json)."""
    from checkpoint import save_safetensors
    from florence_encoder import to_original_state_dict
    from fusion import florence_config_json, preprocessor_config_json
    torch.manual_seed(1)
    cfg = FlorenceVLConfig.from_name("tiny").vision
    cfg.image_size = IMAGE_SIZE
    tower = FlorenceVL(FlorenceVLConfig(vision=cfg, llm=FlorenceVLConfig.from_name("tiny").llm)).vision
    (tmp_path / "config.json").write_text(json.dumps(florence_config_json(cfg)))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config_json(cfg)))
    save_safetensors(to_original_state_dict(tower.state_dict(), tower.cfg), tmp_path / "model.safetensors")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "red.png")
    analyze.main(["pca", "--model", str(tmp_path), "--image", str(tmp_path / "red.png"), "--out",
                  str(tmp_path / "pca.png"), "--tile", "64"])
    assert Image.open(tmp_path / "pca.png").size == (8 + 5 * (64 + 8), 24 + 64 + 8)
