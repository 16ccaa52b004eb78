"""eval.py: the metrics on hand-made answer sets (values worked out by hand in the comments), the
question-file reader, and the whole tool on a tiny random model (batching must not change an answer)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluate  # noqa: E402  (the module, not the builtin)
from fusion import FlorenceVL, FlorenceVLConfig  # noqa: E402
from synthetic import SyntheticDataset, synthetic_tokenizer  # noqa: E402


@pytest.mark.parametrize("text, normal", [
    ("Two dogs.", "2 dogs"),          # number word -> digit, the final period dropped, lower case
    ("The Cat", "cat"),               # article dropped
    ("yes,", "yes"),                  # punctuation glued to a word goes
    ("red/blue", "red blue"),         # punctuation inside a word becomes a space
    ("3.5", "3.5"),                   # a period before a digit stays
    ("1,000 people", "1000 people"),  # a comma inside a number goes
    ("dont know", "don't know"),      # the contraction table
    ("  a\tbig\ndog ", "big dog"),
    ("none", "0"),
])
def test_vqa_normalisation(text, normal):
    assert evaluate.normalize_vqa(text) == normal


def test_exact_match_and_vqa_accuracy_by_hand():
    assert evaluate.exact_match(" cat ", ["cat"]) == 1.0
    assert evaluate.exact_match("Cat", ["cat"]) == 0.0                  # exact: case matters
    assert evaluate.vqa_accuracy("Cat.", ["cat"]) == 1.0               # normalised: it does not
    assert evaluate.vqa_accuracy("Two", ["2"]) == 1.0
    assert evaluate.vqa_accuracy("a dog", ["cat"]) == 0.0
    # ten references, three of them "2": leaving out one of the three leaves 2 matches -> 2/3; leaving
    # out one of the other seven leaves 3 -> 1. (3 * 2/3 + 7 * 1) / 10 = 0.9
    refs = ["2", "2", "2"] + ["3"] * 7
    assert evaluate.vqa_accuracy("two", refs) == pytest.approx(0.9)
    # two matches: (2 * 1/3 + 8 * 2/3) / 10 = 0.6; one match: (1 * 0 + 9 * 1/3) / 10 = 0.3
    assert evaluate.vqa_accuracy("two", ["2", "2"] + ["3"] * 8) == pytest.approx(0.6)
    assert evaluate.vqa_accuracy("two", ["2"] + ["3"] * 9) == pytest.approx(0.3)


def test_pope_reading_and_metrics_by_hand():
    assert evaluate.pope_answer("No, there is not.") == "no"
    assert evaluate.pope_answer("Yes, there is a dog.") == "yes"
    assert evaluate.pope_answer("There is no dog in the image") == "no"
    assert evaluate.pope_answer("Yes. There is no cat.") == "yes"  # only the first sentence counts
    assert evaluate.pope_answer("Nope") == "yes"                   # POPE's rule: anything but a no-word is yes
    # predictions yes yes no no yes against yes no yes no yes: TP 2 (1st, 5th), FP 1 (2nd), FN 1 (3rd), TN 1
    m = evaluate.pope_metrics(["Yes", "yes", "No", "no", "Yes."], ["yes", "no", "yes", "no", "yes"])
    assert m == pytest.approx({"n": 5, "accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                               "yes_ratio": 3 / 5})
    # all answered no: no positives predicted -> precision 0 (not a division by zero), recall 0
    m = evaluate.pope_metrics(["no", "no"], ["yes", "no"])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.5)


def test_score_splits_by_category_and_runs_pope_on_yes_no_records_only():
    records = [{"answers": ["yes"], "category": "pope"}, {"answers": ["no"], "category": "pope"},
               {"answers": ["2"], "category": "count"}, {"answers": ["cat"], "category": "count"}]
    s = evaluate.score(records, ["Yes", "yes", "two", "cat"])
    # exact: only "cat" (the yes answers differ in case or are wrong) -> 1/4; VQA: yes, -, 2, cat -> 3/4
    assert (s["n"], s["exact_match"], s["vqa_accuracy"]) == (4, 0.25, 0.75)
    assert s["categories"]["pope"] == {"n": 2, "exact_match": 0.0, "vqa_accuracy": 0.5}
    assert s["categories"]["count"] == {"n": 2, "exact_match": 0.5, "vqa_accuracy": 1.0}
    assert s["pope"]["n"] == 2 and s["pope"]["precision"] == 0.5 and s["pope"]["recall"] == 1.0
    assert evaluate.score(records[2:], ["2", "cat"])["pope"] is None


def test_read_records_accepts_the_common_spellings(tmp_path):
    lines = [{"question_id": 7, "question": "<image>\nHow many?", "answer": "2", "image": "a.png", "category": "c"},
             {"text": "What colour?", "answers": [{"answer": "red"}, {"answer": "red"}], "image": "b.png"},
             {"id": "x", "conversations": [{"from": "human", "value": "<image>\nIs it?"},
                                           {"from": "gpt", "value": "no"}]},
             {"question": "Zero?", "answer": 0}]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    recs = evaluate.read_records(tmp_path / "q.jsonl")
    assert [r["id"] for r in recs] == [7, 1, "x", 3]
    assert [r["question"] for r in recs] == ["How many?", "What colour?", "Is it?", "Zero?"]
    assert [r["answers"] for r in recs] == [["2"], ["red", "red"], ["no"], ["0"]]
    assert [r["image"] for r in recs] == ["a.png", "b.png", None, None]
    # the official question files (model_vqa_loader): question_id, image, text; no answers to score
    official = [{"question_id": 3, "image": "c.jpg", "text": "What is shown?\nAnswer briefly."}]
    (tmp_path / "official.jsonl").write_text(json.dumps(official[0]) + "\n")
    rec, = evaluate.read_records(tmp_path / "official.jsonl")
    assert (rec["id"], rec["text"], rec["answers"], rec["image"]) == (3, official[0]["text"], None, "c.jpg")
    (tmp_path / "bad.json").write_text(json.dumps([{"answer": "?"}]))
    with pytest.raises(SystemExit, match="question"):
        evaluate.read_records(tmp_path / "bad.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    FlorenceVL(FlorenceVLConfig.from_name("tiny"), synthetic_tokenizer()).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    records = []
    for i, (q, a) in enumerate([("What word is written in the image?", "cat"), ("Is there a dog?", "yes"),
                                ("Where is the word?", "top left"), ("Is there a cat?", "no"),
                                ("What is at the center?", "a red circle")]):
        Image.fromarray(rng.integers(0, 256, (40 + 10 * i, 60, 3), dtype=np.uint8)).save(root / f"{i}.png")
        records.append({"question_id": i, "question": q, "answer": a, "image": f"{i}.png"})
    records.append({"question_id": 5, "question": "Where is the word?", "answer": "top left"})  # no image
    (root / "questions.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root


def test_eval_tool_writes_predictions_and_batching_does_not_change_answers(tiny):
    runs = {}
    for bs in (1, 4):
        out = tiny / f"pred{bs}.jsonl"
        summary = evaluate.main(["--model", str(tiny / "model"), "--data", str(tiny / "questions.jsonl"),
                                 "--batch-size", str(bs), "--max-new-tokens", "6", "--out", str(out),
                                 "--dtype", "fp32"])  # fp32: bf16 rounding depends on the batch's shapes
        runs[bs] = [json.loads(line) for line in out.read_text().splitlines()]
        assert summary["n"] == summary["scored"] == 6 and summary["pope"]["n"] == 2
        assert json.loads(out.with_suffix(".summary.json").read_text())["n"] == 6
    assert [r["question_id"] for r in runs[1]] == list(range(6))
    assert all(set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} for r in runs[1])
    assert [r["text"] for r in runs[1]] == [r["text"] for r in runs[4]]
    assert {r["model_id"] for r in runs[1]} == {"model"} and len({r["answer_id"] for r in runs[1]}) == 6
    # the scores in the file are the metrics of the printed predictions
    for r in runs[4]:
        assert r["metadata"]["exact_match"] == evaluate.exact_match(r["text"], r["metadata"]["answers"])


def test_eval_synthetic_heldout_questions(tiny):
    model = FlorenceVL.from_pretrained(tiny / "model")
    recs = evaluate.synthetic_records(model, 6, seed=0)
    held = SyntheticDataset("heldout", 6, seed=0, multi_turn=0.0)
    for i, r in enumerate(recs):  # one question per held-out scene, the first turn of train.py's evaluation
        s = held.sample(i)
        assert r["answers"] == [s.answers[0]] and r["category"] == s.kinds[0]
        assert "<image>" not in r["question"] and r["question"] in s.conversations[0]["value"]
    summary = evaluate.main(["--model", str(tiny / "model"), "--synthetic", "--n", "6", "--max-new-tokens", "4",
                             "--out", str(tiny / "syn.jsonl")])
    assert summary["n"] == 6 and 0 <= summary["exact_match"] <= 1 and summary["pope"] is None
