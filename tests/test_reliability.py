"""Reliability (issue 8): bad input gets a clear answer naming the file/line/key, faults lose nothing.

Every fault is forced for real: corrupt files are written here, signals go to real training processes."""
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402
from data import DataError, load_image  # noqa: E402

PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--synthetic-size", "64", "--global-batch", "8", "--micro-batch", "4", "--eval-samples", "0",
        "--log-every", "1", "--stage", "pretrain"]


def turns(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def png_header(width, height):
    """A real PNG that declares width x height (IHDR with a valid CRC) and holds no pixels."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def write_images(root: Path) -> dict:
    """Every kind of image the issue names; returns name -> expected (size, top-left RGB) or None if broken."""
    root.mkdir(parents=True, exist_ok=True)
    ok = {}
    Image.new("RGB", (8, 6), (200, 10, 10)).save(root / "rgb.jpg", quality=95)
    ok["rgb.jpg"] = ((8, 6), None)
    Image.new("L", (5, 4), 77).save(root / "grey.png")
    ok["grey.png"] = ((5, 4), (77, 77, 77))
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.save(root / "palette.png")
    ok["palette.png"] = ((4, 4), (10, 200, 30))
    Image.new("RGBA", (4, 3), (1, 2, 3, 0)).save(root / "rgba.png")
    ok["rgba.png"] = ((4, 3), (1, 2, 3))
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=100)  # pure red in CMYK
    ok["cmyk.jpg"] = ((4, 4), None)
    Image.fromarray(np.full((3, 5), 65535 // 2, dtype=np.uint16)).save(root / "grey16.png")  # 16-bit grey, mid
    ok["grey16.png"] = ((5, 3), (127, 127, 127))  # 32767 / 257 = 127.5-
    e = Image.new("RGB", (6, 2), (0, 0, 255))
    e.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to view -> upright is 2 x 6
    e.save(root / "exif.png", exif=exif)
    ok["exif.png"] = ((2, 6), None)
    Image.new("RGB", (1, 1), (9, 9, 9)).save(root / "one.png")
    ok["one.png"] = ((1, 1), (9, 9, 9))
    # broken
    (root / "empty.png").write_bytes(b"")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, "PNG")
    (root / "truncated.png").write_bytes(good.getvalue()[:len(good.getvalue()) // 2])
    jpg = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(jpg, "JPEG")
    (root / "truncated.jpg").write_bytes(jpg.getvalue()[:300])
    (root / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    (root / "bomb.png").write_bytes(png_header(100_000, 100_000))  # 10^10 pixels declared
    broken = {"empty.png": "empty", "truncated.png": "truncated|broken|not enough", "truncated.jpg": "truncated|broken",
              "garbage.jpg": "cannot identify", "bomb.png": "decompression bomb", "missing.png": "not found"}
    return ok, broken


def test_images_valid_ones_to_rgb_broken_ones_named(tmp_path):
    ok, broken = write_images(tmp_path)
    for name, (size, pixel) in ok.items():
        im = load_image(tmp_path / name)
        assert im.mode == "RGB" and im.size == size, name
        if pixel is not None:
            assert im.getpixel((0, 0)) == pixel, name
    r, g, b = load_image(tmp_path / "cmyk.jpg").getpixel((0, 0))
    assert r > 200 and g < 40 and b < 40  # CMYK red is RGB red
    exif = load_image(tmp_path / "exif.png")  # rotated upright: the red corner moved to the top right
    assert exif.getpixel((1, 0))[0] > 200 and exif.getpixel((0, 0))[2] > 200
    for name, why in broken.items():
        with pytest.raises(DataError) as e:
            load_image(tmp_path / name)
        assert f"cannot read image {tmp_path / name}" in str(e.value), name
        assert any(w in str(e.value).lower() for w in why.split("|")), (name, str(e.value))
    # the dataset and sample.py use the same function: the message names the record and the file
    (tmp_path / "d.json").write_text(json.dumps([{"id": "a", "image": "bomb.png", "conversations": turns("<image>\nx", "y")}]))
    ds = data.LLaVADataset(tmp_path / "d.json", None, "plain", image_root=tmp_path)
    with pytest.raises(DataError, match=r"d\.json\[0\]: cannot read image .*bomb\.png: refused as a possible decomp"):
        ds.load_image(0, ds.record(0))
    import inspect
    import sample
    assert "load_image(args.image)" in inspect.getsource(sample.main)  # sample.py reads images the same way


def test_check_cli_lists_every_problem_with_its_line(tmp_path):
    ok, broken = write_images(tmp_path / "img")
    good = {"id": "ok", "image": "grey.png", "conversations": turns("<image>\nWhat?", "grey")}
    lines = [
        json.dumps(good),                                                                  # 1 fine
        '{"id": "x", "conversations": [',                                                  # 2 malformed JSON
        json.dumps({"id": "noconv"}),                                                      # 3 missing conversations
        json.dumps({"id": "role", "conversations": [{"from": "robot", "value": "hi"},
                                                    {"from": "gpt", "value": "yo"}]}),     # 4 unknown role
        json.dumps({"id": "order", "conversations": [{"from": "gpt", "value": "a"},
                                                     {"from": "human", "value": "b"}]}),   # 5 out of order
        json.dumps({"id": "empty", "conversations": turns("Hi", "  ")}),                  # 6 empty turn
        json.dumps({"id": "tok", "conversations": turns("<image>\nWhat?", "x")}),         # 7 <image>, no image
        json.dumps({"id": "two", "image": "grey.png", "conversations": turns("<image><image>", "x")}),  # 8 two <image>
        "",                                                                                # blank: skipped
        '{"id": "latin1", "conversations": [{"from": "human", "value": "caf\xe9"}]}',      # 10 non-UTF-8 (below)
        json.dumps({"id": "nofile", "image": "missing.png", "conversations": turns("<image>\nx", "y")}),  # 11
        json.dumps({"id": "trunc", "image": "truncated.png", "conversations": turns("<image>\nx", "y")}),  # 12
        json.dumps({"id": "bomb", "image": "bomb.png", "conversations": turns("<image>\nx", "y")}),       # 13
        json.dumps({"id": "zero", "image": "empty.png", "conversations": turns("<image>\nx", "y")}),      # 14
        json.dumps({"id": "notoken", "image": "rgba.png", "conversations": turns("x", "y")}),            # 15 warning
    ]
    raw = "\n".join(lines).encode("utf-8").replace("caf\xe9".encode("utf-8"), b"caf\xe9") + b"\n"
    (tmp_path / "data.jsonl").write_bytes(raw)
    r = subprocess.run([PY, str(REPO / "data.py"), "--check", str(tmp_path / "data.jsonl"), "--images",
                        str(tmp_path / "img")], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 1, r.stderr
    out = r.stdout
    where = str(tmp_path / "data.jsonl")
    expect = {2: "invalid JSON", 3: 'missing or empty "conversations"', 4: "turn 0: expected", 5: "turn 0: from 'gpt'",
              6: "turn 1: empty gpt turn", 7: "<image> in the text but no \"image\" field", 8: "2 <image> tokens",
              10: "not UTF-8 text (byte 0xe9", 11: "image file not found", 12: "cannot read image",
              13: "decompression bomb", 14: "empty (0 bytes)", 15: "warning: an image but no <image>"}
    for line, what in expect.items():
        assert any(l.startswith(f"{where}:{line}: ") and what in l for l in out.splitlines()), (line, what, out)
    assert not any(l.startswith(f"{where}:1: ") for l in out.splitlines())
    assert out.strip().splitlines()[-1] == f"{where}: 14 records, 13 problem(s) in 12 record(s), 1 warning(s)"
    # a clean file: exit 0; a JSON list that is not UTF-8 names its line
    (tmp_path / "clean.json").write_text(json.dumps([good]))
    assert data.main(["--check", str(tmp_path / "clean.json"), "--images", str(tmp_path / "img")]) == 0
    (tmp_path / "bad.json").write_bytes(b'[\n{"id": "a",\n "x": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"bad\.json:3: not UTF-8"):
        data.LLaVADataset(tmp_path / "bad.json", None, "phi3")
