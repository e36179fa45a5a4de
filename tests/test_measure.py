"""eval / bench / compare jobs end to end on tiny models saved to disk: results, resume, reports, errors."""

import json

import pytest
import torch
from tiny import char_tokenizer, random_plan, tiny_model

import transact.jobs.eval
import transact.measure.tasks
from transact.arch import shape_of
from transact.cli import main
from transact.core.surgery import prune_
from transact.errors import TransactError
from transact.io.models import load_model, prepare_model
from transact.jobs.eval import EvalJob
from transact.jobs.eval import run as run_eval
from transact.measure import bench, costs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _save(model, path):
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dense_and_pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    model = tiny_model("llama", heads=4, kv_heads=2, hidden=64, mlp=96)
    dense = _save(model, root / "dense")
    prune_(model, random_plan(model, 2, 1, 48))
    return dense, _save(model, root / "pruned")


@pytest.fixture
def text_file(tmp_path, corpus):
    path = tmp_path / "heldout.txt"
    path.write_text("\n\n".join(corpus[:4]))
    return path


def test_eval_resumes_from_finished_parts(tmp_path, dense_and_pruned, text_file, monkeypatch):
    dense, _ = dense_and_pruned
    out = tmp_path / "eval.json"
    job = EvalJob(model=str(dense), texts=(str(text_file),), windows=(64,), tokens=500, tasks=("piqa", "boolq"),
                  limit=2, out=str(out), progress=False)
    first = run_eval(job)
    assert set(first["tasks"]) == {"piqa", "boolq"} and first["throughput"]["ratio"] > 0

    # Interrupted after piqa: boolq missing. A resumed run keeps piqa as written and redoes boolq only.
    partial = json.loads(out.read_text())
    del partial["tasks"]["boolq"]
    partial["tasks"]["piqa"]["score"] = 0.123  # marker: must survive the resume untouched
    out.write_text(json.dumps(partial))
    ran = []
    real = transact.measure.tasks.run_tasks

    def spy(model, tokenizer, names, **kwargs):
        ran.extend(n for n in names if n not in kwargs["done"])
        return real(model, tokenizer, names, **kwargs)

    monkeypatch.setattr(transact.measure.tasks, "run_tasks", spy)
    with pytest.raises(TransactError, match="exists; pass --resume"):
        run_eval(job)
    resumed = run_eval(EvalJob(**{**job.__dict__, "resume": True}))
    assert ran == ["boolq"]
    assert resumed["tasks"]["piqa"]["score"] == 0.123
    assert resumed["tasks"]["boolq"]["metrics"]["acc"] == first["tasks"]["boolq"]["metrics"]["acc"]
    assert resumed["perplexity"] == first["perplexity"]
    with pytest.raises(TransactError, match="other settings"):
        run_eval(EvalJob(**{**job.__dict__, "resume": True, "limit": 3}))


def test_eval_bad_input_fails_before_loading_and_writes_nothing(tmp_path, dense_and_pruned, capsys, monkeypatch):
    dense, _ = dense_and_pruned

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was validated")

    monkeypatch.setattr(transact.jobs.eval, "load_model", refuse)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    out = tmp_path / "r.json"
    cases = [
        (["eval", str(dense), "--tasks", "piqa,mmluu"], "unknown task 'mmluu'"),
        (["eval", str(dense), "--tasks", "paper,logiqa"], "--task-data hub"),
        (["eval", str(tmp_path / "nope"), "--tasks", "piqa"], "does not exist"),
        (["eval", str(dense), "--text", str(empty)], "contains no text"),
        (["eval", str(dense), "--tasks", "piqa", "--shots", "x"], "--shots"),
        (["eval", str(dense), "--tasks", "piqa", "--limit", "0"], "--limit"),
        (["eval", str(dense), "--windows", "1024,abc"], "--windows"),
        (["eval", str(dense), "--text", "none"], "nothing to evaluate"),
        (["eval", str(dense), "--resume"], "--resume needs --json"),
        (["bench", str(dense), "--batch", "0"], "--batch"),
        (["bench", str(dense), str(tmp_path / "nope")], "does not exist"),
        (["compare", str(dense), "--out", str(tmp_path / "c")], "at least one other"),
    ]
    for argv, message in cases:
        assert main([*argv, "--json", str(out)] if argv[0] == "eval" and "--resume" not in argv else argv) == 2
        assert message in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "c").exists()


