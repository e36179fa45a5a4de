"""The offline teacher (``transact teach`` + ``training.kd.teacher_logits``) and top-k distillation: the
top-k loss and gradients against a hand-written reference at Qwen's vocabulary size, the files' round trip,
a run from stored logits equal to a run with the teacher in memory restricted to the same top k, resume
after an interruption, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_iterative import cli, recipe_dict, write_recipe

from transact.errors import TransactError
from transact.recipes import RunRecipe
from transact.recovery import loop
from transact.recovery import teacher as teacher_files
from transact.recovery.chunked import chunked_topk_distill_loss, final_hidden, teacher_topk
from transact.recovery.data import BlockStream

QWEN_VOCAB = 151_936
K = 8


def kd_recipe(root: Path, out: str, logits: str | None, **kd) -> dict:
    data = recipe_dict(root, out, method="kd", tokens_per_shot=2048, final_tokens=1024, lr=3e-3)
    data["training"]["kd"] = {"teacher_logits": None if logits is None else str(root / logits), **kd}
    return data


# ---------------------------------------------------------------- the loss

@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_topk_loss_and_gradients_equal_a_hand_written_reference_at_qwens_vocabulary(chunk):
    """KL(q || s) over the teacher's k tokens, q renormalised over them at temperature T, s the student's
    full-vocabulary log-softmax at T gathered there; plus lm_weight x CE. Chunks split rows, span rows, and
    hold everything."""
    gen = torch.Generator().manual_seed(0)
    batch, length, width, t, w = 2, 9, 16, 2.0, 0.5
    head = torch.nn.Linear(width, QWEN_VOCAB, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen))
    hidden = torch.randn(batch, length, width, generator=gen, requires_grad=True)
    teacher_logits = torch.randn(batch, length, QWEN_VOCAB, generator=gen) * 3
    top, indices = F.log_softmax(teacher_logits, -1).topk(K, -1)
    logprobs = top.half()
    ids = torch.randint(0, QWEN_VOCAB, (batch, length), generator=gen)

    log_q = F.log_softmax(logprobs.float() / t, -1)
    log_s = F.log_softmax(head(hidden) / t, -1).gather(-1, indices)
    kl = (log_q.exp() * (log_q - log_s)).sum(-1).mean() * t * t
    ce = F.cross_entropy(head(hidden)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    expected = kl + w * ce
    expected.backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None

    got, got_ce = chunked_topk_distill_loss(hidden, indices, logprobs, ids, head, temperature=t, lm_weight=w,
                                            chunk=chunk)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_ce, ce, rtol=1e-5, atol=1e-5)
    # the 151,936-term softmax sums in another order chunk by chunk: 1.6e-4 relative seen on an AMD EPYC CPU
    torch.testing.assert_close(hidden.grad, grads[0], rtol=5e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, grads[1], rtol=1e-4, atol=1e-7)


def test_teacher_topk_by_hand():
    """Three positions over a 5-token vocabulary, k = 2: indices by descending probability, fp16 log-probs,
    and the summed probability outside."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [4.0, 0.0, 0.5, 0.2, 0.1], [1.0, 1.5, 1.2, 1.1, 2.0]])
    indices, logprobs, tail = teacher_topk(logits, lambda h: h, 2, chunk=2)
    assert indices.tolist() == [[4, 3], [0, 2], [4, 1]]
    p = F.softmax(logits, -1)
    assert logprobs.dtype == torch.float16
    torch.testing.assert_close(logprobs.float(), p.gather(-1, indices).log(), rtol=0, atol=2e-3)
    assert tail == pytest.approx((1 - p.gather(-1, indices).sum(-1)).sum().item(), abs=1e-5)


# ---------------------------------------------------------------- transact teach and the run

