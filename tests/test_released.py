"""The released checkpoints, end to end: `python sample.py --model jiuhai/florence-vl-3b-sft --image photo.jpg
--prompt "..."` (and the 8B, and both pretrain repos) answers as the official code would.

The hub is not reachable here, so tests/released.py builds the four repos at tiny sizes, file for file in the
released layout (bf16 shards + index, the whole Florence-2 under model.vision_tower.vision_tower.*, the 3B's
SentencePiece tokenizer files without tokenizer.json, the 8B's tokenizer.json with <pad> = 128256, the pretrain
repos' vision_tower/ folder), and serves them from a fake hub cache (HF_HUB_CACHE, HF_HUB_OFFLINE=1): the real
loading path, huggingface_hub.snapshot_download, runs. The tower repos that the sft configs name hold only
their *.json files there, while the cache's tree listing says that pytorch_model.bin exists: offline, a request
for it fails, as it would for a user who never downloaded the 1.5 GB.

The expected answers come from the official data flow assembled from transformers parts
(tests/released_reference.py, `Reference`): the official eval prompt (model_vqa_loader: "<image>\\n" + question in
conv_templates[...], get_prompt, tokenizer_image_token) with the official tokenizers (transformers 4.43.1 in
.venv-ref, via tests/reference_env.py), Florence-2's features for the three task prompts, channel concat, the
projector, the splice, the LLM's greedy generate (128 new tokens at most; the Phi eval stops at <|end|> only, Llama
at its eos list), decoded as the official eval decodes (batch_decode(skip_special_tokens=True)[0].strip()).

The reference runs in fp32; ours in the default dtype (bf16 or fp32, by the CPU) and in bf16 (--dtype bf16).
test_reference_is_well_posed checks that every generated token
wins by at least MARGIN_FACTOR (4) times the largest logit change that bf16 causes in the reference itself at
that step (and by 0.5 logits at least): our bf16 path rounds in other places than transformers' does, but by
the same few parts in a thousand, so a 4x margin leaves room; fp32 implementations differ by ~1e-5.
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import released
import released_reference
from released import REPOS, TOWER_REPOS

ROOT = Path(__file__).resolve().parents[1]
import data  # noqa: E402
import tokenizer as tokenizer_module  # noqa: E402

SHARED_PHOTO = Path(__file__).resolve().parents[2] / "shared" / "florence2" / "image.png"
SFT = ["jiuhai/florence-vl-3b-sft", "jiuhai/florence-vl-8b-sft"]
EXIF_REPOS = ["jiuhai/florence-vl-3b-sft", "jiuhai/florence-vl-8b-pretrain"]   # both tokenizers, both aspect modes


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The caches, the references and their answers (built once, ~25 s). The photo is copied into the test's
    folder first: a user's clone has no ../shared."""
    root = tmp_path_factory.mktemp("released")
    photo = root / "source.png"
    photo.write_bytes(SHARED_PHOTO.read_bytes())
    return released_reference.build_world(root / "world", photo)


# ----------------------------------------------------------------------------------------------
# Running our scripts: a fresh process, cwd the repository, the environment plus HF_HUB_CACHE and
# HF_HUB_OFFLINE=1 (any other HF_* variable removed), nothing else. Runs of one group start together, two at a
# time (2 cores), and are kept for every test that reads them.

