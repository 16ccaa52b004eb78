"""Evaluate a Florence-VL model on a question file: batched greedy answers, written as the official
evaluation writes them, and scored three ways when the file has references.

    python eval.py --model jiuhai/florence-vl-8b-sft --question-file llava-bench.jsonl --image-folder images/ \
        --answers-file answers/florence-vl-8b-sft.jsonl      # the official model_vqa_loader's files
    python eval.py --model runs/default/final --synthetic    # the embedded held-out questions, scored

Question files: the official JSONL (`question_id`, `image`, `text`), or records in the LLaVA / lmms style
with references: `question` (or `text`, or the first human turn of `conversations`), `answer` (or
`answers`: a list, e.g. VQAv2's ten, or the first gpt turn), an optional `image` (a path under
--image-folder), an optional `question_id`/`id` and `category`. The answers file has the official keys
(question_id, prompt, text, answer_id, model_id, metadata), so each benchmark's own scoring script reads it;
this project's scores of a record with references are in its metadata. Prompts are built as the official
evaluation builds them ("<image>\n" + question, the checkpoint's template; --conv-mode to choose); images
are turned upright by their EXIF orientation (the official loader does not; a photo from a phone is then
sideways), and otherwise processed as the official processor does.

Metrics
  exact match   the prediction equals a reference, surrounding whitespace forgiven
  VQA accuracy  after the VQA evaluation's normalisation (lower case, punctuation, periods, number words ->
                digits, articles, contractions); with one reference 0 or 1, with several the official
                min(1, matches / 3) averaged over the leave-one-out subsets of the references
  POPE          over the records whose reference is yes/no: the prediction read as POPE's script reads it
                (first sentence; 'no' / 'not' / 'No' as a word means no, anything else yes); precision,
                recall and F1 of 'yes', accuracy and the share of 'yes' answers
"""
import argparse
import json
import re
import sys
import time
import uuid
from pathlib import Path

import torch
from PIL import Image

from data import IMAGE_TOKEN, load_image, right_pad, tokenize_prompt
from florence_encoder import preprocess
from sample import add_model_args, load_model

# ---- VQA normalisation (the rules of the VQA challenge's evaluation script) ------------------------------
NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBERS["none"] = "0"
ARTICLES = {"a", "an", "the"}
PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
# apostrophe-less spellings -> the spelling with one (the most common entries of the official table)
CONTRACTIONS = dict(pair.split(":") for pair in (
    "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't didnt:didn't doesnt:doesn't dont:don't "
    "hadnt:hadn't hasnt:hasn't havent:haven't hed:he'd hes:he's howd:how'd howll:how'll hows:how's im:i'm "
    "ive:i've isnt:isn't itd:it'd itll:it'll lets:let's maam:ma'am mightnt:mightn't mightve:might've "
    "mustnt:mustn't mustve:must've neednt:needn't oclock:o'clock shant:shan't shes:she's shouldve:should've "
    "shouldnt:shouldn't thats:that's thered:there'd theres:there's theyd:they'd theyll:they'll theyre:they're "
    "theyve:they've wasnt:wasn't weve:we've werent:weren't whatll:what'll whatre:what're whats:what's "
    "whens:when's whered:where'd wheres:where's whod:who'd wholl:who'll whos:who's whove:who've whys:why's "
    "wont:won't wouldve:would've wouldnt:wouldn't yall:y'all youd:you'd youll:you'll youre:you're youve:you've"
).split())
COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
PERIOD_NOT_IN_NUMBER = re.compile(r"\.(?!\d)")  # the official pattern's look-behind is a typo: only this applies


