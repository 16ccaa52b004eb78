"""lora.py and train.py --lora: stage 2 with a frozen base LLM.

At initialisation the LoRA model is the base model exactly; trained, its merged weights give the unmerged
model's logits; only the LoRA pairs and the projector get gradients and sit in the optimiser; a run killed
after a checkpoint resumes bit for bit; DDP (2 ranks = 1 rank x 2 micro-steps) and FSDP2 agree; the adapter
folder loads on its own and merges into the official layout."""
import json
import types

import pytest
import torch

import lora
import train
from checkpoint import CheckpointError, read_weights
from fusion import FlorenceVL, FlorenceVLConfig
from helpers import randomize_
from model import LLMConfig
from quantize import quantize_llm_
from synthetic import synthetic_tokenizer
from trainrun import logged, run

IMG = -200


def tiny(family: str, seed: int = 0) -> FlorenceVL:
    torch.manual_seed(seed)
    cfg = FlorenceVLConfig.from_name("tiny", llm=LLMConfig.from_name("tiny", family=family, vocab_size=512,
                                                                     hidden_size=64, n_layers=2))
    model = FlorenceVL(cfg, synthetic_tokenizer()).eval()
    randomize_(model)
    return model


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (2, 12), generator=g)
    ids[:, 2] = IMG
    labels = ids.clone()
    labels[:, :6] = -100
    return ids, torch.randn(2, 3, 64, 64, generator=g), labels


@torch.no_grad()
def logits(model, ids, pixels):
    return model(ids, None, pixels).logits


def expected_trainable(model, targets=lora.TARGETS) -> set:
    """What stage 2 with LoRA must train: the A / B pair of every targeted Linear of every block, and the
    projector (names as model.named_parameters gives them)."""
    names = {f"llm.layers.{i}.{path}.{ab}" for i in range(model.cfg.llm.n_layers) for path in
             [f"self_attn.{t}" if t in ("qkv_proj", "o_proj") else f"mlp.{t}" for t in targets]
             for ab in ("lora_A", "lora_B")}
    return names | {f"mm_projector.{n}" for n, _ in model.mm_projector.named_parameters()}


@pytest.mark.parametrize("family", ["phi3", "llama"])
def test_at_initialisation_lora_is_the_base_model_exactly(family):
    model = tiny(family)
    ids, pixels, _ = inputs()
    base = logits(model, ids, pixels)
    names = lora.add_lora_(model.llm, 4, 8.0, 0.0)
    assert len(names) == 4 * model.cfg.llm.n_layers
    assert torch.equal(logits(model, ids, pixels), base)  # B = 0: exactly, 0.0
    with torch.no_grad():  # negative control: a non-zero B changes the logits
        next(m for m in model.llm.modules() if isinstance(m, lora.LoRALinear)).lora_B.normal_()
    assert (logits(model, ids, pixels) - base).abs().max() > 1e-3


@pytest.mark.parametrize("family, int8", [("phi3", False), ("llama", False), ("llama", True)])
def test_merged_weights_give_the_trained_models_logits(family, int8):
    """A few AdamW steps on the LoRA pairs and the projector, then merge_lora_: the logits agree to fp32 rounding
    (int8 base: the merged weight is the dequantized one plus the update, the QLoRA-style path)."""
    model = tiny(family)
    if int8:
        quantize_llm_(model.llm, torch.float32)
    lora.add_lora_(model.llm, 4, 8.0, 0.0)
    model.set_stage("finetune")
    params = lora.set_trainable_(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids, pixels, labels = inputs()
    model.train()
    for _ in range(5):
        model(ids, None, pixels, labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    trained = logits(model, ids, pixels)
    assert lora.merge_lora_(model) == 4 * model.cfg.llm.n_layers and not lora.is_lora(model)
    worst = (logits(model, ids, pixels) - trained).abs().max().item()
    print(f"\n{family} int8={int8}: merged vs unmerged logits {worst:.2e}")
    assert worst <= 1e-5


def test_only_lora_pairs_and_projector_get_gradients():
    model = tiny("phi3")
    lora.add_lora_(model.llm, 4, 8.0, 0.0)
    model.set_stage("finetune")
    params = lora.set_trainable_(model)
    ids, pixels, labels = inputs()
    model.train()
    model(ids, None, pixels, labels).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad} == expected_trainable(model)
    assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if n in expected_trainable(model)}
    # negative control: with a target left out (o_proj), the check fails
    other = tiny("phi3")
    lora.add_lora_(other.llm, 4, 8.0, 0.0, targets=("qkv_proj", "gate_up_proj", "down_proj"))
    other.set_stage("finetune")
    lora.set_trainable_(other)
    assert {n for n, p in other.named_parameters() if p.requires_grad} != expected_trainable(other)


