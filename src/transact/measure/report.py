"""``compare``'s report: markdown tables and PNG plots of what each model lost and gained.

Plots follow the paper's figures where there is one: forward FLOPs against context length (its Figure
3), measured throughput over the batch × context grid, and task accuracy side by side.
"""

from __future__ import annotations

from pathlib import Path

from transact.measure.tasks import TASKS


def pyplot():
    """matplotlib's pyplot on the file-only backend (plots never need a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, rect: tuple[float, float, float, float] | None = None) -> None:
    """Lay out ``fig`` (inside ``rect``, figure coordinates, if given), write it as a PNG and free it."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def plot_flops(bench: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    # One line per distinct curve: the same network in several file formats has the same FLOPs.
    curves: dict[tuple, list[str]] = {}
    for name, costs in bench["models"].items():
        curves.setdefault(tuple(sorted(costs["forward_flops"].items(), key=lambda kv: int(kv[0]))), []).append(name)
    for points, names in curves.items():
        ax.plot([int(c) for c, _ in points], [f / 1e12 for _, f in points], marker="o", label=" / ".join(names))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("TFLOPs per forward pass")
    ax.set_title("Forward FLOPs vs context length")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_speed(bench: dict, path: Path) -> None:
    """Grouped bars: prefill tokens/s, decode tokens/s and latency per grid point, one bar per model."""
    plt = pyplot()
    rows = bench["rows"]
    names = list(bench["models"])
    points = sorted({(r["batch"], r["context"]) for r in rows})
    by_key = {(r["model"], r["batch"], r["context"]): r for r in rows}
    panels = [("prefill_tokens_per_s", "prefill tokens/s"), ("decode_tokens_per_s", "decode tokens/s"),
              ("latency_s", f"latency (s), prefill + {rows[0]['gen']} tokens")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.8 / len(names)
    for ax, (key, label) in zip(axes, panels, strict=True):
        for i, name in enumerate(names):
            values = [by_key[(name, b, c)][key] for b, c in points]
            ax.bar([p + i * width for p in range(len(points))], values, width, label=name)
        ax.set_xticks([p + width * (len(names) - 1) / 2 for p in range(len(points))])
        ax.set_xticklabels([f"b{b}\nctx{c}" for b, c in points])
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    machine = bench["machine"]
    threads = machine.get("llama_cpp_threads", machine["torch_threads"])
    fig.suptitle(f"Measured speed, {bench.get('engine', 'torch')} ({machine.get('gpu', machine['device'])}, "
                 f"{threads} threads)")
    # Below the panels, so that no bar hides behind it.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(len(names), 4), fontsize=9)
    rows_of_legend = -(-len(names) // 4)
    save_figure(fig, path, rect=(0, 0.07 * rows_of_legend, 1, 1))


def plot_speedups(bench: dict, path: Path) -> bool:
    """Measured speedup of every non-reference model next to its analytic ratio (FLOPs for prefill, bytes
    read per step for decode), per grid point; False when there is nothing to compare."""
    refs = set([bench["reference"]] if isinstance(bench["reference"], str) else bench["reference"])
    rows = [r for r in bench["rows"] if r["model"] not in refs]
    if not rows:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(rows) + 4), 4.5))
    x = range(len(rows))
    for ax, phase, basis in zip(axes, ("prefill", "decode"), ("FLOPs", "bytes read"), strict=True):
        ax.bar([i - 0.2 for i in x], [r[f"{phase}_speedup"] for r in rows], 0.4, label="measured")
        ax.bar([i + 0.2 for i in x], [r[f"{phase}_speedup_analytic"] for r in rows], 0.4, label=f"analytic ({basis})")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{r['model']}\nb{r['batch']} ctx{r['context']}" for r in rows], fontsize=7, rotation=30,
                           ha="right")
        ax.set_title(f"{phase} speedup vs the dense model")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{bench.get('engine', 'torch')}: measured vs analytic speedup")
    save_figure(fig, path)
    return True