AUDITED = r"""
import runpy, sys
log = open(sys.argv[1], "w")
def hook(event, args):
    if event == "open" and isinstance(args[0], str):
        log.write(args[0] + "\n")
        log.flush()
sys.addaudithook(hook)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class Runner:
    def __init__(self, world):
        self.world, self.commands, self.results = world, {}, {}

    def add(self, key, group, args, cache, audit_log=None):
        self.commands[key] = (group, args, cache, audit_log)

    def _run(self, key):
        _, args, cache, audit_log = self.commands[key]
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
        prefix = [sys.executable] + (["-c", AUDITED, str(audit_log)] if audit_log else [])
        try:
            return subprocess.run(prefix + list(args), cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=400)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(e.cmd, -9, e.stdout or "", f"timed out after 400 s\n{e.stderr}")

    def get(self, key) -> subprocess.CompletedProcess:
        if key not in self.results:
            group = self.commands[key][0]
            todo = [k for k, c in self.commands.items() if c[0] == group and k not in self.results]
            with ThreadPoolExecutor(2) as pool:
                for k, result in zip(todo, pool.map(self._run, todo)):
                    self.results[k] = result
        return self.results[key]


def question_file(world) -> Path:
    """Official question-file format (one JSON object a line: question_id, image, text; no answers)."""
    path = world.root / "questions.jsonl"
    lines = [{"question_id": 0, "image": "photo.png", "text": released.QUESTION},
             {"question_id": 1, "image": "upright.png", "text": released.QUESTION},
             {"question_id": "q2", "image": "photo.png", "text": released_reference.QUESTION_2}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


EVAL_CASES = ["photo", "upright", "photo_q2"]   # the reference cases of the question file's lines


@pytest.fixture(scope="module")
def runs(world):
    r = Runner(world)
    images = world.images
    for repo in REPOS:
        base = ["sample.py", "--model", repo, "--image", str(images["photo"]), "--prompt", released.QUESTION]
        r.add(("sample", repo), "sample", base, world.cache)
        if repo in SFT:  # one repo of each tokenizer family: bf16 is emulated (slow) on CPUs without native bf16
            r.add(("sample bf16", repo), "sample", base + ["--dtype", "bf16"], world.cache)
        answers = world.root / "answers" / repo.split("/")[-1] / "answers.jsonl"   # the folder does not exist yet
        r.add(("eval", repo), "eval", ["eval.py", "--model", repo, "--question-file", str(question_file(world)),
                                       "--image-folder", str(images["photo"].parent), "--answers-file",
                                       str(answers)], world.cache)
    for repo in EXIF_REPOS:
        r.add(("exif", repo), "sample", ["sample.py", "--model", repo, "--image", str(images["exif"]), "--prompt",
                                         released.QUESTION], world.cache)
    photo = ["--image", str(images["photo"]), "--prompt", released.QUESTION]
    for repo in ("jiuhai/florence-vl-8b-sft", "jiuhai/florence-vl-3b-pretrain"):
        r.add(("audited", repo), "loading", ["sample.py", "--model", repo, *photo], world.cache,
              audit_log=world.root / f"opened-{repo.split('/')[-1]}.txt")
    r.add(("no tower repo", "jiuhai/florence-vl-3b-sft"), "loading",
          ["sample.py", "--model", "jiuhai/florence-vl-3b-sft", *photo], world.cache_no_tower_repo)
    r.add(("no tower", "jiuhai/florence-vl-8b-sft"), "loading",
          ["sample.py", "--model", "jiuhai/florence-vl-8b-sft", *photo], world.cache_no_tower)
    r.add(("no tower weights", "jiuhai/florence-vl-8b-sft"), "loading",
          ["sample.py", "--model", "jiuhai/florence-vl-8b-sft", *photo], world.cache_no_tower_json)
    return r


def ok(run) -> str:
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stderr[-3000:]}"
    return run.stdout


# ----------------------------------------------------------------------------------------------
# 0. The fixture itself: real layouts, real ids, a reference far from ties

def test_repos_have_the_released_layout(world):
    for repo, spec in REPOS.items():
        snap = world.repos[repo].snapshot
        names = {str(p.relative_to(snap)) for p in snap.rglob("*") if not p.is_dir()}
        shards = {f"model-{i:05d}-of-{spec.shards:05d}.safetensors" for i in range(1, spec.shards + 1)}
        tokenizer = ({"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"}
                     if spec.family == "phi3" else {"tokenizer.json", "tokenizer_config.json",
                                                    "special_tokens_map.json"})
        expected = {".gitattributes", "README.md", "config.json", "generation_config.json",
                    "model.safetensors.index.json"} | shards | tokenizer
        if spec.stage == "pretrain":
            expected |= {f"vision_tower/{f}" for f in ("config.json", "preprocessor_config.json", "tokenizer.json",
                                                       "tokenizer_config.json", "vocab.json", "merges.txt",
                                                       "special_tokens_map.json", "pytorch_model.bin",
                                                       "modeling_florence2.py")}
        assert names == expected, (repo, sorted(names ^ expected))
        index = json.loads((snap / "model.safetensors.index.json").read_text())["weight_map"]
        assert set(index.values()) == shards
        for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                    "model.mm_projector.encoder_mlp.0.weight", "model.mm_projector.encoder_mlp.2.1.bias",
                    "model.vision_tower.vision_tower.image_projection",
                    "model.vision_tower.vision_tower.vision_tower.convs.0.proj.weight",
                    "model.vision_tower.vision_tower.language_model.model.encoder.embed_tokens.weight",
                    "model.vision_tower.vision_tower.language_model.model.decoder.embed_tokens.weight",
                    "model.vision_tower.vision_tower.language_model.lm_head.weight",
                    "model.vision_tower.vision_tower.language_model.final_logits_bias",
                    "model.vision_tower.vision_tower.visual_temporal_embed.pos_idx_to_embed"):
            assert key in index, (repo, key)
        config = json.loads((snap / "config.json").read_text())
        assert config["torch_dtype"] == "bfloat16" and config["mm_projector_type"] == "mlp3x_gelu"
        assert config["image_aspect_ratio"] == spec.aspect and config["mm_vision_tower"] == spec.mm_vision_tower
        if spec.family == "llama":
            assert (config["vocab_size"], config["pad_token_id"], config["eos_token_id"]) == (
                128257, 128256, [128001, 128008, 128009])
            special = json.loads((snap / "special_tokens_map.json").read_text())
            assert sorted(special) == ["bos_token", "eos_token", "pad_token"]
            assert special["eos_token"]["content"] == "<|eot_id|>"
        else:
            assert config["vocab_size"] % 64 == 0 and config["eos_token_id"] == config["pad_token_id"] == released.PHI3_ENDOFTEXT
            tc = json.loads((snap / "tokenizer_config.json").read_text())
            assert (tc["add_bos_token"], tc["legacy"], tc["model_max_length"], tc["padding_side"]) == (
                False, False, 2048, "right") and "add_prefix_space" not in tc
    for tower in TOWER_REPOS:   # the tower repos: *.json only in the cache, though the hub lists the weights
        repo_dir = world.cache / ("models--" + tower.replace("/", "--"))
        snap = next((repo_dir / "snapshots").iterdir())
        assert sorted(p.name for p in snap.iterdir()) == sorted(
            ["config.json", "preprocessor_config.json", "special_tokens_map.json", "tokenizer.json",
             "tokenizer_config.json", "vocab.json"])
        listed = json.loads(next((repo_dir / "trees").iterdir()).read_text())["files"]
        assert "pytorch_model.bin" in listed and not (snap / "pytorch_model.bin").exists()


def test_reference_token_ids_are_the_real_ones(world):
    """Phi-3's added tokens right after the SentencePiece pieces, in Phi-3's order; Llama-3's specials at
    128000.., <pad> 128256; tokenizer_image_token's double BOS for llama3; the Phi eval prompt as the official
    slow tokenizer cuts it (rstrip=True on <|end|>, <|user|>, <|assistant|> eats the '\\n' after them)."""
    phi, llama = world.tokenization["phi3"], world.tokenization["llama"]
    end, user, assistant = released.PHI3_END, released.PHI3_SP_SIZE + 10, released.PHI3_SP_SIZE + 1
    assert phi["specials"]["<|end|>"] == end and phi["specials"]["<|user|>"] == user
    assert phi["specials"]["<|assistant|>"] == assistant and phi["len"] == released.PHI3_LEN
    chat = llama["ids"][f"eval/llama3/{released.QUESTION}"]
    assert chat[:3] == [128000, 128000, 128006]                    # post-processor BOS + the template's own
    assert chat.count(-200) == 1
    plain = llama["ids"][f"eval/plain/{released.QUESTION}"]
    assert plain[:2] == [128000, -200]                             # "<image>\nQ\n": BOS, image, the text
    ids = phi["ids"][f"eval/phi3/{released.QUESTION}"]
    assert ids[-1] == assistant and ids[ids.index(end) + 1] == user and ids[ids.index(user) + 1] == -200
    assert phi["ids"][f"eval/plain/{released.QUESTION}"][0] == -200   # no BOS: add_bos_token false


@pytest.mark.parametrize("repo", list(REPOS))
def test_reference_is_well_posed(world, repo):
    """Every generated token of the reference wins by >= max(0.5, 4 x the bf16 change) logits; the padded
    vocabulary rows (3B: 711..767, dropped by the official resize) never win; the answer changes when exif.jpg
    is left sideways, when the other template is used (chat <-> plain) and when the other aspect mode is (pad
    <-> square), so a test below fails if sample.py makes one of those mistakes; the pretrain answers run to
    128 tokens."""
    r = world.repos[repo]
    for case, m in r.margins.items():
        for step, (gap, change) in enumerate(zip(m["gap"], m["bf16_change"])):
            assert gap >= max(released_reference.MIN_MARGIN, released_reference.MARGIN_FACTOR * change), \
                (case, step, gap, change)
        assert m["argmax"] == m["full_argmax"] == r.answer_ids[case], case
        assert r.answer_ids[case][0] in r.design.first and r.answers[case]
    for a, b in released_reference.OPPOSITE:   # so the EXIF, template and aspect mistakes each change the answer
        assert r.answers[a] != r.answers[b], (a, b)
    lengths = {len(r.answer_ids[c]) for c in r.margins}
    assert lengths == {128} if r.spec.stage == "pretrain" else max(lengths) < 10
    print(f"\n{repo}: answers {[r.answers[c][:40] for c in released_reference.CASES]}, smallest ratio margin / bf16 "
          f"change "
          f"{min(g / max(d, 1e-9) for m in r.margins.values() for g, d in zip(m['gap'], m['bf16_change'])):.1f}")


# ----------------------------------------------------------------------------------------------
# 1. sample.py

@pytest.mark.parametrize("repo", list(REPOS))
def test_sample_answers_as_the_official_code(world, runs, repo):
    """Default dtype (--dtype auto: bf16 on a CPU with native bf16, fp32 on one without, where these tiny models
    fit), no flags but --model --image --prompt: stdout is the answer and a newline, nothing else (informational
    lines, the dtype chosen and why among them, go to stderr)."""
    run = runs.get(("sample", repo))
    assert ok(run) == world.repos[repo].answers["photo"] + "\n"
    assert "(auto: " in run.stderr


@pytest.mark.parametrize("repo", SFT)
def test_sample_bf16_gives_the_same_text(world, runs, repo):
    """bf16 asked for, whatever the CPU: the same answer (the reference's tokens win by far more than bf16 moves
    them, test_reference_is_well_posed)."""
    run = runs.get(("sample bf16", repo))
    assert ok(run) == world.repos[repo].answers["photo"] + "\n" and "bfloat16 on cpu (as asked)" in run.stderr


@pytest.mark.parametrize("repo", EXIF_REPOS)
def test_sample_sees_an_exif_rotated_jpeg_upright(world, runs, repo):
    """exif.jpg is stored on its side with Orientation 6; the answer is the one for the picture turned upright
    (ImageOps.exif_transpose), which differs from the one for the stored pixels."""
    r = world.repos[repo]
    out = ok(runs.get(("exif", repo)))
    assert out == r.answers["upright"] + "\n"
    assert out != r.answers["sideways"] + "\n"


# ----------------------------------------------------------------------------------------------
# 2. eval.py on an official question file

@pytest.mark.parametrize("repo", list(REPOS))
def test_eval_writes_the_official_answers_file(world, runs, repo):
    run = runs.get(("eval", repo))
    ok(run)
    path = world.root / "answers" / repo.split("/")[-1] / "answers.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    questions = [json.loads(line) for line in question_file(world).read_text().splitlines()]
    assert len(lines) == len(questions)
    for line, q, case in zip(lines, questions, EVAL_CASES):
        assert list(line) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"], list(line)
        assert line["question_id"] == q["question_id"] and line["prompt"] == q["text"]
        assert line["text"] == world.repos[repo].answers[case], (case, line["text"])
        assert line["model_id"] == repo.split("/")[-1] and line["metadata"] == {}
        assert isinstance(line["answer_id"], str) and line["answer_id"]
    assert len({line["answer_id"] for line in lines}) == len(lines)


# ----------------------------------------------------------------------------------------------
# 3. Prompt and training ids against the official construction

def our_tokenizer(folder: Path):
    """Our tokenizer for a released repo's files: tokenizer.load_tokenizer(folder) (tokenizer.model for the 3B,
    tokenizer.json for the 8B)."""
    return tokenizer_module.load_tokenizer(folder)


CHAT = {"phi3": "phi3", "llama": "llama3"}
PROMPT_CASES = ([(f, CHAT[f], name) for f in CHAT for name in released_reference.PROMPTS]
                + [(f, "plain", "single") for f in CHAT])
TRAIN_CASES = ([(f, CHAT[f], name) for f in CHAT for name in released_reference.RECORDS]
               + [(f, "plain", "plain") for f in CHAT])


def tokenizer_of(world, family):
    repo = {"phi3": "jiuhai/florence-vl-3b-sft", "llama": "jiuhai/florence-vl-8b-sft"}[family]
    return our_tokenizer(world.repos[repo].snapshot)


@pytest.mark.parametrize("family,template,name", PROMPT_CASES)
def test_tokenize_prompt_matches_the_official_ids(world, family, template, name):
    """model_vqa_loader's prompt (conv_templates[template], the turns, an empty assistant turn, get_prompt,
    tokenizer_image_token), with <image> moved to the front of its turn as training does."""
    expected = world.tokenization[family]["ids"][f"prompt/{template}/{name}"]
    ours = data.tokenize_prompt(released_reference.PROMPTS[name], tokenizer_of(world, family), template, True)
    assert ours == expected


@pytest.mark.parametrize("family,template,name", TRAIN_CASES)
def test_tokenize_conversation_matches_the_official_ids(world, family, template, name):
    """Training ids: preprocess_multimodal (<image> moved to the front of its turn), then get_prompt of all turns
    and tokenizer_image_token (phi3, llama3), or "<image>" + caption + "\\n" as one string (plain). Labels: plain
    as preprocess_plain masks it (BOS and <image> ignored); chat templates: exactly each reply and its end
    token, located by tokenizing the prompt up to the reply's start and end (the official length bookkeeping
    masks multi-turn samples wholesale; this is what it means to supervise)."""
    tok = world.tokenization[family]["ids"]
    record = released_reference.PLAIN_RECORD if template == "plain" else released_reference.RECORDS[name]
    expected = tok[f"train/{template}/{name}"]
    if template == "plain":
        n = len(tok["train/plain/image_only"])
        labels = [data.IGNORE_INDEX] * n + expected[n:]
    else:
        labels = [data.IGNORE_INDEX] * len(expected)
        for i in range(sum(t["from"] == "gpt" for t in record)):
            start, end = (tok[f"span/{template}/{name}/{i}/{k}"] for k in ("start", "end"))
            assert expected[:len(end)] == end and end[:len(start)] == start   # the prefixes tokenize stably
            labels[len(start):len(end)] = expected[len(start):len(end)]
    ids, ours_labels = data.tokenize_conversation(record, tokenizer_of(world, family), template, True)
    assert ids == expected
    assert ours_labels == labels


@pytest.mark.parametrize("family", list(CHAT))
def test_decode_matches_the_official_decode(world, family):
    """Text with spaces before punctuation, decoded as the official eval decodes (batch_decode with
    skip_special_tokens, strip): for the 8B, transformers 4.43 applies the tokenizer's clean_up_tokenization_spaces
    (true in Llama-3.1's tokenizer_config: " ," -> ",", " ' s" -> "'s"); transformers 5 no longer does for BPE."""
    ids, official = world.decode_probe[family]
    assert ("," in official and " ," not in official) if family == "llama" else " ," in official
    assert tokenizer_of(world, family).decode(ids, skip_special_tokens=True).strip() == official


@pytest.mark.parametrize("family", list(CHAT))
def test_naive_constructions_give_other_ids(world, family):
    """Negative controls: the comparisons above can fail. <image> left where the user wrote it, one BOS for
    llama3, and (3B) the template pieces tokenized one by one all give ids other than the official ones."""
    tok = world.tokenization[family]
    chat = CHAT[family]
    assert tok["ids"][f"wrong/{chat}/image_in_place"] != tok["ids"][f"train/{chat}/image_last"]
    official = tok["ids"][f"eval/{chat}/{released.QUESTION}"]
    if family == "llama":
        assert official[1:] != official and official[:2] == [128000, 128000]
    else:
        assert tok["piecewise"][f"piecewise/{chat}/single"] != official


# ----------------------------------------------------------------------------------------------
# 4. Loading

def test_tower_repo_with_only_its_json_is_enough(world, runs):
    """8b-sft names jiuhai/florence-llama-vision-tower, of which the cache has only the *.json files: the
    answer comes, and no file of the tower repo but JSON is opened. 3b-pretrain: its vision_tower/ folder's
    pytorch_model.bin is not read (the main shards hold the tower) and its custom code is not touched."""
    sft = runs.get(("audited", "jiuhai/florence-vl-8b-sft"))
    pretrain = runs.get(("audited", "jiuhai/florence-vl-3b-pretrain"))
    ok(sft), ok(pretrain)
    opened = (world.root / "opened-florence-vl-8b-sft.txt").read_text().splitlines()
    tower = [p for p in opened if "florence-llama-vision-tower/snapshots/" in p]   # the repo's files (not refs/)
    assert all(p.endswith(".json") for p in tower), tower
    opened = (world.root / "opened-florence-vl-3b-pretrain.txt").read_text().splitlines()
    assert not [p for p in opened if p.endswith(("pytorch_model.bin", "modeling_florence2.py"))]
    assert sft.stdout == world.repos["jiuhai/florence-vl-8b-sft"].answers["photo"] + "\n"
    assert pretrain.stdout == world.repos["jiuhai/florence-vl-3b-pretrain"].answers["photo"] + "\n"


def test_tower_repo_missing_sizes_come_from_the_weights(world, runs):
    """No tower repo in the cache at all: the tower's sizes are read from the shapes of the main shards'
    tower weights, and the answer is the same."""
    assert not (world.cache_no_tower_repo / "models--jiuhai--florence-phi-vision-tower").exists()
    out = ok(runs.get(("no tower repo", "jiuhai/florence-vl-3b-sft")))
    assert out == world.repos["jiuhai/florence-vl-3b-sft"].answers["photo"] + "\n"


@pytest.mark.parametrize("variant", ["no tower", "no tower weights"])
def test_no_tower_anywhere_is_a_clear_error(world, runs, variant):
    """8b-sft with the tower taken out of its shards and (a) no tower repo, (b) a tower repo with only its JSON:
    a non-zero exit and a message naming what was looked for, not a traceback."""
    run = runs.get((variant, "jiuhai/florence-vl-8b-sft"))
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "jiuhai/florence-llama-vision-tower" in run.stderr and "vision_tower" in run.stderr, run.stderr[-3000:]
