"""The CUDA path (calibration, surgery, export, the CLI with --device cuda) on tiny models.

Skipped where no GPU exists: CI machines have none, so these run only on a GPU machine
(`pytest tests/test_cuda.py`). The CPU suite covers the same logic; here the point is the device handling.
"""

import json

import pytest
import torch
from tiny import VOCAB, char_tokenizer, tiny_model
from transformers import AutoModelForCausalLM

from transact.cli import main
from transact.core.calibrate import calibrate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI machines have none")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_cuda_statistics_match_cpu(family):
    windows = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    cpu = calibrate(tiny_model(family), windows, progress=False)
    gpu_model = tiny_model(family).to("cuda")
    gpu = calibrate(gpu_model, windows, progress=False)
    assert all(t.device.type == "cpu" for t in gpu.attn["sum_sq"])
    for a, b in zip(cpu.attn["sum_sq"] + cpu.mlp["sum_sq"], gpu.attn["sum_sq"] + gpu.mlp["sum_sq"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # TF32/reduction order differ across devices


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_prune_on_cuda(tmp_path, corpus, dtype):
    base = tmp_path / "base"
    tiny_model("llama", heads=4, kv_heads=4).save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    out = tmp_path / "out"
    assert main(["prune", str(base), "--out", str(out), "--heads", "3", "--kv-heads", "3", "--mlp", "0.5",
                 "--calib", str(calib), "--samples", "8", "--seq-len", "64", "--device", "cuda", "--dtype", dtype,
                 "--eval-text", str(calib), "--eval-tokens", "512", "--window", "128", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["device"] == "cuda" and report["saved_as"] == "mistral"  # 3 heads do not divide 64
    reloaded = AutoModelForCausalLM.from_pretrained(out).to("cuda")
    ids = torch.randint(0, VOCAB, (1, 16), device="cuda")
    assert reloaded.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 20)