def plot_tasks(evals: dict[str, dict], path: Path) -> bool:
    """Bars of each task's paper metric per model, with standard errors; False if no task was run."""
    names = list(evals)
    task_names = [t for t in TASKS if any(t in e.get("tasks", {}) for e in evals.values())]
    if not task_names:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(task_names) * len(names) / 2), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        results = evals[name].get("tasks", {})
        scores = [(results.get(t) or {}).get("score") or 0.0 for t in task_names]
        errors = [(results.get(t) or {}).get("stderr") or 0.0 for t in task_names]
        ax.bar([p + i * width for p in range(len(task_names))], scores, width, yerr=errors, capsize=2, label=name)
    ax.set_xticks([p + width * (len(names) - 1) / 2 for p in range(len(task_names))])
    ax.set_xticklabels([f"{t}\n({TASKS[t].metric})" for t in task_names], fontsize=8)
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    ax.set_title("Task accuracy (lm-eval)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    save_figure(fig, path)
    return True


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _costs_table(bench: dict, evals: dict[str, dict]) -> str:
    ref = bench["reference"]
    base = bench["models"][ref]
    rows = []
    for name, c in bench["models"].items():
        summary = evals.get(name, {}).get("summary", {})
        shape = f"{summary['heads']}/{summary['kv_heads']}/{summary['mlp']}" if summary else "-"
        rows.append([name, shape, f"{c['params']:,}", f"{c['params'] / base['params']:.2f}x",
                     f"{c['kv_cache_bytes_per_token']:,}",
                     f"{c['forward_flops']['4096'] / 1e12:.3f}",
                     f"{c['forward_flops']['4096'] / base['forward_flops']['4096']:.2f}x"])
    return _table(["model", "heads/kv/mlp", "params", f"vs {ref}", "KV bytes/token", "TFLOPs @4K", f"vs {ref}"],
                  rows)


def _ppl_label(key: str) -> str:
    text, window = key.rsplit("@", 1)
    return f"{Path(text).name}@{window}"


def _quality_table(evals: dict[str, dict]) -> str:
    ppl_keys = sorted({k for e in evals.values() for k in e.get("perplexity", {})},
                      key=lambda k: (k.rsplit("@", 1)[0], int(k.rsplit("@", 1)[1])))
    task_names = [t for t in TASKS if any(t in e.get("tasks", {}) for e in evals.values())]
    header = ["model"] + [f"ppl {_ppl_label(k)}" for k in ppl_keys] + [f"{t} ({TASKS[t].metric})" for t in task_names]
    rows = []
    for name, e in evals.items():
        row = [name]
        row += [f"{e['perplexity'][k]['perplexity']:.2f}" if k in e.get("perplexity", {}) else "-" for k in ppl_keys]
        for t in task_names:
            r = e.get("tasks", {}).get(t)
            row.append("-" if not r or r["score"] is None else f"{r['score']:.3f} ± {r['stderr'] or 0:.3f}")
        rows.append(row)
    return _table(header, rows)


def mmlu_table(evals: dict[str, dict]) -> str | None:
    """MMLU overall and per category (lm-eval's aggregation, by size) per model; None if MMLU did not run."""
    ran = {name: e["tasks"]["mmlu"] for name, e in evals.items() if "mmlu" in e.get("tasks", {})}
    if not ran:
        return None
    categories = list(next(iter(ran.values())).get("categories", {}))

    def cell(part: dict) -> str:
        return "-" if part.get("score") is None else f"{part['score']:.3f}"

    rows = [[name, cell(r), *(cell(r["categories"].get(c, {})) for c in categories)] for name, r in ran.items()]
    return _table(["model", "MMLU", *categories], rows)


def _items_line(evals: dict[str, dict]) -> str:
    first = next(iter(evals.values()), {})
    parts = [f"{t}: {r['items']} items, {r['shots']}-shot, {r['split']}" for t, r in first.get("tasks", {}).items()]
    return "; ".join(parts)


def speed_table(bench: dict) -> str:
    rows = []
    for r in bench["rows"]:
        rows.append([r["model"], str(r["batch"]), str(r["context"]), f"{r['prefill_tokens_per_s']:,.0f}",
                     f"{r['prefill_speedup']:.2f}x / {r['prefill_speedup_analytic']:.2f}x",
                     f"{r['decode_tokens_per_s']:,.1f}",
                     f"{r['decode_speedup']:.2f}x / {r['decode_speedup_analytic']:.2f}x",
                     f"{r['latency_s']:.3f}", f"{r['latency_speedup']:.2f}x", _mib(r["peak_memory_bytes"])])
    return _table(["model", "batch", "context", "prefill tok/s", "speedup measured / FLOPs", "decode tok/s",
                   "speedup measured / bytes", "latency s", "speedup", "peak extra MiB"], rows)


def concurrency_table(bench: dict) -> str:
    """vLLM: the KV cache each engine allocated in the same memory, and how many sequences of each context
    (prompt plus generated tokens) it holds at once: what a server's throughput under load is bounded by."""
    contexts = sorted({r["context"] for r in bench["rows"]})
    gen = bench["grid"]["gen"]
    per_model = {(r["model"], r["context"]): r["concurrent_sequences"] for r in bench["rows"]}
    rows = []
    for name, m in bench["models"].items():
        rows.append([name, f"{m['kv_cache_bytes_per_token']:,}", f"{m['kv_cache_tokens']:,}"]
                    + [f"{per_model[(name, c)]:,}" for c in contexts])
    return (f"KV cache of {bench['kv_cache_gib']:g} GiB per engine:\n"
            + _table(["model", "KV bytes/token", "KV-cache tokens"]
                     + [f"sequences of {c}+{gen} at once" for c in contexts], rows))


def write_report(out: Path, bench: dict, evals: dict[str, dict], sources: dict[str, str], *,
                 sections: list[str] = ()) -> Path:
    """report.md plus flops_vs_context.png, speed.png and (if tasks ran) tasks.png in ``out``."""
    plot_flops(bench, out / "flops_vs_context.png")
    plot_speed(bench, out / "speed.png")
    has_tasks = plot_tasks(evals, out / "tasks.png")
    machine = bench["machine"]
    grid = bench["grid"]
    lines = [
        "# transact compare",
        "",
        "Models: " + ", ".join(f"`{n}` ({s})" for n, s in sources.items()),
        "",
        f"Machine: {machine.get('gpu', machine['cpu'])}, {machine['cores']} cores, "
        f"{machine['torch_threads']} torch threads; {bench['date']}; "
        + ", ".join(f"{k} {v}" for k, v in bench["versions"].items()),
        "",
        "## Size and cost",
        "",
        _costs_table(bench, evals),
        "",
        "![FLOPs vs context](flops_vs_context.png)",
        "",
        "## Quality",
        "",
        _quality_table(evals),
        "",
    ]
    if has_tasks:
        lines += [f"Tasks scored by lm-evaluation-harness: {_items_line(evals)}. Score ± standard error.", "",
                  "![tasks](tasks.png)", ""]
    mmlu = mmlu_table(evals)
    if mmlu is not None:
        lines += ["MMLU by category (accuracy over the questions of each, as lm-eval aggregates):", "", mmlu, ""]
    lines += [
        "## Measured speed",
        "",
        f"Prefill of batch × context random tokens, then {grid['gen']} greedy decode steps with the KV cache; "
        f"medians of {grid['repeats']} repeats after {grid['warmup']} warm-up, models interleaved. Speedups are "
        f"against `{bench['reference']}`, measured next to the analytic ratio (FLOPs for prefill, bytes read "
        "per step for decode).",
        "",
        speed_table(bench),
        "",
        "![speed](speed.png)",
        "",
    ]
    lines += sections  # further sections a caller adds (compare --quantize: prune or quantize)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
