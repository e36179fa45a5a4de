"""GGUF export and llama.cpp: every family with pruned heads converts, loads and predicts like transformers."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny import HEADS_MUST_DIVIDE_HIDDEN, TIED, random_plan, tiny_config, tiny_model
from transformers import AutoTokenizer

import transact.jobs.export
from transact.arch import shape_of
from transact.cli import main
from transact.core.surgery import prune_
from transact.deploy import llamacpp, quantize
from transact.deploy.gguf import GgufExportJob, compare_predictions, run_gguf_export
from transact.errors import TransactError
from transact.io.checkpoint import write_checkpoint
from transact.jobs.bench import BenchJob
from transact.jobs.bench import run as run_bench
from transact.measure.bench import BenchGrid

# llama.cpp's converter recognises a vocabulary by hashing how its tokenizer splits a probe text, so the
# tiny models borrow a real tokenizer (SmolLM2's) and its vocabulary size.
VOCAB = 49152
STRUCTURES = {"mha": (4, 4, 3, 3), "gqa": (4, 2, 2, 1)}  # heads, kv heads -> kept heads, kept kv heads


def _structure(family: str, structure: str) -> tuple[int, int, int, int]:
    """Gemma cannot save 3 heads on a 64-wide model (arch/gemma2.py): its MHA case keeps 2 of 4."""
    if family in HEADS_MUST_DIVIDE_HIDDEN and structure == "mha":
        return 4, 4, 2, 2
    return STRUCTURES[structure]
EXPECTED_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "qwen3", "gemma2": "gemma2",
                 "gemma3_text": "gemma3", "gemma3": "gemma3", "smollm3": "smollm3", "qwen3_5_text": "qwen35",
                 "qwen3_moe": "qwen3moe", "mixtral": "llama"}
# Not in this matrix: qwen2_moe exports only with its heads kept (tests/test_moe.py), and qwen3_5_moe_text's
# converter reads the vocabulary through transformers' Qwen3.5 tokenizer class, whose pre-tokenizer the
# borrowed SmolLM2 vocabulary does not match (as with the multimodal qwen3_5).
# What llama.cpp assumes of these families (arch/gemma2.py, gemma3.py, smollm3.py): an attention scale of
# head_dim ** -0.5, every 6th layer full-attention, every 4th layer without rotary embedding.
GEMMA3_GGUF = {"query_pre_attn_scalar": 16, "sliding_window_pattern": 6}
GGUF_SETTINGS = {"gemma2": {"query_pre_attn_scalar": 16}, "gemma3_text": GEMMA3_GGUF, "gemma3": GEMMA3_GGUF,
                 "smollm3": {"no_rope_layer_interval": 4, "layers": 4}}


@pytest.fixture(scope="module")
def gguf_tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def _sentencepiece(folder: Path, corpus: list[str], tokenizer_class: str, dummy_prefix: bool):
    """A small SentencePiece vocabulary trained here, for families whose llama.cpp converter reads the
    vocabulary from tokenizer.model; transformers builds its tokenizer (``tokenizer_class``) from the same
    file. Gemma's vocabularies have no dummy space prefix, Llama-style ones (Phi-3) have one."""
    import sentencepiece

    lines = folder / "lines.txt"
    lines.write_text("\n".join(text[i:i + 400] for text in corpus for i in range(0, len(text), 400)))
    sentencepiece.SentencePieceTrainer.train(input=str(lines), model_prefix=str(folder / "tokenizer"),
                                             vocab_size=SPM_VOCAB - 8, model_type="bpe", byte_fallback=True,
                                             character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                             pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
                                             unk_piece="<unk>", add_dummy_prefix=dummy_prefix, minloglevel=2)
    # every text starts with <bos>, as llama.cpp does for a SentencePiece vocabulary
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class,
                                                               "add_bos_token": True}))
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def sentencepiece_tokenizers(tmp_path_factory, corpus):
    """family -> its SentencePiece test tokenizer."""
    gemma = _sentencepiece(tmp_path_factory.mktemp("spm-gemma"), corpus, "GemmaTokenizer", dummy_prefix=False)
    llama = _sentencepiece(tmp_path_factory.mktemp("spm-llama"), corpus, "LlamaTokenizer", dummy_prefix=True)
    return {"gemma2": gemma, "phi3": llama}


SPM_VOCAB = 512
GELU = ("gemma2", "gemma3_text", "gemma3")
SENTENCEPIECE_FAMILIES = ("gemma2", "phi3")