# ---- train.py --lora, in real processes -----------------------------------------------------------------
LORA = ["--stage", "finetune", "--lora", "4", "--synthetic-size", "64", "--global-batch", "8", "--micro-batch", "4",
        "--eval-samples", "0", "--log-every", "1", "--resume", "auto"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Florence-VL checkpoint to fine-tune (random weights), saved as stage 1 saves one: plain template,
    images resized to a square; stage 2 must still speak the chat template and pad."""
    folder = tmp_path_factory.mktemp("lora-base") / "base"
    torch.manual_seed(0)
    model = train.tiny_model()
    model.cfg.template, model.cfg.image_aspect_ratio = "plain", "square"
    model.save_pretrained(folder)
    return folder


def test_lora_run_trains_only_its_adapter_resumes_bit_for_bit_and_merges(tmp_path, base):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    args = LORA + ["--model", str(base), "--steps", "4", "--save-every", "2"]
    first = run(tmp_path, args + ["--out", str(straight), "--merge"])
    assert "LoRA: " in first.stdout and "trainable parameters" in first.stdout and "AdamW state" in first.stdout
    died = run(tmp_path, args + ["--out", str(crashed)], env={"DIE_AFTER": train.checkpoint_name("finetune", 2)},
               check=False)
    assert died.returncode == 17
    ckpt = crashed / train.checkpoint_name("finetune", 2)
    assert (ckpt / lora.ADAPTER_FILE).is_file() and not (ckpt / "model.safetensors").exists()  # the adapter alone
    run(tmp_path, args + ["--out", str(crashed)])
    a, b = logged(straight), logged(crashed)
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and [r["step"] for r in b] == [1, 2, 3, 4]
    wa, wb = (read_weights(d / "final" / lora.ADAPTER_FILE) for d in (straight, crashed))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the adapter: LoRA pairs and the projector only; the base model untouched
    assert all(".lora_" in k or k.startswith("mm_projector.") for k in wa) and any(".lora_B" in k for k in wa)
    assert json.loads((straight / "final" / lora.ADAPTER_CONFIG).read_text())["base_model"] == str(base)
    # the adapter folder and the merged checkpoint (official layout) answer the same
    adapter, merged = lora.from_pretrained(straight / "final"), FlorenceVL.from_pretrained(straight / "merged")
    assert lora.is_lora(adapter) and not lora.is_lora(merged) and (straight / "merged" / "config.json").is_file()
    # trained as stage 2 on a stage-1 base: both answer in the chat template, on padded images
    assert FlorenceVL.from_pretrained(base).template == "plain"
    with pytest.raises(CheckpointError, match="is a LoRA adapter .* lora.from_pretrained"):
        FlorenceVL.from_pretrained(straight / "final")  # fusion.py does not know LoRA: a clear error, no guess
    assert adapter.template == merged.template == "phi3"
    assert adapter.cfg.image_aspect_ratio == merged.cfg.image_aspect_ratio == "pad"
    ids, pixels, _ = inputs()
    pixels = torch.nn.functional.interpolate(pixels, size=96)
    assert (logits(adapter, ids, pixels) - logits(merged, ids, pixels)).abs().max() <= 1e-5
    assert (logits(adapter, ids, pixels) - logits(FlorenceVL.from_pretrained(base), ids, pixels)).abs().max() > 1e-4


def test_lora_under_ddp_equals_one_rank_and_fsdp_matches(tmp_path, base):
    """2 ranks x 1 micro-step = 1 rank x 2 micro-steps (the LoRA gradients of the first step, within 1e-6),
    and FSDP2 (fully_shard per block) trains the same steps as DDP, with --activation-checkpointing."""
    args = LORA + ["--model", str(base), "--steps", "2", "--activation-checkpointing", "--lora-dropout", "0"]
    run(tmp_path, args + ["--out", str(tmp_path / "one")], env={"DUMP_GRADS": str(tmp_path / "g1.safetensors")})
    run(tmp_path, args + ["--out", str(tmp_path / "two")], nproc=2, env={"DUMP_GRADS": str(tmp_path / "g2.safetensors")})
    run(tmp_path, args + ["--out", str(tmp_path / "fsdp"), "--fsdp"], nproc=2)
    g1, g2 = read_weights(tmp_path / "g1.safetensors"), read_weights(tmp_path / "g2.safetensors")
    assert g1.keys() == g2.keys() and max((g1[k] - g2[k]).abs().max().item() for k in g1) <= 1e-6
    ddp = {r["step"]: r["loss"] for r in logged(tmp_path / "two")}
    fsdp = {r["step"]: r["loss"] for r in logged(tmp_path / "fsdp")}
    assert sorted(ddp) == sorted(fsdp) == [1, 2] and all(abs(ddp[s] - fsdp[s]) <= 1e-5 for s in ddp)


def test_lora_settings_are_checked(tmp_path, base):
    for extra, why in ((["--lora", "4"], "--lora R"), (["--quantize", "int8"], "go with --lora")):
        with pytest.raises(SystemExit, match=why):
            train.main(["--model", str(base), "--out", str(tmp_path / "x"), *extra])


def test_merge_cli_writes_the_official_layout(tmp_path, base):
    model = FlorenceVL.from_pretrained(base)
    lora.add_lora_(model.llm, 4, 8.0, 0.0)
    with torch.no_grad():
        for m in model.llm.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.normal_(0, 0.1)
    lora.save_adapter(model, tmp_path / "adapter", str(base))
    lora.main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    merged = FlorenceVL.from_pretrained(tmp_path / "merged")
    ids, pixels, _ = inputs()
    pixels = torch.nn.functional.interpolate(pixels, size=96)
    assert (logits(merged, ids, pixels) - logits(model.eval(), ids, pixels)).abs().max() <= 1e-5


# ---- lora.py plan: the memory of a LoRA step, from the shapes ----------------------------------------------
def test_memory_plan_counts_what_a_real_model_holds():
    """The plan builds the model on the meta device; the same model built for real holds the same bytes, and its
    trainable state is 16 bytes per trainable parameter (fp32 weight, gradient, two AdamW moments)."""
    cfg = FlorenceVLConfig.from_name("tiny")
    rows = dict(lora.memory_plan(cfg, r=4, micro_batch=2, tokens=64, supervised=16))
    real = FlorenceVL(cfg).to(torch.bfloat16)
    lora.add_lora_(real.llm, 4, 8.0, 0.0)
    real.mm_projector.float()
    trainable = lora.set_trainable_(real)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    (base, b), (tower, t), (state, s), (_, g), (_, adam), (act, a), (loss, l) = rows.items()
    assert b == nbytes([p for n, p in [*real.llm.named_parameters(), *real.llm.named_buffers()] if ".lora_" not in n])
    assert t == nbytes([*real.vision.parameters(), *real.vision.buffers()])
    assert s == g == adam / 2 == 4 * sum(p.numel() for p in trainable)
    assert l == 2 * 16 * cfg.llm.vocab_size * 10 and "with activation checkpointing" in act
    # without checkpointing every block keeps its activations: more, by the number of blocks
    no_ckpt = dict(lora.memory_plan(cfg, r=4, micro_batch=2, tokens=64, supervised=16, checkpointing=False))
    assert list(no_ckpt.values())[5] > a


def test_block_activation_slope_predicts_a_real_forward():
    """block_bytes_per_token (one block, measured at 16 and 32 tokens) predicts how what a whole 2-block LoRA LLM
    saves for backward grows with the tokens (measured at 64 and 96): 2 blocks' worth per token, plus the final
    norm's and the rotary tables', exactly. What does not grow with the tokens (LoRA's casts of A and B) is not in the slope."""
    from model import LLM
    cfg = LLMConfig.from_name("tiny", family="phi3", hidden_size=128, intermediate_size=256, n_heads=4,
                              n_kv_heads=2, n_layers=2, vocab_size=512)
    per_token = lora.block_bytes_per_token(cfg, 4)
    llm = LLM(cfg).to(torch.bfloat16)
    lora.add_lora_(llm, 4, 8.0, 0.05)
    lora.set_trainable_(types.SimpleNamespace(requires_grad_=llm.requires_grad_, llm=llm,
                                              mm_projector=torch.nn.Identity(), parameters=llm.parameters))
    llm.train()
    weights = {t.untyped_storage()._cdata for t in [*llm.parameters(), *llm.buffers()]}

    def growth(fn):  # saved bytes per token, from 64 to 96 tokens
        sizes = []
        for T in (64, 96):
            x = torch.zeros(1, T, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
            sizes.append(lora.saved_bytes(lambda: fn(x), weights)[0])
        return (sizes[1] - sizes[0]) / 32
    whole, norm = growth(lambda x: llm(inputs_embeds=x, return_hidden=True)), growth(llm.norm)
    rope = 2 * cfg.head_dim * 2  # cos and sin in bf16, computed once for both blocks
    print(f"\nper token: whole LLM {whole:.0f} bytes; predicted 2 x {per_token:.0f} + final norm {norm:.0f} + "
          f"rotary tables {rope}")
    assert per_token > 0 and whole == 2 * per_token + norm + rope
    # negative control: a block that saves more per token (a wider MLP) is not predicted by this slope
    wide = lora.block_bytes_per_token(type(cfg)(**{**cfg.__dict__, "intermediate_size": 512}), 4)
    assert abs(whole - (2 * wide + norm)) > 0.05 * whole


def test_memory_plan_cli_for_the_8b(capsys):
    lora.main(["plan", "--model", "florence-vl-8b", "--lora", "16"])
    out = capsys.readouterr().out
    assert "14.96 GiB  LLM base weights, frozen (bf16)" in out and "in all" in out  # 8,030,261,248 x 2 bytes
