"""Layer-wise pruning (``--layerwise``): the same statistics, plans and checkpoints as the whole-model path
for every family, sequential statistics, sliding-window layers, resuming an interrupted run bit for bit,
and refusals before any compute."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import FAMILIES, char_tokenizer, saved_model_and_text, tiny_model
from transformers import AutoModelForCausalLM

import transact.core.layerwise
import transact.jobs.prune_layerwise
from transact.api import PruneJob, run_prune
from transact.arch import get_adapter
from transact.cli import main
from transact.core.calibrate import WEIGHT_X_GRAD, collect_statistics, sample_windows
from transact.core.layers import LayerModels, embed_windows, run_layer
from transact.core.metrics import METRICS
from transact.errors import TransactError
from transact.io.lazy import LazyCheckpoint, release_freed_memory
from transact.recipes import Calibration, PruneRecipe

CAL = dict(samples=6, seq_len=24, batch_size=4)


@pytest.fixture
def corpus():
    return [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (3 + i % 4) for i in range(40)]


def _recipe(calib, damp=None, **kw) -> PruneRecipe:
    widths = {"heads": 2, "kv_heads": 1, "mlp": 40} | {k: kw.pop(k) for k in ("heads", "kv_heads", "mlp") if k in kw}
    if damp is not None:
        kw["corrector_options"] = {"refit": {"damp": damp}}
    return PruneRecipe(**widths, calibration=Calibration(text=str(calib), **CAL), **kw)


def _prune(base, out, recipe, **job) -> object:
    return run_prune(PruneJob(str(base), str(out), recipe, force=True, progress=False, **job))


def _logits(folder, ids=None) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = ids if ids is not None else (torch.arange(40) * 7 % 120).unsqueeze(0)
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def _save(tmp_path, corpus, family="llama", name="base", **config):
    base = tmp_path / name
    tiny_model(family, **config).save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(corpus))
    return base, calib


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_layerwise_equals_the_whole_model_path(tmp_path, corpus, family, heads, kv_heads):
    """Dense statistics layer by layer: the same plan, the same refit, the same logits after a vanilla reload."""
    base, calib = _save(tmp_path, corpus, family, heads=heads, kv_heads=kv_heads, layers=3)
    recipe = _recipe(calib, heads=2, kv_heads=kv_heads // 2, correctors=("refit",))
    whole = _prune(base, tmp_path / "whole", recipe)
    layered = _prune(base, tmp_path / "layered", recipe, layerwise=True, sequential=False)
    assert layered.plan.layers == whole.plan.layers
    assert layered.plan.corrections == whole.plan.corrections == [{"name": "refit", "damp": 0.1}]
    torch.testing.assert_close(_logits(tmp_path / "layered"), _logits(tmp_path / "whole"), rtol=0, atol=1e-5)
    saved = json.loads((tmp_path / "layered" / "plan.json").read_text())
    assert saved["recipe"]["layerwise"] is True and saved["calibration_hash"] == whole.plan.calibration_hash
    assert not list(tmp_path.glob(".*"))  # no work directory or staging file left behind
    umask = os.umask(0)
    os.umask(umask)
    modes = {stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "layered").iterdir()}
    assert modes == {0o666 & ~umask}  # shards, index, config, plan: as a plain open() would make them


# every metric that needs no gradient of the whole model's loss (a layer-wise prune never has one)
@pytest.mark.parametrize("metric", [name for name, m in METRICS.items() if WEIGHT_X_GRAD not in m.statistics])
def test_every_layerwise_metric_selects_what_the_whole_model_path_selects(tmp_path, corpus, metric):
    base, calib = _save(tmp_path, corpus, "qwen3", layers=3)
    recipe = _recipe(calib, metric=metric)
    whole = _prune(base, tmp_path / "whole", recipe)
    layered = _prune(base, tmp_path / "layered", recipe, layerwise=True, sequential=False)
    assert layered.plan.layers == whole.plan.layers
    assert torch.equal(_logits(tmp_path / "layered"), _logits(tmp_path / "whole"))


def test_layerwise_statistics_equal_whole_model_statistics(tmp_path, corpus):
    base, _ = _save(tmp_path, corpus, "qwen2", layers=3)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    windows = sample_windows(char_tokenizer(), corpus, 6, 24, seed=0)
    whole = collect_statistics(model, windows, ("sum_sq", "gram"), batch_size=4, progress=False).activations
    weights, prefix = LazyCheckpoint(base), get_adapter(model).layers_path
    models = LayerModels(model.config, torch.float32, torch.device("cpu"))
    first = models.with_layer(0, weights.with_prefix(f"{prefix}.0."))
    hidden = embed_windows(first, lambda ids: weights.rows("model.embed_tokens.weight", ids), windows, 4,
                           torch.device("cpu"))
    for index in range(3):
        layer = models.with_layer(index, weights.with_prefix(f"{prefix}.{index}."))
        hidden, stats = run_layer(layer, hidden, 4, statistics=("sum_sq", "gram"))
        assert stats.tokens == whole.tokens and stats.samples == whole.samples
        for group in ("attn", "mlp"):
            for name in ("sum_sq", "gram"):
                torch.testing.assert_close(getattr(stats, group)[name][0], getattr(whole, group)[name][index],
                                           rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sequential", [False, True])
def test_nothing_pruned_reproduces_the_dense_model(tmp_path, corpus, sequential):
    base, calib = _save(tmp_path, corpus, "llama", layers=3)
    recipe = _recipe(calib, heads=4, kv_heads=2, mlp=96, correctors=("refit",))
    _prune(base, tmp_path / "out", recipe, layerwise=True, sequential=sequential)
    torch.testing.assert_close(_logits(tmp_path / "out"), _logits(base), rtol=0, atol=1e-5)


def test_sequential_statistics_change_the_result_and_still_reload(tmp_path, corpus):
    base, calib = _save(tmp_path, corpus, "llama", layers=3)
    recipe = _recipe(calib, correctors=("refit",))
    dense = _prune(base, tmp_path / "dense", recipe, layerwise=True, sequential=False)
    sequential = _prune(base, tmp_path / "sequential", recipe, layerwise=True, sequential=True)
    assert sequential.plan.recipe["sequential"] is True
    assert dense.plan.layers[0] == sequential.plan.layers[0]  # layer 0 sees the same inputs either way
    a, b = _weights(tmp_path / "dense"), _weights(tmp_path / "sequential")
    assert not torch.equal(a["model.layers.2.mlp.down_proj.weight"], b["model.layers.2.mlp.down_proj.weight"])
    assert torch.isfinite(_logits(tmp_path / "sequential")).all()
    # apply-plan recreates the dense-statistics plan from the same calibration, and refuses the sequential one
    assert main(["apply-plan", str(base), str(tmp_path / "dense" / "plan.json"), "--out", str(tmp_path / "again"),
                 "--quiet"]) == 0
    again = _weights(tmp_path / "again")
    assert all(torch.allclose(again[k], a[k], rtol=0, atol=1e-6) for k in a)
    assert main(["apply-plan", str(base), str(tmp_path / "sequential" / "plan.json"), "--out",
                 str(tmp_path / "never"), "--quiet"]) == 2
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("family,config", [
    ("mistral", {"sliding_window": 8}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
])
def test_sliding_window_layers(tmp_path, corpus, family, config):
    """Masks per layer type: windows longer than the sliding window, and layers of both kinds."""
    base, calib = _save(tmp_path, corpus, family, layers=3, **config)
    recipe = _recipe(calib, correctors=("refit",))
    whole = _prune(base, tmp_path / "whole", recipe)
    layered = _prune(base, tmp_path / "layered", recipe, layerwise=True, sequential=False)
    assert layered.plan.layers == whole.plan.layers
    torch.testing.assert_close(_logits(tmp_path / "layered"), _logits(tmp_path / "whole"), rtol=0, atol=1e-5)


def test_tied_embeddings_and_a_bf16_checkpoint_with_fp32_compute(tmp_path, corpus):
    """The refit in fp32 of a bf16 checkpoint is saved in bf16; both paths round it the same way and their
    checkpoints (verified on write) agree."""
    base, calib = _save(tmp_path, corpus, "llama", layers=2, tie=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    char_tokenizer().save_pretrained(tmp_path / "bf16")
    recipe = _recipe(calib, correctors=("refit",))
    run_prune(PruneJob(str(tmp_path / "bf16"), str(tmp_path / "whole"), recipe, dtype="float32", progress=False))
    run_prune(PruneJob(str(tmp_path / "bf16"), str(tmp_path / "layered"), recipe, dtype="float32", progress=False,
                       layerwise=True, sequential=False))
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "layered")
    assert {k: v.dtype for k, v in a.items()} == {k: v.dtype for k, v in b.items()}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "lm_head.weight" not in b


@pytest.mark.parametrize("fail_in", ["prune_layer", "_save_hidden"])
def test_an_interrupted_run_resumes_bit_identically(tmp_path, corpus, monkeypatch, fail_in):
    base, calib = _save(tmp_path, corpus, "qwen3", layers=4)
    recipe = _recipe(calib, correctors=("refit",))
    _prune(base, tmp_path / "straight", recipe, layerwise=True, sequential=True)

    owner = transact.core.layerwise if fail_in == "prune_layer" else transact.jobs.prune_layerwise
    original, calls = getattr(owner, fail_in), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, fail_in, interrupted)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _prune(base, out, recipe, layerwise=True, sequential=True)
    monkeypatch.setattr(owner, fail_in, original)
    assert not out.exists()
    with pytest.raises(TransactError, match="--resume"):
        run_prune(PruneJob(str(base), str(out), recipe, progress=False, layerwise=True))
    with pytest.raises(TransactError, match="different model, recipe"):
        _prune(base, out, _recipe(calib, correctors=("refit",), damp=0.5), layerwise=True, sequential=True,
               resume=True)
    _prune(base, out, recipe, layerwise=True, sequential=True, resume=True)
    a, b = _weights(tmp_path / "straight"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "plan.json").read_text())["layers"] == \
        json.loads((tmp_path / "straight" / "plan.json").read_text())["layers"]


def test_layerwise_never_loads_the_whole_model(tmp_path, corpus, monkeypatch):
    base, calib = _save(tmp_path, corpus, "llama", layers=2)

    def refuse(*args, **kwargs):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    _prune(base, tmp_path / "out", _recipe(calib, correctors=("refit",)), layerwise=True)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


def test_refusals_come_before_any_work(tmp_path, corpus, monkeypatch):
    base, calib = saved_model_and_text(tmp_path, "llama", corpus)
    monkeypatch.setattr(transact.core.layerwise, "prune_layer", lambda *a, **k: pytest.fail("compute started"))
    out = tmp_path / "out"
    cases = [
        (dict(recipe=_recipe(calib, metric="taylor"), layerwise=True), "gradients of the whole model"),
        (dict(recipe=_recipe(calib), sequential=True), "add --layerwise"),
        (dict(recipe=_recipe(calib), resume=True), "add --layerwise"),
        (dict(recipe=_recipe(calib), layerwise=True, heads=3), "multiple of"),
    ]
    for kwargs, message in cases:
        recipe = kwargs.pop("recipe")
        if kwargs.pop("heads", None):
            recipe = _recipe(calib, heads=3, kv_heads=None)
        with pytest.raises(TransactError, match=message):
            run_prune(PruneJob(str(base), str(out), recipe, progress=False, **kwargs))
    (base / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(TransactError):
        run_prune(PruneJob(str(base), str(out), _recipe(calib), progress=False, layerwise=True))
    with pytest.raises(TransactError, match="damp"):
        _recipe(calib, correctors=("refit",), damp=-1.0)
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_the_command_line_and_info(tmp_path, corpus, capsys):
    base, calib = saved_model_and_text(tmp_path, "qwen2", corpus)
    out = tmp_path / "out"
    assert main(["prune", str(base), "--out", str(out), "--heads", "2", "--kv-heads", "1", "--mlp", "48",
                 "--reconstruct", "--layerwise", "--calib", str(calib), "--samples", "4",
                 "--seq-len", "16", "--quiet"]) == 0
    assert "saved qwen2 checkpoint" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["layerwise"] == {"sequential": False}  # the default
    assert main(["prune", str(base), "--out", str(tmp_path / "x"), "--mlp", "48", "--layerwise", "--eval-text",
                 str(calib), "--calib", str(calib), "--quiet"]) == 2
    assert "transact eval" in capsys.readouterr().err
    assert main(["info", str(base)]) == 0
    assert "prune --layerwise about" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensors_are_copied_in_chunks_and_checked(tmp_path, monkeypatch, dtype):
    """The embedding and LM head are copied a chunk at a time (cast on the way) and read back."""
    from safetensors.torch import save_file

    import transact.io.lazy as lazy

    monkeypatch.setattr(lazy, "CHUNK_BYTES", 256)  # many chunks, the last one short
    weight = torch.randn(101, 7)
    save_file({"w": weight, "b": torch.randn(7)}, str(tmp_path / "model.safetensors"))
    source = LazyCheckpoint(tmp_path)
    (tmp_path / "out").mkdir()
    writer = lazy.ShardWriter(tmp_path / "out", 2)
    files = [writer.copy_tensor(1, source, "w", dtype), writer.copy_tensor(2, source, "b", dtype)]
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    copied = load_file(str(tmp_path / "out" / files[0]))["w"]
    assert copied.dtype == dtype and torch.equal(copied, weight.to(dtype))
    assert torch.equal(load_file(str(tmp_path / "out" / files[1]))["b"], source.tensor("b").to(dtype))


def _resident_anonymous_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from Linux's /proc")
def test_memory_freed_between_layers_is_handed_back():
    """Small tensors freed in between kept ones stay resident in the allocator's heap (the per-layer growth
    a layer-wise run showed) until release_freed_memory trims it."""
    start = _resident_anonymous_bytes()
    blocks = [torch.empty(1024) for _ in range(60_000)]  # 4 KiB each: heap blocks, not separate mappings
    kept = blocks[::16]
    del blocks
    held = _resident_anonymous_bytes() - start
    release_freed_memory()
    after = _resident_anonymous_bytes() - start
    assert held > 150 * 2**20 and after < held - 120 * 2**20
    assert len(kept) == 3750