def _pruned_checkpoint(path: Path, family: str, structure: str, tokenizer, seed: int = 0, tie: bool = False,
                       vocab: int = VOCAB):
    heads, kv, keep_heads, keep_kv = _structure(family, structure)
    model = tiny_model(family, seed=seed, heads=heads, kv_heads=kv, hidden=64, mlp=96, vocab_size=vocab, tie=tie,
                       **GGUF_SETTINGS.get(family, {}))
    plan = random_plan(model, keep_heads, keep_kv, 64, seed=seed)
    prune_(model, plan)
    write_checkpoint(model, tokenizer, path, plan=plan, report={}, save_dtype=torch.float32)
    return model


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
@pytest.mark.parametrize("family", sorted(EXPECTED_ARCH))
def test_pruned_heads_export_loads_and_agrees(tmp_path, request, gguf_tokenizer, family, structure):
    tie = family in TIED
    spm = family in SENTENCEPIECE_FAMILIES
    tokenizer = request.getfixturevalue("sentencepiece_tokenizers")[family] if spm else gguf_tokenizer
    vocab = SPM_VOCAB if spm else VOCAB
    _pruned_checkpoint(tmp_path / "model", family, structure, tokenizer, tie=tie, vocab=vocab)
    result = run_gguf_export(GgufExportJob(str(tmp_path / "model"), str(tmp_path / "m.gguf"), "f32", new_tokens=8,
                                           progress=False))

    check = result["verification"]
    # f32: the same greedy tokens, except where transformers itself sees a near-tie (random tiny weights)
    assert check["ok"] and check["steps"] == 32 and check["agree"] >= 30
    # The GeGLU families (Gemma) differ more (up to 0.016 nats measured here, the same with a sliding window of
    # 8 or 4,096 tokens, so not a window mismatch): llama.cpp's GELU is not computed as transformers' is
    assert check["max_margin"] < 0.005 and check["max_logprob_diff"] < (0.02 if family in GELU else 0.01)
    assert all(p["tokenizer_agrees"] for p in check["prompts"])
    summary = result["summary"]
    _, _, keep_heads, keep_kv = _structure(family, structure)
    assert summary["architecture"] == EXPECTED_ARCH[family]
    assert (summary["head_count"], summary["head_count_kv"], summary["key_length"]) == (keep_heads, keep_kv, 16)
    # Tied embeddings: the table is the output matrix too, read whole each step; untied: one row of it.
    embedding = 4 * vocab * 64
    expected_step = summary["tensor_bytes"] - (0 if tie else embedding)
    assert summary["bytes_per_decode_step"] == expected_step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "model"]  # no temporary left behind


@pytest.mark.parametrize("family", ["granite", "phi3"])
def test_mlp_pruning_exports_and_agrees_where_pruned_heads_cannot(tmp_path, request, gguf_tokenizer, family):
    """llama.cpp takes Granite and Phi-3 only with their heads whole (arch/granite.py, arch/phi3.py): MLP
    pruning exports. Granite's four multipliers (away from 1 in the tiny model) must reach llama.cpp; Phi-3
    (partial rotary here) goes through its fused-projection path and its SentencePiece vocabulary."""
    spm = family in SENTENCEPIECE_FAMILIES
    tokenizer = request.getfixturevalue("sentencepiece_tokenizers")[family] if spm else gguf_tokenizer
    model = tiny_model(family, heads=4, kv_heads=2, hidden=64, mlp=96, vocab_size=SPM_VOCAB if spm else VOCAB)
    plan = random_plan(model, 4, 2, 64)
    prune_(model, plan)
    write_checkpoint(model, tokenizer, tmp_path / "model", plan=plan, report={}, save_dtype=torch.float32)
    result = run_gguf_export(GgufExportJob(str(tmp_path / "model"), str(tmp_path / "m.gguf"), "f32", new_tokens=8,
                                           progress=False))
    check = result["verification"]
    assert check["ok"] and check["agree"] >= 31 and check["max_logprob_diff"] < 0.01
    assert result["summary"]["architecture"] == family


# Depth-pruned checkpoints: (family, layers, dropped) -> exported and agreeing, or refused by the family's
# llama.cpp layer pattern (every 6th layer full attention in Gemma 3, every 4th without RoPE in SmolLM3).
# Qwen3.5's converter writes which layers are recurrent from layer_types, so its hybrid stack can lose a layer
# of either kind; a SmolLM3 block of four keeps the NoPE layers every fourth.
DEPTH_CASES = [("llama", 4, [1]), ("mistral", 4, [2, 3]), ("qwen3", 4, [1]), ("mixtral", 4, [0]),
               ("qwen3_moe", 4, [2]), ("granite", 4, [1]), ("phi3", 4, [3]), ("qwen3_5_text", 4, [0]),
               ("smollm3", 8, [4, 5, 6, 7]), ("gemma2", 4, [2, 3]), ("gemma3_text", 12, [6, 7, 8, 9, 10, 11])]
DEPTH_REFUSED = [("gemma2", 4, [2], "every 2th layer a full-attention layer"),
                 ("gemma3_text", 7, [3], "every 6th layer a full-attention layer"),
                 ("smollm3", 5, [1], "no_rope_layers differ")]


@pytest.mark.parametrize(("family", "layers", "dropped"), DEPTH_CASES, ids=[c[0] for c in DEPTH_CASES])
def test_depth_pruned_export_loads_and_agrees(tmp_path, request, gguf_tokenizer, family, layers, dropped):
    from transact.core.depth import remove_layers_
    from transact.core.plan import whole_plan

    tokenizer = request.getfixturevalue("sentencepiece_tokenizers")[family] if family in SENTENCEPIECE_FAMILIES \
        else gguf_tokenizer
    vocab = SPM_VOCAB if family in SENTENCEPIECE_FAMILIES else VOCAB
    model = tiny_model(family, heads=4, kv_heads=2, hidden=64, mlp=96, vocab_size=vocab, tie=family in TIED,
                       **{**GGUF_SETTINGS.get(family, {}), "layers": layers})
    remove_layers_(model, dropped)
    write_checkpoint(model, tokenizer, tmp_path / "model", plan=whole_plan(shape_of(model)), report={},
                     save_dtype=torch.float32)
    result = run_gguf_export(GgufExportJob(str(tmp_path / "model"), str(tmp_path / "m.gguf"), "f32", new_tokens=8,
                                           progress=False))
    check = result["verification"]
    assert check["ok"] and check["agree"] >= 30
    # llama.cpp's GELU differs from transformers' a little in every layer: a 6-layer tiny Gemma 3 that was never
    # depth-pruned differs by 0.022 nats, the same model of 12 layers with 6 dropped by 0.027. A Qwen3.5 stack
    # opening with a full-attention layer differs more than one opening with a linear one: built so, without a
    # drop, 0.008 (and the same with full_attention_interval 2 or 3: llama.cpp reads the per-layer kinds); here
    # 0.016
    bound = 0.04 if family in GELU else 0.02 if family == "qwen3_5_text" else 0.01
    assert check["max_logprob_diff"] < bound
    assert result["summary"]["block_count"] == layers - len(dropped)


