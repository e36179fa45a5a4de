"""Gate-weighted or raw expert statistics? Evidence on a small mixture of experts trained here.

No mixture-of-experts weights are available offline, so this trains one from scratch on the offline
training text (Qwen3-MoE architecture with SmolLM2's tokenizer: 4 layers, hidden 256, 16 experts of 256
channels, 4 per token), then prunes copies of it with transact's metric measuring each expert's channels
on their router-weighted inputs (the default) or on their raw inputs (``--no-gate-weighting``), at several
expert widths and expert counts, with and without the refit, and scores held-out perplexity. A toy model:
the result is evidence about the choice at this scale, not about released MoE models.

    python benchmarks/moe_weighting.py [--steps 1200] [--out docs/bench/moe_weighting]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import torch
from common import machine, write_result

SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
             num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256, intermediate_size=1024,
             norm_topk_prob=True, max_position_embeddings=512, tie_word_embeddings=True)
WIDTHS = [(128, 16), (64, 16), (256, 8), (128, 8)]  # channels per expert, experts kept


def train(model, ids: torch.Tensor, steps: int, batch: int, seq: int, lr: float) -> list[float]:
    """AdamW over consecutive windows of ``ids`` (wrapping around), linear warm-up then cosine decay."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    windows = ids[: ids.numel() // seq * seq].view(-1, seq)
    losses, warm = [], max(1, steps // 20)
    model.train()
    for step in range(steps):
        scale = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        rows = torch.arange(step * batch, (step + 1) * batch) % len(windows)
        loss = model(input_ids=windows[rows], labels=windows[rows]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f}", file=sys.stderr, flush=True)
    model.eval()
    return losses


def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from transact.core.calibrate import collect_statistics, sample_windows
    from transact.core.step import prune_step
    from transact.io.models import smollm2_dir
    from transact.io.text import read_texts, token_stream
    from transact.measure.perplexity import heldout_perplexity
    from transact.recipes import HeldoutText, PruneRecipe
    from transact.recipes.text import Calibration

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--out", default="docs/bench/moe_weighting")
    args = ap.parse_args()

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    config = AutoConfig.for_model("qwen3_moe", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPE)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    train_ids = token_stream(tok, read_texts("builtin", builtin="training"),
                             limit=args.steps * args.batch * args.seq_len)
    t0 = time.perf_counter()
    losses = train(model, train_ids, args.steps, args.batch, args.seq_len, args.lr)
    train_seconds = time.perf_counter() - t0

    heldout = HeldoutText(tokens=args.eval_tokens, window=512)
    eval_ids = token_stream(tok, read_texts("builtin", builtin="heldout"), limit=args.eval_tokens)

    def ppl(m) -> float:
        return heldout_perplexity(m, eval_ids, heldout, progress=False).perplexity

    calibration = Calibration(samples=args.samples, seq_len=args.seq_len)
    texts = read_texts("builtin", builtin="calibration")
    windows = sample_windows(tok, texts, calibration.samples, calibration.seq_len, 0)
    rows = [{"variant": "dense", "perplexity": ppl(model)}]
    for mlp, experts in WIDTHS:
        for refit in (False, True):
            for weighted in (True, False):
                pruned = copy.deepcopy(model)
                recipe = PruneRecipe(mlp=mlp, experts=experts, gate_weighted=weighted, calibration=calibration,
                                     correctors=("refit",) if refit else ())
                stats = collect_statistics(pruned, windows, recipe.statistics, progress=False,
                                           gate_weighted=weighted)
                plan = prune_step(pruned, tok, recipe, statistics=stats, progress=False)
                rows.append({"mlp": mlp, "experts": experts, "refit": refit, "gate_weighted": weighted,
                             "perplexity": ppl(pruned), "dropped_routes": plan.dropped_expert_routes})
                print(rows[-1], file=sys.stderr, flush=True)
    result = {"machine": machine(), "args": vars(args), "shape": SHAPE, "train_seconds": round(train_seconds),
              "final_train_loss": sum(losses[-50:]) / 50, "rows": rows}
    dense = rows[0]["perplexity"]
    lines = [f"Qwen3-MoE trained here ({args.steps} steps x {args.batch} x {args.seq_len} tokens of the offline "
             f"training text, final train loss {result['final_train_loss']:.2f}): 4 layers, hidden 256, 16 "
             f"experts x 256 channels, top-4; held-out perplexity ({args.eval_tokens} tokens, windows of 512), "
             f"dense {dense:.2f}; calibration {args.samples} x {args.seq_len} tokens.", "",
             "| channels per expert / experts kept | refit | gate-weighted (default) | raw inputs |",
             "|---|---|---:|---:|"]
    for mlp, experts in WIDTHS:
        for refit in (False, True):
            got = {r["gate_weighted"]: r["perplexity"] for r in rows[1:]
                   if (r["mlp"], r["experts"], r["refit"]) == (mlp, experts, refit)}
            lines.append(f"| {mlp} / {experts} | {'yes' if refit else 'no'} | {got[True]:.2f} | {got[False]:.2f} |")
    write_result(args.out, result, "\n".join(lines))


if __name__ == "__main__":
    main()
