"""The structure the code promises, checked: plug-ins are one registered object each, benchmarks and the
CLI take the same pruning step, optional dependencies are named when missing, there are no import cycles,
family knowledge stays in ``transact.arch``, and functions stay short."""

import ast
import copy
from pathlib import Path

import pytest
import torch
from tiny import char_tokenizer, tiny_model

import transact.jobs.eval
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
    eq5_only = PruneRecipe(heads=2, metric="transact", calibration=recipe.calibration, correctors=())
    only_sum_sq = gather_statistics(base, tok, eq5_only, texts=corpus, progress=False)
    with pytest.raises(TransactError, match="lack sum"):
        prune_step(copy.deepcopy(base), None, recipe, statistics=only_sum_sq)


def test_a_missing_extra_is_named_before_any_work(tmp_path, monkeypatch, capsys):
    path = tmp_path / "m"
    tiny_model("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    real = extras._installed
    monkeypatch.setattr(extras, "_installed", lambda module: module != "lm_eval" and real(module))
    monkeypatch.setattr(transact.jobs.eval, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    assert main(["eval", str(path), "--tasks", "piqa"]) == 2
    err = capsys.readouterr().err
    assert "transact[eval]" in err and "lm-eval not installed" in err and "pip install 'transact[eval]'" in err
    with pytest.raises(TransactError, match=r"transact\[plots\]"):
        monkeypatch.setattr(extras, "_installed", lambda module: False)
        extras.require("plots", "plots")


def _module_name(path: Path, package: Path = SRC) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    """An ``if TYPE_CHECKING:`` block: its imports never run."""
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imported_names(tree: ast.AST) -> set[str]:
    """Every module name an import statement anywhere in ``tree`` (module level or inside functions) names,
    except inside TYPE_CHECKING blocks; ``from X import a`` names X and X.a."""
    names: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if _is_type_checking(node):
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        names |= _imported_names(node)
    return names


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _executed_imports(path: Path, modules: set[str], package: Path = SRC) -> set[str]:
    """The transact modules that importing ``path``'s module can execute: every import it makes at module
    level or inside its functions (TYPE_CHECKING blocks excepted), and for each the packages above the
    imported module, whose ``__init__`` runs first, except those above the importer itself (already running;
    that is how packages work)."""
    me = _module_name(path, package)
    mine = set(_ancestors(me)) | ({me} if path.name == "__init__.py" else set())
    edges = set()
    for name in _imported_names(ast.parse(path.read_text())):
        edges |= {n for n in [*_ancestors(name), name] if n in modules and n not in mine}
    return edges - {me}


def test_the_import_graph_sees_function_level_imports_and_parent_packages(tmp_path):
    source = tmp_path / "pkg" / "sub" / "mod.py"
    source.parent.mkdir(parents=True)
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.hidden\n\n"
                      "def f():\n    from pkg.other.leaf import thing\n    return thing\n")
    modules = {"pkg", "pkg.sub", "pkg.sub.mod", "pkg.other", "pkg.other.leaf", "pkg.hidden"}
    found = _executed_imports(source, modules, tmp_path / "pkg")
    assert found == {"pkg.other", "pkg.other.leaf"}


def test_no_import_cycles():
    paths = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {name: _executed_imports(path, set(paths)) for name, path in paths.items()}
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


# Modules that only keep former import paths working (re-exports of the jobs); a package may reach up to the
# jobs through them, so they are left out of the package-level check (the module-level one still sees them).
ALIAS_MODULES = ("transact.layerwise_prune", "transact.measure.jobs", "transact.recovery.loop", "transact.deploy.gguf")


def _package(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_no_import_cycles_between_packages():
    """``core`` needs nothing of ``recipes`` or ``io`` needs nothing of ``core`` at run time, and so on: between
    the packages of transact (``transact.core``, ``transact.io`` ...) the imports that execute form no circle."""
    paths = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        if name in ALIAS_MODULES:
            continue
        edges = {_package(e) for e in _executed_imports(path, set(paths))} - {_package(name)}
        graph.setdefault(_package(name), set()).update(e for e in edges if e != "transact")
    done, active = set(), []

    def visit(name):
        if name in active:
            raise AssertionError("package import cycle: " + " -> ".join([*active[active.index(name):], name]))
        if name not in done:
            active.append(name)
            for nxt in sorted(graph.get(name, ())):
                visit(nxt)
            active.pop()
            done.add(name)

    for name in sorted(graph):
        visit(name)


def test_alias_modules_only_re_export():
    """The former import paths hold no code of their own beyond the wrappers that keep old signatures."""
    for name in ALIAS_MODULES:
        path = SRC.parent / (name.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text())
        assert not [n for n in tree.body if isinstance(n, ast.ClassDef)], name
        functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert all(len(f.body) <= 2 for f in functions), name  # a docstring and one call


def test_files_are_short():
    long = [f"{p.relative_to(SRC)} ({n} lines)" for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400]
    assert long == []


def _compared_names(tree: ast.AST) -> list[tuple[str, str]]:
    """(name, string) for every comparison of a name or attribute with a string constant."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            named = [s.attr if isinstance(s, ast.Attribute) else s.id for s in sides
                     if isinstance(s, ast.Attribute | ast.Name)]
            strings = [s.value for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, str)]
            found += [(n, v) for n in named for v in strings]
    return found


def test_recovery_methods_are_named_only_in_their_own_files():
    """What a recovery method does is asked of its registered object: no ``method == "lora"`` outside its file."""
    from transact.recovery.methods import METHODS

    names = set(METHODS.names())
    leaks = [f"{p.relative_to(SRC)}: {n} == {v!r}" for p in SRC.rglob("*.py") if p.parent.name != "methods"
             for n, v in _compared_names(ast.parse(p.read_text())) if v in names]
    assert leaks == []


def test_the_command_line_names_no_plug_in():
    """The CLI's plug-in flags come from the registries: no metric, corrector or option name is written in it."""
    from transact.cli.plugins import option_specs
    from transact.core.correct import CORRECTORS

    names = set(METRICS.names()) | set(CORRECTORS.names()) | set(option_specs())
    names.discard("transact")  # the default metric shares the program's name
    names |= {f"--{c.flag}" for _, c in CORRECTORS.items() if c.flag} | {f"--{n}" for n in option_specs()}
    literals = [(p.name, node.value) for p in (SRC / "cli").glob("*.py") for node in ast.walk(ast.parse(p.read_text()))
                if isinstance(node, ast.Constant) and node.value in names]
    assert literals == []


# Config fields that only a family adapter may read: the ones no transact value shares a name with are refused on
# any object and in getattr/setattr/hasattr or a subscript; the others (ModelShape has fields of the same names)
# only where the object read is a config.
CONFIG_ONLY = {"num_attention_heads", "num_key_value_heads", "num_hidden_layers", "max_position_embeddings",
               "attention_bias", "mlp_bias", "use_sliding_window", "sliding_window", "text_config", "layer_types",
               "num_experts_per_tok", "num_local_experts", "moe_intermediate_size", "shared_expert_intermediate_size"}
SHARED_NAMES = {"model_type", "hidden_size", "intermediate_size", "head_dim", "vocab_size"}


def _family_reads(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            owner = ast.unparse(node.value).lower()
            if "adapter" in owner:  # the adapter's own methods (text_config) are how to read a config
                continue
            if node.attr in CONFIG_ONLY or (node.attr in SHARED_NAMES and owner.endswith(("config", "cfg"))):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "getattr", "setattr", "hasattr") and len(node.args) > 1:
            name, owner = node.args[1], ast.unparse(node.args[0]).lower()
            if isinstance(name, ast.Constant) and (name.value in CONFIG_ONLY or
                                                   (name.value in SHARED_NAMES and owner.endswith(("config", "cfg")))):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and \
                node.slice.value in CONFIG_ONLY:
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_family_knowledge_stays_in_arch():
    # decilm is a model definition of the project's own (configuration and modeling files written beside a
    # checkpoint), so it reads its config as a transformers modeling file does
    leaks = [f"{p.relative_to(SRC)}:{line}: {text}" for p in SRC.rglob("*.py")
             if p.parent.name not in ("arch", "decilm")
             for line, text in _family_reads(ast.parse(p.read_text()))]
    assert leaks == []


def test_the_family_knowledge_check_sees_every_way_of_reading_a_config():
    code = ("a = model.config.num_attention_heads\nb = getattr(cfg, 'num_hidden_layers')\n"
            "c = text_config.hidden_size\nd = values['num_key_value_heads']\ne = shape.hidden_size\n")
    assert [line for line, _ in _family_reads(ast.parse(code))] == [1, 2, 3, 4]


def test_functions_are_short():
    long = [f"{p.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for p in SRC.rglob("*.py") for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60]
    assert long == []


def test_former_import_paths_still_work():
    """Names users may hold from before the jobs moved are the jobs' own (or keep their former signatures)."""
    import inspect

    import transact.api
    import transact.deploy.gguf
    import transact.jobs.bench
    import transact.jobs.eval
    import transact.jobs.export
    import transact.jobs.prune
    import transact.jobs.prune_layerwise
    import transact.layerwise_prune
    import transact.measure.jobs
    import transact.recovery.loop

    assert transact.api.run_prune is transact.jobs.prune.run is transact.run_prune
    assert transact.layerwise_prune.run_layerwise_prune is transact.jobs.prune_layerwise.run
    assert transact.measure.jobs.run_eval is transact.jobs.eval.run is transact.run_eval
    assert transact.measure.jobs.run_bench is transact.jobs.bench.run
    assert transact.deploy.gguf.run_gguf_export is transact.jobs.export.run
    assert list(inspect.signature(transact.recovery.loop.run).parameters) == ["recipe", "resume", "progress"]
    assert list(inspect.signature(transact.recovery.loop.teach).parameters) == ["recipe", "k", "processes", "resume",
                                                                                "progress"]