@pytest.mark.parametrize(("family", "layers", "dropped", "message"), DEPTH_REFUSED, ids=[c[0] for c in DEPTH_REFUSED])
def test_depth_pruned_export_refused_where_llamacpp_fixes_the_layer_pattern(tmp_path, gguf_tokenizer, family,
                                                                             layers, dropped, message):
    from transact.core.depth import remove_layers_
    from transact.core.plan import whole_plan

    model = tiny_model(family, heads=4, kv_heads=2, hidden=64, mlp=96, vocab_size=VOCAB,
                       **{**GGUF_SETTINGS.get(family, {}), "layers": layers})
    remove_layers_(model, dropped)
    write_checkpoint(model, gguf_tokenizer, tmp_path / "model", plan=whole_plan(shape_of(model)), report={},
                     save_dtype=torch.float32)
    with pytest.raises(TransactError, match=message):
        run_gguf_export(GgufExportJob(str(tmp_path / "model"), str(tmp_path / "m.gguf"), "f32", progress=False))
    assert not (tmp_path / "m.gguf").exists()


def test_architecture_mapping():
    assert llamacpp.gguf_architecture(tiny_config("qwen2", heads=4, kv_heads=2, head_dim=16)) == "qwen2"
    assert llamacpp.gguf_architecture(tiny_config("qwen2", heads=3, kv_heads=1, head_dim=16)) == "llama"
    assert llamacpp.gguf_architecture(tiny_config("mistral")) == "llama"
    assert llamacpp.gguf_architecture(tiny_config("qwen3", heads=3, kv_heads=1)) == "qwen3"
    with pytest.raises(TransactError, match="sliding-window"):
        llamacpp.gguf_architecture(tiny_config("qwen2", heads=3, kv_heads=1, use_sliding_window=True))


def test_verification_catches_a_different_model(tmp_path, gguf_tokenizer):
    _pruned_checkpoint(tmp_path / "a", "llama", "gqa", gguf_tokenizer, seed=0)
    other = _pruned_checkpoint(tmp_path / "b", "llama", "gqa", gguf_tokenizer, seed=1)
    llamacpp.convert(tmp_path / "a", tmp_path / "a.gguf", "f32", progress=False)
    check = compare_predictions(tmp_path / "a.gguf", other, gguf_tokenizer, "f32", new_tokens=8)
    assert not check["ok"]
    assert check["max_logprob_diff"] > 0.5