def test_bench_rows_ratios_and_analytic_costs(dense_and_pruned):
    dense, pruned = (load_model(prepare_model(str(p), "cpu", "float32"))[0] for p in dense_and_pruned)
    grid = bench.BenchGrid(batches=(1, 2), contexts=(16,), gen=3, repeats=2, warmup=0)
    rows = bench.add_ratios(bench.run_grid({"dense": dense, "pruned": pruned}, grid, progress=False), "dense")
    assert [(r["model"], r["batch"]) for r in rows] == [("dense", 1), ("pruned", 1), ("dense", 2), ("pruned", 2)]
    for r in rows:
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["repeats"] == 2
        if r["model"] == "dense":
            assert r["prefill_speedup"] == r["decode_speedup"] == r["prefill_speedup_analytic"] == 1.0
    pruned_row = rows[3]
    assert pruned_row["prefill_flops"] == costs.prefill_flops(shape_of(pruned), 16)
    kv = costs.kv_cache_bytes_per_token(shape_of(pruned), torch.float32)
    weights = sum(p.numel() * 4 for p in pruned.parameters())
    assert pruned_row["decode_bytes_per_step"] == weights + 2 * kv * (16 + 1)
    assert pruned_row["prefill_speedup_analytic"] == costs.prefill_flops(shape_of(dense), 16) / pruned_row[
        "prefill_flops"] > 1


def test_measure_once_decodes_with_the_cache_like_generate():
    """The timed decode loop produces the same greedy tokens as transformers' generate."""
    model = tiny_model("qwen2", heads=4, kv_heads=2)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    tokens = bench.measure_once(model, ids, gen=4)["tokens"]
    expected = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=1)[:, 10:]
    assert torch.equal(tokens, expected)


def test_compare_writes_report_and_plots(tmp_path, dense_and_pruned, text_file, capsys):
    dense, pruned = dense_and_pruned
    out = tmp_path / "report"
    argv = ["compare", str(dense), str(pruned), "--out", str(out), "--text", str(text_file), "--eval-tokens", "400",
            "--windows", "64,128", "--tasks", "piqa,mmlu", "--shots", "0", "--limit", "1", "--batch", "1",
            "--context", "16,32",
            "--gen", "2", "--repeats", "1", "--warmup", "0", "--quiet"]
    assert main(argv) == 0
    for name in ("flops_vs_context.png", "speed.png", "tasks.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    report = (out / "report.md").read_text()
    assert "| dense | 4/2/96 |" in report and "| pruned | 2/1/48 |" in report
    assert "piqa (acc_norm)" in report and "mmlu (acc)" in report and "ppl heldout.txt@128" in report
    assert "| model | MMLU | stem | humanities | social_sciences | other |" in report
    bench_result = json.loads((out / "bench.json").read_text())
    assert len(bench_result["rows"]) == 4 and bench_result["reference"] == "dense"
    pruned_eval = json.loads((out / "eval" / "pruned.json").read_text())
    assert pruned_eval["summary"]["heads"] == 2 and pruned_eval["tasks"]["piqa"]["items"] == 1
    assert pruned_eval["tasks"]["mmlu"]["items"] == 57 and len(pruned_eval["tasks"]["mmlu"]["categories"]) == 4
    assert main(argv) == 2 and "not empty" in capsys.readouterr().err  # never overwritten silently
    assert main([*argv, "--resume"]) == 0  # everything reused, report rewritten