def test_teach_writes_the_runs_blocks_and_the_run_equals_online_top_k(workdir):
    """transact teach writes exactly the blocks the run consumes (3 phases x 8 steps x 4 blocks) with the
    teacher's top k; a run reading them trains to the same weights and losses as a run with the teacher in
    memory restricted to the same k."""
    recipe = write_recipe(workdir, "teach", kd_recipe(workdir, "offline", "logits"))
    done = cli("teach", str(recipe), "--k", str(K), "--quiet")
    assert done.returncode == 0, done.stderr
    assert "bytes per token" in done.stdout and "KL(top-k renormalised || full)" in done.stdout
    meta = json.loads((workdir / "logits" / "teacher.json").read_text())
    assert meta["blocks"] == (8 + 8 + 4) * 4 and meta["k"] == K and meta["bytes_per_token"] == 4 + 6 * K
    assert 0 < meta["tail_mass"]["mean"] <= meta["tail_mass"]["max"] < 1
    assert meta["heldout"]["kl_topk_vs_full"] > 0 and not (workdir / "logits" / "progress.json").exists()

    shard = load_file(workdir / "logits" / "shard-00000.safetensors")
    assert shard["ids"].shape == (80, 64) and shard["indices"].shape == (80, 64, K)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(workdir / "model").eval()
    stream = BlockStream(AutoTokenizer.from_pretrained(workdir / "model"), str(workdir / "train.txt"), 64, 0, 256)
    blocks = stream.take(4)
    assert torch.equal(shard["ids"][:4].long(), blocks)
    with torch.no_grad():
        hidden = final_hidden(model, blocks).reshape(4 * 64, -1)
    indices, logprobs, _ = teacher_topk(hidden, lambda h: model.lm_head(h), K, chunk=10_000)
    assert torch.equal(shard["indices"][:4].reshape(-1, K).long(), indices)
    torch.testing.assert_close(shard["logprobs"][:4].reshape(-1, K), logprobs, rtol=0, atol=1e-3)

    offline = loop.run(RunRecipe.from_dict(kd_recipe(workdir, "offline", "logits")), progress=False)
    online = loop.run(RunRecipe.from_dict(kd_recipe(workdir, "online", None, top_k=K)), progress=False)
    a, b = load_file(offline.out / "model.safetensors"), load_file(online.out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [r["loss"] for r in json.loads((offline.out / "losses.json").read_text())]
    lb = [r["loss"] for r in json.loads((online.out / "losses.json").read_text())]
    assert la == lb and la[-1] < la[0]
    assert offline.report["teacher_logits"]["k"] == K and online.report["teacher_logits"] is None
    assert offline.report["memory_estimate"]["teacher"] == 0 < online.report["memory_estimate"]["teacher"]


def test_an_interrupted_teach_resumes_to_the_same_files(workdir, monkeypatch):
    monkeypatch.setattr(teacher_files, "SHARD_BLOCKS", 16)
    data = kd_recipe(workdir, "unused", "whole")
    loop.teach(RunRecipe.from_dict(data), k=K, progress=False)

    taken = {"n": 0}
    original = BlockStream.take

    def take_then_fail(self, count):
        taken["n"] += 1
        if taken["n"] > 9:  # two shards of 16 blocks done (4 blocks a batch), the third half-written
            raise KeyboardInterrupt
        return original(self, count)

    data = kd_recipe(workdir, "unused", "cut")
    monkeypatch.setattr(BlockStream, "take", take_then_fail)
    with pytest.raises(KeyboardInterrupt):
        loop.teach(RunRecipe.from_dict(data), k=K, progress=False)
    monkeypatch.setattr(BlockStream, "take", original)
    cut = workdir / "cut"
    assert sorted(p.name for p in cut.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(TransactError, match=r"not empty.*--resume"):
        loop.teach(RunRecipe.from_dict(data), k=K, progress=False)
    with pytest.raises(TransactError, match=r"holds no teacher\.json.*--resume"):
        teacher_files.OfflineTeacher.open(cut)
    with pytest.raises(TransactError, match="other settings"):
        loop.teach(RunRecipe.from_dict(data), k=K + 1, resume=True, progress=False)
    loop.teach(RunRecipe.from_dict(data), k=K, resume=True, progress=False)
    whole = workdir / "whole"
    names = sorted(p.name for p in whole.glob("shard-*"))
    assert names == sorted(p.name for p in cut.glob("shard-*")) and len(names) == 5
    for name in names:
        x, y = load_file(whole / name), load_file(cut / name)
        assert all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(TransactError, match="already holds finished"):
        loop.teach(RunRecipe.from_dict(data), k=K, resume=True, progress=False)


def test_stored_logits_that_do_not_fit_the_run_are_refused_before_loading(workdir):
    """Another stream, too few blocks, another k, a missing directory, a recipe that is not distillation."""
    logits = workdir / "small"
    data = kd_recipe(workdir, "small-out", "small")
    data["training"]["final_tokens"] = 0
    loop.teach(RunRecipe.from_dict(data), k=K, progress=False)
    assert json.loads((logits / "teacher.json").read_text())["blocks"] == 64

    def refused(match: str, **changes):
        bad = kd_recipe(workdir, "refused", "small")
        bad["training"]["final_tokens"] = 0
        for key, value in changes.items():
            (bad["training"]["kd"] if key in ("top_k", "teacher_logits") else bad["training"])[key] = value
        with pytest.raises(TransactError, match=match):
            loop.run(RunRecipe.from_dict(bad), progress=False)
        assert not (workdir / "refused").exists()

    refused(r"holds 64 blocks, the run needs 80", final_tokens=1024)
    refused(r"another training stream: seed 0 \(the recipe: 1\)", seed=1)
    refused(r"top_k is 4, but .* holds the top 8", top_k=4)
    refused("holds no teacher.json", teacher_logits=str(workdir / "nowhere"))
    plain = kd_recipe(workdir, "x", "small")
    plain["training"]["method"] = "full"
    with pytest.raises(TransactError, match=r"training\.method: kd and training\.kd\.teacher_logits"):
        loop.teach(RunRecipe.from_dict(plain), k=K, progress=False)
    with pytest.raises(TransactError, match="not empty"):
        loop.teach(RunRecipe.from_dict(data), k=K, progress=False)