def test_failed_verification_writes_nothing(tmp_path, gguf_tokenizer, monkeypatch):
    _pruned_checkpoint(tmp_path / "model", "qwen2", "gqa", gguf_tokenizer)
    failing = {"ok": False, "tolerance": 0.05, "prompts": [
        {"ok": False, "prompt": "x", "agree": 0, "steps": 8, "max_margin": 3.0, "max_logprob_diff": 2.0,
         "tokenizer_agrees": True}]}
    monkeypatch.setattr(transact.jobs.export, "compare_predictions", lambda *a, **k: failing)
    with pytest.raises(TransactError, match="disagree with transformers"):
        run_gguf_export(GgufExportJob(str(tmp_path / "model"), str(tmp_path / "out" / "m.gguf"), progress=False))
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_inputs_fail_before_conversion(tmp_path, gguf_tokenizer, capsys):
    model_dir = tmp_path / "model"
    _pruned_checkpoint(model_dir, "llama", "mha", gguf_tokenizer)
    (tmp_path / "empty").mkdir()
    (tmp_path / "dir.gguf").mkdir()
    (tmp_path / "taken.gguf").write_text("keep me")
    cases = [
        (["export", str(tmp_path / "empty"), "--gguf", str(tmp_path / "x.gguf")], "not a Hugging Face model"),
        (["export", str(tmp_path / "nowhere"), "--gguf", str(tmp_path / "x.gguf")], "does not exist"),
        (["export", str(model_dir), "--gguf", str(tmp_path / "x.bin")], "must be a .gguf"),
        (["export", str(model_dir), "--gguf", "/proc/x.gguf"], "cannot write"),
        (["export", str(model_dir), "--gguf", str(tmp_path / "taken.gguf")], "exists"),
        (["export", str(model_dir), "--gguf", str(tmp_path / "dir.gguf")], "is a directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses an unknown --outtype
        main(["export", str(model_dir), "--gguf", str(tmp_path / "x.gguf"), "--outtype", "q4_k_z"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(TransactError, match="unknown --outtype"):
        GgufExportJob(str(model_dir), str(tmp_path / "x.gguf"), outtype="q3")
    with pytest.raises(TransactError, match=r"--imatrix guides llama\.cpp's quantizer"):
        GgufExportJob(str(model_dir), str(tmp_path / "x.gguf"), outtype="f16", imatrix="builtin")
    with pytest.raises(TransactError, match="does not exist"):
        GgufExportJob(str(model_dir), str(tmp_path / "x.gguf"), outtype="q4_k_m", imatrix=str(tmp_path / "none.txt"))
    for plain in ("auto", "none"):  # the default and its off switch take any type
        GgufExportJob(str(model_dir), str(tmp_path / "x.gguf"), outtype="f16", imatrix=plain)
    no_tokenizer = tmp_path / "bare"
    shutil.copytree(model_dir, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    assert main(["export", str(no_tokenizer), "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert (tmp_path / "taken.gguf").read_text() == "keep me"
    assert not (tmp_path / "x.gguf").exists()


def test_which_files_an_importance_matrix_guides():
    """--imatrix auto (the default) guides only llama.cpp's quantizer types, by the built-in calibration text."""
    asked = [("auto", "q4_0"), ("auto", "q4_k_m"), ("auto", "f16"), ("auto", "q8_0"), ("none", "q4_k_m"),
             (None, "q4_0"), ("code.txt", "q6_k"), ("code.txt", "bf16")]
    assert [quantize.imatrix_source(imatrix, outtype) for imatrix, outtype in asked] == [
        "builtin", "builtin", None, None, None, None, "code.txt", None]
    assert [quantize.names_imatrix_text(i) for i in ("auto", "none", None, "builtin")] == [False, False, False, True]


def test_converter_download_is_checked(tmp_path, monkeypatch):
    class FakeResponse:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return b"not the release"

    monkeypatch.setattr(llamacpp.urllib.request, "urlopen", lambda *a, **k: FakeResponse())
    monkeypatch.setenv("TRANSACT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(TransactError, match="SHA-256"):
        llamacpp._fetch_converter(tmp_path / "out" / "converter", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # nothing kept of a bad download


def test_bench_llamacpp_interleaves_and_compares(tmp_path, gguf_tokenizer):
    dense = tmp_path / "dense"
    model = tiny_model("llama", heads=4, kv_heads=2, hidden=64, mlp=96, vocab_size=VOCAB)
    model.save_pretrained(dense)
    gguf_tokenizer.save_pretrained(dense)
    _pruned_checkpoint(tmp_path / "pruned", "llama", "gqa", gguf_tokenizer)
    grid = BenchGrid(batches=(1, 2), contexts=(16,), gen=4, repeats=1, warmup=0)
    result = run_bench(BenchJob(models=(str(dense), str(tmp_path / "pruned")), grid=grid, out=str(tmp_path / "b"),
                                engine="llama.cpp", outtypes=("f32", "f16"), progress=False))

    assert result["engine"] == "llama.cpp" and result["reference"] == ["dense f16", "dense f32"]
    assert sorted(result["models"]) == ["dense f16", "dense f32", "pruned f16", "pruned f32"]
    assert len(result["rows"]) == 4 * 2
    for row in result["rows"]:
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0 and row["latency_s"] > 0
        ref = next(r for r in result["rows"] if r["model"] == f"dense {row['format']}" and r["batch"] == row["batch"])
        assert row["decode_speedup_analytic"] == pytest.approx(ref["decode_bytes_per_step"]
                                                               / row["decode_bytes_per_step"])
        if row["model"].startswith("dense"):
            assert row["prefill_speedup"] == row["decode_speedup"] == 1.0
    pruned_f16 = result["models"]["pruned f16"]
    assert pruned_f16["file_bytes"] < result["models"]["dense f16"]["file_bytes"]
    assert pruned_f16["kv_cache_bytes_per_token"] == 2 * 2 * 1 * 16 * 2  # layers * (k, v) * kv heads * dim * f16
    saved = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert (tmp_path / "b" / "speed.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "b" / "gguf").iterdir()) == [
        "dense.f16.gguf", "dense.f32.gguf", "pruned.f16.gguf", "pruned.f32.gguf"]


def test_compare_quantize_puts_every_model_at_every_type(tmp_path, gguf_tokenizer, corpus):
    """compare --quantize: every model at every type, each file's perplexity and task score measured on its own
    weights, decode speed in llama.cpp, the report's section and plot; a resumed compare reuses its rows."""
    from transact.jobs.compare import CompareJob
    from transact.jobs.compare import run as run_compare
    from transact.jobs.eval import EvalJob

    dense = tmp_path / "dense"
    tiny_model("llama", heads=4, kv_heads=2, hidden=64, mlp=96, vocab_size=VOCAB).save_pretrained(dense)
    gguf_tokenizer.save_pretrained(dense)
    _pruned_checkpoint(tmp_path / "pruned", "llama", "gqa", gguf_tokenizer)
    text = tmp_path / "heldout.txt"
    text.write_text("\n\n".join(corpus))
    job = CompareJob(models=(str(dense), str(tmp_path / "pruned")), out=str(tmp_path / "c"),
                     eval=EvalJob(model="", texts=(str(text),), windows=(64,), tokens=512, tasks=("piqa",), limit=4,
                                  progress=False),
                     grid=BenchGrid(batches=(1,), contexts=(16,), gen=4, repeats=1, warmup=0), quantize=("f32", "q8_0"))
    report = run_compare(job).report.read_text()
    saved = json.loads((tmp_path / "c" / "quantized.json").read_text())
    assert sorted((r["model"], r["type"]) for r in saved["rows"]) == [
        ("dense", "f32"), ("dense", "q8_0"), ("pruned", "f32"), ("pruned", "q8_0")]
    eval_ppl = {m: json.loads((tmp_path / "c" / "eval" / f"{m}.json").read_text())["perplexity"]
                for m in ("dense", "pruned")}
    for row in saved["rows"]:
        assert row["decode_tokens_per_s"] > 0
        assert 0 <= row["tasks"]["piqa"]["score"] <= 1  # PIQA on the file's own weights
        # an f32 file holds the checkpoint's weights exactly: the same perplexity as the checkpoint's own eval
        if row["type"] == "f32":
            (only,) = eval_ppl[row["model"]].values()
            assert row["perplexity"] == pytest.approx(only["perplexity"], rel=1e-5)
    assert "## Prune or quantize" in report and "![prune or quantize](quantized.png)" in report
    assert report.count("- `pruned`") == 2
    assert (tmp_path / "c" / "quantized.png").read_bytes()[:4] == b"\x89PNG"
    first = {(r["model"], r["type"]): r["perplexity"] for r in saved["rows"]}
    again = run_compare(CompareJob(**{**job.__dict__, "resume": True}))
    assert again.report.read_text() == report
    assert {(r["model"], r["type"]): r["perplexity"] for r in json.loads(
        (tmp_path / "c" / "quantized.json").read_text())["rows"]} == first
    with pytest.raises(TransactError, match="needs held-out --text"):
        CompareJob(models=("a", "b"), out="x", eval=EvalJob(model="", texts=(), tasks=("piqa",)), quantize=("q4_0",))
    with pytest.raises(TransactError, match="q4_k_z"):
        CompareJob(models=("a", "b"), out="x", eval=EvalJob(model=""), quantize=("q4_k_z",))


def test_prune_or_quantize_verdicts():
    """A pruned file loses where a file of the reference is no larger and no worse (hand-made rows)."""
    from transact.measure.quantized import verdicts

    rows = [{"model": "dense", "type": "q8_0", "file_bytes": 100e6, "perplexity": 10.0},
            {"model": "dense", "type": "q4_0", "file_bytes": 60e6, "perplexity": 12.0},
            {"model": "p", "type": "q8_0", "file_bytes": 70e6, "perplexity": 13.0},
            {"model": "p", "type": "q4_0", "file_bytes": 40e6, "perplexity": 15.0}]
    assert verdicts(rows, "dense") == [
        "- `p` q4_0 (40.0 MB, perplexity 15.00): **no file of `dense` is as small and as good**",
        "- `p` q8_0 (70.0 MB, perplexity 13.00): loses to `dense` q4_0 (60.0 MB, perplexity 12.00), smaller and better"]


def test_bench_llamacpp_bad_inputs(tmp_path):
    with pytest.raises(TransactError, match="unknown engine"):
        BenchJob(models=("x",), engine="tensorrt")
    with pytest.raises(TransactError, match="--outtype"):
        BenchJob(models=("x",), engine="llama.cpp", outtypes=("q4_k_z",))


def test_quantized_widths_and_their_fallbacks():
    from transact.arch import ModelShape
    from transact.deploy import quantize, vllm

    # llama.cpp's rule (llama-quant.cpp): a 256-block type falls back to its 32-block partner, else F16
    assert [quantize.fallback_of("q4_k_m", w) for w in (1024, 576, 1000)] == ["", "Q5_0", "F16"]
    assert [quantize.fallback_of("q6_k", 384), quantize.fallback_of("iq4_xs", 384)] == ["Q8_0", "IQ4_NL"]
    assert [quantize.fallback_of("q4_0", w) for w in (384, 1000)] == ["", "F16"]
    assert quantize.fallback_of("f16", 1000) == ""
    smol_pruned = ModelShape("llama", 30, 576, 6, 2, 64, 1000)
    widths = quantize.matrix_widths(smol_pruned)
    assert widths == {quantize.HIDDEN_MATRICES: 576, "blk.*.attn_output": 384, "blk.*.ffn_down": 1000}
    warned = quantize.width_warnings(widths, "q4_k_m")
    assert [(w.tensor, w.fallback) for w in warned] == [(quantize.HIDDEN_MATRICES, "Q5_0"),
                                                        ("blk.*.attn_output", "Q5_0"), ("blk.*.ffn_down", "F16")]
    assert "--multiple-of 256" in str(warned[1]) and "never pruned" in str(warned[0])
    notes = quantize.fit_notes({"blk.*.attn_output": 384, "blk.*.ffn_down": 1000, "x": 1024})
    assert len(notes) == 2 and "q4_k_m: Q5_0, q6_k: Q8_0" in notes[0] and "stores it in F16" in notes[1]
    assert notes[0].startswith("llama.cpp: blk.*.attn_output has input width 384, not a multiple of 256: ")
    # a per-layer search's widths are multiples of its step: with a step of 128 some layers may fall back
    stepped = quantize.fit_notes({"blk.*.ffn_down": 128}, ["blk.*.ffn_down"])
    assert stepped == ["llama.cpp: blk.*.ffn_down has per-layer input widths in steps of 128: in a layer whose "
                       "width is not a multiple of 256 the K-quants store it in their fallback type (q4_k_m: Q5_0, "
                       "q6_k: Q8_0)"]
    assert quantize.fit_notes({"blk.*.ffn_down": 256}, ["blk.*.ffn_down"]) == []
    assert vllm.head_size_note(smol_pruned) is None
    assert "head_dim 48" in vllm.head_size_note(ModelShape("llama", 2, 96, 2, 2, 48, 64))
    assert vllm.marlin_note({"a": 384, "b": 1000}) == ("vLLM: 4-bit Marlin kernels need input widths divisible by 128, "
                                                       "not so: b 1000")


def test_multiple_of_takes_a_count_or_a_llamacpp_type():
    import argparse

    from transact.cli.args import multiple_of

    assert [multiple_of(t) for t in ("q4_k_m", "Q6_K", "q4_0", "q8_0", "64")] == [256, 256, 32, 32, 64]
    for bad in ("0", "q4_z", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            multiple_of(bad)


@pytest.fixture(scope="module")
def quantizable(tmp_path_factory, gguf_tokenizer):
    """A tiny pruned Llama whose every matrix takes a 256-block type (hidden 256, heads 4 x 64, MLP 256)."""
    path = tmp_path_factory.mktemp("quantizable") / "model"
    model = tiny_model("llama", heads=8, kv_heads=4, hidden=256, mlp=512, vocab_size=VOCAB, head_dim=64)
    plan = random_plan(model, 4, 2, 256)
    prune_(model, plan)
    write_checkpoint(model, gguf_tokenizer, path, plan=plan, report={}, save_dtype=torch.float32)
    return path, model


def test_quantized_export_is_checked_against_the_files_own_weights(tmp_path, quantizable):
    """q4_k_m through llama.cpp's own quantizer: every matrix Q4_K/Q6_K (no fallback at these widths), llama.cpp
    agrees with transformers running the file's dequantized weights, and the tensors are within 4-bit rounding
    of the checkpoint's; guided by an importance matrix it is written as well."""
    path, _ = quantizable
    result = run_gguf_export(GgufExportJob(str(path), str(tmp_path / "m.gguf"), "q4_k_m", new_tokens=8,
                                           progress=False, imatrix="builtin", imatrix_chunks=2))
    check = result["verification"]
    assert check["ok"] and check["reference"] == "the file's dequantized weights"
    assert 0.01 < check["worst_weight_error"] < 0.2  # rounded, but not another tensor
    assert result["fallbacks"] == [] and result["quantized_from"] == "f32" and result["imatrix_chunks"] == 2
    assert set(result["summary"]["matrix_types"]) <= {"Q4_K", "Q6_K"} and "Q4_K" in result["summary"]["matrix_types"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no intermediate file left behind
    assert "without an importance matrix" not in result.summary()


def test_a_file_quantized_without_an_importance_matrix_says_so(tmp_path, quantizable):
    path, _ = quantizable
    result = run_gguf_export(GgufExportJob(str(path), str(tmp_path / "m.gguf"), "q4_0", new_tokens=4, progress=False,
                                           imatrix="none"))
    assert result["verification"]["ok"] and "note: quantized without an importance matrix" in result.summary()
    assert "imatrix" not in result and "imatrix_chunks" not in result
    # the default guides the quantizer by the built-in calibration text, and says so
    guided = run_gguf_export(GgufExportJob(str(path), str(tmp_path / "g.gguf"), "q4_0", new_tokens=4,
                                           progress=False, imatrix_chunks=2))
    assert guided["imatrix"] == "builtin" and guided["imatrix_chunks"] == 2 and guided["verification"]["ok"]
    assert "(q4_0, importance matrix over builtin)" in guided.summary() and "note:" not in guided.summary()
    assert (tmp_path / "g.gguf").read_bytes() != (tmp_path / "m.gguf").read_bytes()
    unquantized = run_gguf_export(GgufExportJob(str(path), str(tmp_path / "f.gguf"), "f16", new_tokens=4,
                                                progress=False))
    assert "importance matrix" not in unquantized.summary()
    # q8_0 of per-layer widths goes through the quantizer too, but takes no --imatrix: no note
    header = {"architecture": "deci", "head_count": 4, "head_count_kv": 2, "key_length": 64, "file_bytes": 1}
    per_layer_q8 = transact.jobs.export.ExportResult({"out": "m.gguf", "outtype": "q8_0", "quantized_from": "f32",
                                                      "summary": header})
    assert "importance matrix" not in per_layer_q8.summary()


def test_compare_quantize_with_an_importance_matrix(tmp_path, quantizable, corpus):
    """compare --quantize --imatrix: the quantizer's files are guided (another file than unguided), f16 is not,
    the report says so, and a resumed compare does not reuse rows written with another importance matrix."""
    from transact.jobs.compare import CompareJob
    from transact.jobs.compare import run as run_compare
    from transact.jobs.eval import EvalJob

    path, _ = quantizable
    text = tmp_path / "heldout.txt"
    text.write_text("\n\n".join(corpus))
    job = CompareJob(models=(str(path), str(path)), out=str(tmp_path / "c"),
                     eval=EvalJob(model="", texts=(str(text),), windows=(64,), tokens=256, progress=False),
                     grid=BenchGrid(batches=(1,), contexts=(16,), gen=2, repeats=1, warmup=0),
                     quantize=("f16", "q4_0"), imatrix="none")
    run_compare(job)
    unguided = (tmp_path / "c" / "gguf" / "model.q4_0.gguf").read_bytes()
    guided_job = CompareJob(**{**job.__dict__, "resume": True, "imatrix": str(text)})
    report = run_compare(guided_job).report.read_text()
    rows = {(r["model"], r["type"]): r for r in json.loads((tmp_path / "c" / "quantized.json").read_text())["rows"]}
    assert rows["model", "q4_0"]["imatrix"] == str(text) and rows["model", "f16"]["imatrix"] is None
    assert (tmp_path / "c" / "gguf" / "model.q4_0.gguf").read_bytes() != unguided  # written again, guided
    assert f"guided by an importance matrix over `{text}`" in report
    with pytest.raises(TransactError, match="give --quantize one of its types"):
        CompareJob(**{**job.__dict__, "quantize": ("f16", "q8_0"), "imatrix": "builtin"})
    with pytest.raises(TransactError, match="--imatrix text"):
        CompareJob(**{**job.__dict__, "imatrix": str(tmp_path / "absent.txt")})


def test_a_corrupted_quantized_file_is_refused(tmp_path, quantizable, gguf_tokenizer):
    """Both halves of the check catch a wrong file: tensors swapped between layers (the weights are no longer
    the checkpoint's), and a wrong hyper-parameter in the metadata (llama.cpp no longer computes what the
    weights say)."""
    from gguf import GGUFReader

    from transact.deploy.agreement import quantized_reference

    path, model = quantizable
    good = tmp_path / "good.gguf"
    quantize.write_gguf(path, good, "q4_k_m", progress=False)
    swapped, renormed = tmp_path / "swapped.gguf", tmp_path / "renormed.gguf"
    shutil.copy(good, swapped)
    shutil.copy(good, renormed)
    reader = GGUFReader(swapped, "r+")
    up = {t.name: t for t in reader.tensors if t.name.endswith("ffn_up.weight")}
    first, second = up["blk.0.ffn_up.weight"].data, up["blk.1.ffn_up.weight"].data
    kept = first.copy()
    first[...] = second
    second[...] = kept
    del reader
    with pytest.raises(TransactError, match="does not hold this model's weights: 2 tensor"):
        quantized_reference(swapped, model, "q4_k_m")

    reader = GGUFReader(renormed, "r+")
    field = reader.get_field("llama.attention.layer_norm_rms_epsilon")
    field.parts[field.data[0]][...] = 1.0  # the model's norms divide by sqrt(mean square + 1e-6)
    del reader
    reference, _ = quantized_reference(renormed, model, "q4_k_m")
    assert compare_predictions(good, reference, gguf_tokenizer, "q4_k_m", new_tokens=8)["ok"]
    check = compare_predictions(renormed, reference, gguf_tokenizer, "q4_k_m", new_tokens=8)
    assert not check["ok"] and check["mean_logprob_diff"] > check["mean_tolerance"]


def test_quantizer_tools_refusals(tmp_path, monkeypatch):
    monkeypatch.setenv(quantize.TOOLS_ENV, str(tmp_path))
    with pytest.raises(TransactError, match="holds no llama-quantize, llama-imatrix"):
        quantize.tools_dir(progress=False)
    monkeypatch.delenv(quantize.TOOLS_ENV)
    monkeypatch.setenv("TRANSACT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(quantize.shutil, "which", lambda name: None)
    with pytest.raises(TransactError, match="needs cmake and a C\\+\\+ compiler"):
        quantize.tools_dir(progress=False)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(TransactError, match=r"not a llama\.cpp quantization type"):
        quantize.quantize(tmp_path / "in.gguf", tmp_path / "out.gguf", "f16")


def test_quantizer_fallbacks_are_summarized_by_type():
    from transact.jobs.export import _fallback_counts

    line = "warning: blk.{i}.{t} - ncols 576 not divisible by 256 (required for type    {a}) -> falling back to    {b}"
    lines = [line.format(i=i, t="ffn_up", a="q4_K", b="q5_0") for i in range(3)]
    lines.append(line.format(i=0, t="attn_v", a="q6_K", b="q8_0"))
    assert _fallback_counts(lines) == "q4_K -> q5_0: 3, q6_K -> q8_0: 1"


def _per_layer_checkpoint(path: Path, tokenizer, qkv_bias: bool, tie: bool,
                          widths: tuple = ((1, 40), (2, 96), (2, 24))) -> list[tuple[int, int]]:
    """A tiny checkpoint in the DeciLM layout transact writes for per-layer widths, random weights: 2 query
    heads of 16 (so heads x head_dim is not the hidden size 64, as after pruning heads), its layers of other
    KV-head counts (0: no attention) and MLP widths (0: no MLP); -> the (KV heads, MLP width) of each layer."""
    from transact.decilm.configuration_decilm import DeciLMConfig
    from transact.decilm.modeling_decilm import DeciLMForCausalLM
    from transact.io.per_layer import AUTO_MAP, attention_block, copy_code, ffn_block

    widths = list(widths)
    blocks = [{"attention": attention_block(2, kv), "ffn": ffn_block(mlp, 64)} for kv, mlp in widths]
    config = DeciLMConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=len(widths), num_attention_heads=2,
                          head_dim=16, num_key_value_heads=2, intermediate_size=96, block_configs=blocks,
                          qkv_bias=qkv_bias,
                          tie_word_embeddings=tie, rms_norm_eps=1e-5, architectures=["DeciLMForCausalLM"],
                          auto_map=dict(AUTO_MAP), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = DeciLMForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.15)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    copy_code(path)
    return widths


@pytest.mark.parametrize(("qkv_bias", "tie"), [(False, False), (True, True)], ids=["llama", "qwen2-tied"])
def test_per_layer_widths_export_as_deci_and_agree(tmp_path, gguf_tokenizer, qkv_bias, tie):
    """Per-layer KV heads and MLP widths (with Qwen2's q/k/v biases, tied embeddings) reach llama.cpp as its
    deci architecture, whose predictions match transformers' through the project's own modeling file."""
    from gguf import GGUFReader

    widths = _per_layer_checkpoint(tmp_path / "model", gguf_tokenizer, qkv_bias, tie)
    result = run_gguf_export(GgufExportJob(str(tmp_path / "model"), str(tmp_path / "m.gguf"), "f32", new_tokens=8,
                                           progress=False))
    check = result["verification"]
    assert check["ok"] and check["steps"] == 32 and check["agree"] >= 30
    assert check["max_margin"] < 0.005 and check["max_logprob_diff"] < 0.01
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.get_field("general.architecture").contents() == "deci"
    assert reader.get_field("deci.feed_forward_length").contents() == [w for _, w in widths]
    assert reader.get_field("deci.attention.head_count_kv").contents() == [kv for kv, _ in widths]
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert [shapes[f"blk.{i}.ffn_down.weight"] for i in range(3)] == [(w, 64) for _, w in widths]
    assert [shapes[f"blk.{i}.attn_k.weight"] for i in range(3)] == [(64, 16 * kv) for kv, _ in widths]
    assert ("blk.0.attn_q.bias" in shapes) == qkv_bias and "blk.0.attn_output.bias" not in shapes
    assert ("output.weight" in shapes) != tie
    assert "deci, 2 heads / 1-2 (per layer) KV heads x 16" in result.summary()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "model"]  # no temporary left behind


def _exported_agreeing(tmp_path: Path, tokenizer, qkv_bias: bool, widths: tuple):
    """The per-layer checkpoint of ``widths`` (``_per_layer_checkpoint``) exported to f32 GGUF, llama.cpp's
    predictions checked to agree with transformers'; -> the file's reader."""
    from gguf import GGUFReader

    _per_layer_checkpoint(tmp_path / "model", tokenizer, qkv_bias, tie=False, widths=widths)
    result = run_gguf_export(GgufExportJob(str(tmp_path / "model"), str(tmp_path / "m.gguf"), "f32", new_tokens=8,
                                           progress=False))
    check = result["verification"]
    assert check["ok"] and check["agree"] >= 30 and check["max_logprob_diff"] < 0.01
    return GGUFReader(str(tmp_path / "m.gguf"))


@pytest.mark.parametrize("qkv_bias", [False, True], ids=["llama", "qwen2"])
def test_layers_without_attention_export_as_deci_and_agree(tmp_path, gguf_tokenizer, qkv_bias):
    """Dropped attention (``attention.no_op``) reaches llama.cpp's deci as a layer of 0 heads with no attention
    tensors; llama.cpp predicts what transformers does, and llama-quantize writes its q8_0 file."""
    from gguf import GGUFReader

    reader = _exported_agreeing(tmp_path, gguf_tokenizer, qkv_bias, ((2, 64), (0, 96), (1, 64), (0, 32)))
    assert reader.get_field("deci.attention.head_count").contents() == [2, 0, 2, 0]
    assert reader.get_field("deci.attention.head_count_kv").contents() == [2, 0, 1, 0]
    names = {t.name for t in reader.tensors}
    assert not [n for n in names if n.startswith(("blk.1.attn", "blk.3.attn"))]
    assert {"blk.0.attn_norm.weight", "blk.2.attn_output.weight", "blk.1.ffn_down.weight"} <= names
    assert ("blk.2.attn_q.bias" in names) == qkv_bias
    quantize.write_gguf(tmp_path / "model", tmp_path / "q.gguf", "q8_0", progress=False)
    assert GGUFReader(str(tmp_path / "q.gguf")).get_field("deci.attention.head_count").contents() == [2, 0, 2, 0]


def test_layers_without_mlp_export_as_deci_with_a_zero_mlp_and_agree(tmp_path, gguf_tokenizer):
    """Dropped MLPs (``ffn.no_op``, the last layer's too) reach llama.cpp's deci as an MLP of 32 zero channels
    (its graph skips the rest of a layer of MLP width 0, the attention's output with it); llama.cpp predicts
    what transformers does, and llama-quantize writes its q8_0 file."""
    from gguf import GGUFReader

    from transact.deploy.deci_gguf import NO_OP_MLP_WIDTH

    reader = _exported_agreeing(tmp_path, gguf_tokenizer, True, ((2, 64), (2, 0), (1, 64), (2, 0)))
    assert reader.get_field("deci.feed_forward_length").contents() == [64, NO_OP_MLP_WIDTH, 64, NO_OP_MLP_WIDTH]
    tensors = {t.name: t for t in reader.tensors}
    for name in ("blk.1.ffn_gate.weight", "blk.1.ffn_up.weight", "blk.3.ffn_down.weight"):
        assert NO_OP_MLP_WIDTH in tensors[name].shape and not tensors[name].data.any()
    assert tensors["blk.3.ffn_norm.weight"].data.tolist() == [1.0] * 64
    quantize.write_gguf(tmp_path / "model", tmp_path / "q.gguf", "q8_0", progress=False)
    assert GGUFReader(str(tmp_path / "q.gguf")).get_field("deci.feed_forward_length").contents()[1] == NO_OP_MLP_WIDTH


def test_per_layer_widths_refuse_what_cannot_be_checked(tmp_path, gguf_tokenizer):
    _per_layer_checkpoint(tmp_path / "model", gguf_tokenizer, qkv_bias=False, tie=False)
    with pytest.raises(TransactError, match="transformers cannot read back to check"):
        run_gguf_export(GgufExportJob(str(tmp_path / "model"), str(tmp_path / "m.gguf"), "q4_0", progress=False))
    with pytest.raises(TransactError, match="per-layer widths convert to f32, f16, bf16"):
        llamacpp.convert(tmp_path / "model", tmp_path / "m.gguf", "q8_0", progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_per_layer_q8_0_is_made_by_the_quantizer(tmp_path, gguf_tokenizer):
    """q8_0 of per-layer widths (``transact bench --engine llama.cpp``'s second default type): the converter
    cannot write it for the deci rewrite, so llama-quantize rounds the unquantized deci file; each layer keeps
    its widths, and the widths that are no multiple of 32 stay unquantized (llama.cpp's fallback)."""
    from gguf import GGMLQuantizationType, GGUFReader

    widths = _per_layer_checkpoint(tmp_path / "model", gguf_tokenizer, qkv_bias=False, tie=False)
    done = quantize.write_gguf(tmp_path / "model", tmp_path / "m.gguf", "q8_0", progress=False)
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.get_field("general.architecture").contents() == "deci"
    assert reader.get_field("deci.feed_forward_length").contents() == [w for _, w in widths]
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.1.ffn_down.weight"] == GGMLQuantizationType.Q8_0  # width 96
    assert types["blk.0.ffn_down.weight"] != GGMLQuantizationType.Q8_0  # width 40: no multiple of 32
    assert done["quantized_from"] == "f32" and done["fallbacks"]
