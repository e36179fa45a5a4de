"""The structure the code promises, checked: plug-ins are one registered object each, benchmarks and the
CLI take the same pruning step, optional dependencies are named when missing, there are no import cycles,
family knowledge stays in ``transact.arch``, and functions stay short."""

import ast
import copy
import re
from pathlib import Path

import pytest
import torch
from tiny import char_tokenizer, tiny_model

import transact.measure.jobs
from transact import extras
from transact.arch import get_adapter
from transact.cli import build_parser, main
from transact.core import salience
from transact.core.calibrate import STATISTICS, register_statistic
from transact.core.metrics import METRICS, LayerScores, Metric, register_metric
from transact.core.step import gather_statistics, prune_step
from transact.errors import TransactError
from transact.recipes import Calibration, PruneRecipe

SRC = Path(__file__).parent.parent / "src" / "transact"


@pytest.fixture
def registered():
    """Plug-ins registered by a test are removed after it."""
    added = []

    def add(metric: Metric) -> Metric:
        added.append(metric.name)
        return register_metric(metric)

    yield add
    for name in added:
        METRICS._items.pop(name)
    STATISTICS.pop("sum_abs", None)


def _smallest_weights_first(model, stats, shape, recipe) -> LayerScores:
    """A toy metric: the magnitude control, inverted."""
    heads, mlp = [], []
    for attn, ffn in get_adapter(model).layer_parts(model):
        heads.append(-salience.magnitude_head_scores(attn.q.weight, attn.o.weight, shape.head_dim))
        mlp.append(-salience.magnitude_mlp_scores(ffn.gate.weight, ffn.up.weight, ffn.down.weight))
    return LayerScores(heads, mlp)


def test_a_metric_is_one_registered_object(registered):
    registered(Metric("toy_inverse", "the magnitude control, inverted", _smallest_weights_first))
    recipe = PruneRecipe(heads=1, kv_heads=1, mlp=40, metric="toy_inverse", correctors=())
    assert not recipe.needs_calibration
    prune_args = next(a for a in build_parser()._subparsers._group_actions[0].choices["prune"]._actions
                      if a.dest == "metric")
    assert "toy_inverse" in prune_args.choices and "the magnitude control, inverted" in prune_args.help
    model = tiny_model("llama")
    weights = [salience.magnitude_head_scores(a.q.weight, a.o.weight, 16) for a, _ in
               get_adapter(model).layer_parts(model)]
    plan = prune_step(model, None, recipe)
    for kept, w in zip(plan.layers, weights, strict=True):  # the weakest query head of all survives
        assert kept.heads == [int(w.argmin())] and kept.kv_heads == [int(w.argmin()) // 2]
    assert plan.recipe["metric"] == "toy_inverse"


def test_a_metric_can_bring_its_own_statistic(registered, corpus):
    register_statistic("sum_abs", lambda x: x.reshape(-1, x.shape[-1]).abs().sum(0, dtype=torch.float32))

    def by_sum_abs(model, stats, shape, recipe):
        attn = stats.activation("attn", "sum_abs")
        return LayerScores([a.view(-1, shape.head_dim).sum(1) for a in attn], stats.activation("mlp", "sum_abs"))

    registered(Metric("toy_l1", "L1 of the transitional activations", by_sum_abs, statistics=("sum_abs",)))
    recipe = PruneRecipe(heads=2, kv_heads=1, mlp=40, metric="toy_l1", calibration=Calibration(samples=4, seq_len=32),
                         correctors=())
    stats = gather_statistics(tiny_model("qwen3"), char_tokenizer(), recipe, texts=corpus, progress=False)
    assert set(stats.activations.attn) == {"sum_abs"} and stats.activations.tokens == 128
    plan = prune_step(tiny_model("qwen3"), None, recipe, statistics=stats)
    assert plan.calibration_hash == stats.calibration_hash and len(plan.layers[0].mlp) == 40
    with pytest.raises(ValueError, match="already registered"):
        register_statistic("sum_abs", lambda x: x)


def test_benchmarks_step_equals_the_cli_step(corpus):
    """Statistics collected once and handed to the step (as the benchmarks do) give exactly the weights a
    step that calibrates for itself gives, and a step refuses statistics that lack what it needs."""
    recipe = PruneRecipe(heads=2, kv_heads=1, mlp=48, metric="flap", correctors=("flap_bias",),
                         calibration=Calibration(samples=4, seq_len=40))
    base, tok = tiny_model("llama"), char_tokenizer()
    stats = gather_statistics(base, tok, recipe, texts=corpus, progress=False)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    plan_a = prune_step(a, None, recipe, statistics=stats)
    plan_b = prune_step(b, tok, recipe, texts=corpus, progress=False)
    assert plan_a == plan_b and plan_a.corrections == [{"name": "flap_bias"}]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    only_sum_sq = gather_statistics(base, tok, PruneRecipe(heads=2, calibration=recipe.calibration, correctors=()),
                                    texts=corpus,
                                    progress=False)
    with pytest.raises(TransactError, match="lack sum"):
        prune_step(copy.deepcopy(base), None, recipe, statistics=only_sum_sq)


def test_a_missing_extra_is_named_before_any_work(tmp_path, monkeypatch, capsys):
    path = tmp_path / "m"
    tiny_model("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    real = extras._installed
    monkeypatch.setattr(extras, "_installed", lambda module: module != "lm_eval" and real(module))
    monkeypatch.setattr(transact.measure.jobs, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    assert main(["eval", str(path), "--tasks", "piqa"]) == 2
    err = capsys.readouterr().err
    assert "transact[eval]" in err and "lm-eval not installed" in err and "pip install 'transact[eval]'" in err
    with pytest.raises(TransactError, match=r"transact\[plots\]"):
        monkeypatch.setattr(extras, "_installed", lambda module: False)
        extras.require("plots", "plots")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_time_edges(path: Path, modules: set[str]) -> set[str]:
    """transact modules imported at module level (imports inside functions and TYPE_CHECKING blocks run
    later, and a child module running its parent package's __init__ is how packages work)."""
    edges = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            edges |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            edges.add(node.module)
            edges |= {f"{node.module}.{a.name}" for a in node.names}
    return {e for e in edges if e in modules} - {_module_name(path)}


def test_no_import_cycles():
    paths = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {name: _import_time_edges(path, set(paths)) for name, path in paths.items()}
    done, active = set(), []

    def visit(name):
        if name in active:
            raise AssertionError("import cycle: " + " -> ".join([*active[active.index(name):], name]))
        if name in done:
            return
        active.append(name)
        for nxt in sorted(graph[name]):
            visit(nxt)
        active.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


FAMILY_FIELDS = re.compile(r"config\.(model_type|num_attention_heads|num_key_value_heads|hidden_size|"
                           r"intermediate_size|num_hidden_layers|head_dim|vocab_size|max_position_embeddings|"
                           r"attention_bias|mlp_bias|use_sliding_window|sliding_window|text_config)\b")


def test_family_knowledge_stays_in_arch():
    leaks = [f"{p.relative_to(SRC)}:{i}: {line.strip()}" for p in SRC.rglob("*.py") if p.parent.name != "arch"
             for i, line in enumerate(p.read_text().splitlines(), 1) if FAMILY_FIELDS.search(line)]
    assert leaks == []


def test_functions_are_short():
    long = [f"{p.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for p in SRC.rglob("*.py") for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60]
    assert long == []
