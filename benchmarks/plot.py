"""The report's PNG: achieved GB/s per implementation for each stage shape and direction,
against the measured copy bandwidth, and the model-level bars."""
import textwrap

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"eager": "#9e9e9e", "compile": "#5c8fd6", "triton": "#e07b39", "native": "#3fa34d"}


def _cases(ops, key):
    return list(dict.fromkeys(r[key] for r in ops))


def _op_axes(ax, rows, impls, groups, copy_gbps):
    top = max([copy_gbps] + [r["gb_per_s"] for r in rows if not r["error"]])
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        for j, group in enumerate(groups):
            row = next((r for r in rows if r["impl"] == impl
                        and (r["dtype"], r["layout"]) == group), None)
            x = j + (i - (len(impls) - 1) / 2) * width
            if row is None or row["error"]:
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
                continue
            ax.bar(x, row["gb_per_s"], width, color=COLORS.get(impl, "k"),
                   label=impl if j == 0 else None)
            ax.text(x, row["gb_per_s"], f"{row['median_ms']:.3g} ms", ha="center",
                    va="bottom", fontsize=6.5, rotation=90)
    ax.axhline(copy_gbps, color="k", ls="--", lw=1, label="copy bandwidth")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{d}\n{l}" for d, l in groups], fontsize=8)
    ax.set_ylim(0, top * 1.35)  # room for the time labels above the bars
    ax.set_ylabel("GB/s (bytes that must move / median time)", fontsize=8)


def _model_axes(ax_rate, ax_mem, models, min_ratio):
    ok = [r for r in models if not r["error"]]
    labels = [r["label"] + (f"\n({r['resolved_backend']})" if r.get("resolved_backend") else "")
              for r in ok]
    colors = ["#9e9e9e", "#c77dba", "#3fa34d"][:len(ok)]
    for ax, key, title in ((ax_rate, "steps_per_s", "training steps/s (higher is better)"),
                           (ax_mem, "peak_mem_mb", "peak memory, MB (lower is better)")):
        values = [r[key] for r in ok]
        ax.bar(range(len(ok)), values, color=colors)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(ok)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(f"ResNet-164, batch {models[0]['batch']}: {title}", fontsize=9)
        ax.set_ylim(0, max(values, default=1) * 1.2)
    if ok and ok[0]["label"] == "plain":
        ax_rate.axhline(ok[0]["steps_per_s"] * min_ratio, color="k", ls="--", lw=1)
        ax_rate.text(-0.45, ok[0]["steps_per_s"] * min_ratio, f"target: {min_ratio:.0%} of plain",
                     ha="left", va="bottom", fontsize=8, backgroundcolor="white")


def _notes(ax, result):
    """What the panels show, how the machine was, and the target verdicts."""
    meta, s = result["meta"], result["summary"]
    memory = next((r["memory_method"] for r in result["model"] if r.get("memory_method")), "")
    lines = [f"targets: {s['passed']}/{s['checked']} PASS"
             + (" (op targets apply on GPU only)" if meta["device_type"] != "cuda" else "")]
    lines += s["misses"][:8]
    lines += ["", "bars: GB/s = bytes that must move / median time",
              "labels: median time per call; dashed: measured copy",
              "bandwidth (read + write of a large tensor)",
              f"load average: {meta['load_avg_start'][0]:.2f} at start, "
              f"{meta['load_avg_end'][0]:.2f} at end"]
    lines += textwrap.wrap(f"memory: {memory}", 52)
    ax.axis("off")
    ax.text(0, 1, "\n".join(lines), va="top", fontsize=9, family="monospace")


def write(result, path):
    ops, models, meta = result["ops"], result["model"], result["meta"]
    stages, directions = _cases(ops, "stage"), _cases(ops, "direction")
    impls = _cases(ops, "impl")
    groups = list(dict.fromkeys((r["dtype"], r["layout"]) for r in ops))
    nrows = len(directions) + (1 if models else 0)
    ncols = max(len(stages), 3 if models else 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(6 * ncols, 10), 4.2 * nrows), squeeze=False)
    copy_gbps = result["copy_bandwidth"]["gb_per_s"]
    for i, direction in enumerate(directions):
        for j, stage in enumerate(stages):
            rows = [r for r in ops if r["stage"] == stage and r["direction"] == direction]
            _op_axes(axes[i][j], rows, impls, groups, copy_gbps)
            shape = "x".join(map(str, rows[0]["shape"]))
            axes[i][j].set_title(f"{stage} {shape}: {direction}", fontsize=10)
        for j in range(len(stages), ncols):
            axes[i][j].axis("off")
    axes[0][0].legend(fontsize=8, loc="upper left", ncol=2)
    if models:
        bottom = axes[-1]
        _model_axes(bottom[0], bottom[1], models, result["targets"]["min_model_vs_plain"])
        _notes(bottom[2], result)
        for ax in bottom[3:]:
            ax.axis("off")
    fig.suptitle(f"SPEM block tail relu(g*x + residual) on {meta['device']}, {meta['date'][:10]}\n"
                 f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; "
                 f"copy bandwidth {copy_gbps:.0f} GB/s", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