def normalize_vqa(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in PUNCTUATION:  # glued to a word ('yes,' or ' ,'), or any comma-in-number in the text: drop; else a space
        if p + " " in text or " " + p in text or COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = PERIOD_NOT_IN_NUMBER.sub("", out)
    words = [NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def exact_match(prediction: str, references: list) -> float:
    return float(any(prediction.strip() == r.strip() for r in references))


def vqa_accuracy(prediction: str, references: list) -> float:
    p, refs = normalize_vqa(prediction), [normalize_vqa(r) for r in references]
    if len(refs) == 1:
        return float(p == refs[0])
    # official: for each reference left out, min(1, matches among the others / 3); the mean of those
    return sum(min(1.0, sum(p == r for r in refs[:i] + refs[i + 1:]) / 3) for i in range(len(refs))) / len(refs)


# ---- POPE ------------------------------------------------------------------------------------------------
def pope_answer(prediction: str) -> str:
    """'yes' or 'no', as POPE's evaluation reads a free-form answer."""
    text = prediction.split(".")[0].replace(",", "")
    words = text.split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def yes_no(reference: str):
    r = normalize_vqa(reference)
    return r if r in ("yes", "no") else None


def pope_metrics(predictions: list, references: list) -> dict:
    """Over (prediction, 'yes'|'no' reference) pairs; 'yes' is the positive class."""
    pred = [pope_answer(p) == "yes" for p in predictions]
    gold = [r == "yes" for r in references]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    tn = len(pred) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": len(pred), "accuracy": (tp + tn) / max(len(pred), 1), "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": sum(pred) / max(len(pred), 1)}


def score(records: list, predictions: list) -> dict:
    """Overall and per-category exact match / VQA accuracy, and POPE over the yes/no records; records without
    references (the official question files) are not scored."""
    pairs = [(r, p) for r, p in zip(records, predictions) if r["answers"] is not None]
    rows = [(r, p, exact_match(p, r["answers"]), vqa_accuracy(p, r["answers"])) for r, p in pairs]
    n = max(len(rows), 1)
    out = {"n": len(records), "scored": len(rows), "exact_match": sum(e for _, _, e, _ in rows) / n,
           "vqa_accuracy": sum(v for _, _, _, v in rows) / n, "categories": {}}
    for cat in sorted({r.get("category") for r, _ in pairs if r.get("category") is not None}):
        sel = [(e, v) for r, _, e, v in rows if r.get("category") == cat]
        out["categories"][cat] = {"n": len(sel), "exact_match": sum(e for e, _ in sel) / len(sel),
                                  "vqa_accuracy": sum(v for _, v in sel) / len(sel)}
    yn = [(p, yes_no(r["answers"][0])) for r, p in pairs if len(r["answers"]) == 1]
    yn = [(p, g) for p, g in yn if g is not None]
    out["pope"] = pope_metrics([p for p, _ in yn], [g for _, g in yn]) if yn else None
    return out


# ---- records ---------------------------------------------------------------------------------------------
def read_records(path) -> list:
    """A question file -> [{'id', 'text', 'question', 'answers' (list, or None), 'image' (path or None), 'category'}].

    The official question files (llava/eval/model_vqa_loader.py: JSONL of question_id, image, text) have no
    answers: their benchmarks' own scripts score the answers file. Other files may carry references
    ('answer' / 'answers' / the first gpt turn), which are then scored here."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    raw = json.loads(text) if text.lstrip().startswith("[") else \
        [json.loads(line) for line in text.splitlines() if line.strip()]
    out = []
    for i, r in enumerate(raw):
        turns = r.get("conversations") or []
        question = r.get("question") or r.get("text") or next((t["value"] for t in turns if t["from"] == "human"), None)
        answer = r["answer"] if r.get("answer") is not None else r.get("answers")
        answer = answer if answer is not None else next((t["value"] for t in turns if t["from"] == "gpt"), None)
        if question is None:
            raise SystemExit(f"{path}[{i}]: needs a question ('text' as the official files, 'question', or "
                             "conversations)")
        answers = None if answer is None else [a["answer"] if isinstance(a, dict) else str(a) for a in answer] \
            if isinstance(answer, list) else [str(answer)]
        out.append({"id": r.get("question_id", r.get("id", i)), "text": question,
                    "question": question.replace(IMAGE_TOKEN, "").strip(), "answers": answers, "image": r.get("image"),
                    "category": r.get("category")})
    return out


def synthetic_records(model, n: int, seed: int) -> list:
    """The embedded task's held-out split, one question per image (as train.py's final evaluation)."""
    from synthetic import SyntheticDataset
    # drawn at the dataset's size and resized to the model's by preprocess, exactly as train.py's images
    held = SyntheticDataset("heldout", n, seed=seed, multi_turn=0.0)
    out = []
    for i in range(n):
        s = held.sample(i)
        question = s.conversations[0]["value"].replace(IMAGE_TOKEN + "\n", "")
        out.append({"id": s.id, "text": question, "question": question, "answers": [s.answers[0]],
                    "image": held.image(i), "category": s.kinds[0]})
    return out


# ---- generation ------------------------------------------------------------------------------------------
@torch.no_grad()
def answer_all(model, records, batch_size: int = 16, max_new_tokens: int = 128, style: str = "official",
               suffix: str = "", image_root=None, progress: bool = False) -> list:
    """Greedy answers, batch_size questions at a time (right-padded prompts). Each prompt as the official
    evaluation builds it ("<image>\n" + question in the model's template); images turned upright (EXIF)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    stop = set(model.cfg.llm.eos_token_ids) | set(model.tokenizer.end_ids)
    pad = model.cfg.image_aspect_ratio == "pad"
    predictions, t0 = [], time.time()
    for s in range(0, len(records), batch_size):
        chunk = records[s:s + batch_size]
        prompts, images = [], []
        for r in chunk:
            question = (r["question"] + " " + suffix).strip() if suffix else r["question"]
            has_image = r["image"] is not None
            prompts.append(tokenize_prompt([{"from": "human", "value": (IMAGE_TOKEN + "\n") * has_image + question}],
                                           model.tokenizer, model.template, has_image, style=style))
            if has_image:
                image = r["image"] if isinstance(r["image"], Image.Image) else load_image(Path(image_root) / r["image"])
                images.append(image.convert("RGB"))
        ids, mask = right_pad(prompts, 0)
        pixels = preprocess(images, pad_to_square=pad, size=model.cfg.vision.image_size).to(device, dtype) \
            if images else None
        out = model.generate(ids.to(device), mask.to(device), pixels, max_new_tokens=max_new_tokens,
                             stop_ids=stop, vocab_limit=model.tokenizer.vocab_size)
        predictions += [model.tokenizer.decode(t, skip_special_tokens=True).strip() for t in out]
        if progress and len(records) > batch_size:
            done = len(predictions)
            print(f"{done}/{len(records)} questions, {done / (time.time() - t0):.2f} questions/s", file=sys.stderr)
    return predictions


def model_id(path: str) -> str:
    """The answers' model_id, as the official evaluation names a model: its folder's (or repo's) last part."""
    parts = str(path).strip("/").split("/")
    return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]


def answer_line(r: dict, prediction: str, model_name: str) -> dict:
    """One line of the official answers file; this project's scores (when the record has references) go in
    metadata, which the benchmarks' scripts ignore."""
    meta = {} if r["answers"] is None else {
        "answers": r["answers"], "category": r["category"], "exact_match": exact_match(prediction, r["answers"]),
        "vqa_accuracy": vqa_accuracy(prediction, r["answers"])}
    return {"question_id": r["id"], "prompt": r["text"], "text": prediction, "answer_id": uuid.uuid4().hex,
            "model_id": model_name, "metadata": meta}


def report(summary: dict) -> str:
    if not summary["scored"]:
        return f"{summary['n']} questions, none with a reference answer: score the answers file with the benchmark's script"
    lines = [f"{summary['scored']} questions with references | exact match {summary['exact_match']:.1%} | "
             f"VQA accuracy {summary['vqa_accuracy']:.1%}"]
    for cat, c in summary["categories"].items():
        lines.append(f"  {cat:<16} n={c['n']:<5} exact match {c['exact_match']:.1%} | "
                     f"VQA accuracy {c['vqa_accuracy']:.1%}")
    p = summary["pope"]
    lines.append("POPE: no yes/no questions" if p is None else
                 f"POPE ({p['n']} yes/no questions): accuracy {p['accuracy']:.1%} | precision {p['precision']:.1%} | "
                 f"recall {p['recall']:.1%} | F1 {p['f1']:.1%} | yes ratio {p['yes_ratio']:.1%}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--question-file", "--data", dest="data",
                      help="a question file: the official JSONL (question_id, image, text), or a JSON list / JSONL "
                           "with references (see above)")
    what.add_argument("--synthetic", action="store_true", help="the embedded synthetic task's held-out questions")
    p.add_argument("--image-folder", "--images", dest="images", default=None,
                   help="root folder of the images that the question file names (default: its folder)")
    p.add_argument("--answers-file", "--out", dest="out", default="answers.jsonl",
                   help="the official answers file (question_id, prompt, text, answer_id, model_id, metadata); "
                        "the summary goes next to it as .summary.json")
    p.add_argument("--n", type=int, default=300, help="--synthetic: how many questions")
    p.add_argument("--seed", type=int, default=0, help="--synthetic: the dataset seed (train.py's --seed)")
    p.add_argument("--limit", type=int, help="only the first N records of the question file")
    p.add_argument("--suffix", default="", help="text appended to every question (e.g. an answer-format instruction)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128, help="the official evaluation's default")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args).eval()
    t0 = time.time()
    records = synthetic_records(model, args.n, args.seed) if args.synthetic else read_records(args.data)[:args.limit]
    image_root = args.images or (Path(args.data).parent if args.data else None)
    predictions = answer_all(model, records, args.batch_size, args.max_new_tokens, args.prompt_style, args.suffix,
                             image_root, progress=True)
    summary = score(records, predictions)
    name = "synthetic" if args.synthetic else model_id(args.model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for r, p in zip(records, predictions):
            f.write(json.dumps(answer_line(r, p, model_id(args.model))) + "\n")
    summary.update(model=str(args.model), data=name if args.synthetic else args.data, seconds=time.time() - t0)
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(report(summary))
    print(f"answers: {out}  summary: {out.with_suffix('.summary.json')}  ({summary['seconds']:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
