"""The report's PNG: op GB/s from Python and GPU-only per implementation, for each op (a row
of panels each for spem and spem_bn), direction and stage shape, against the measured copy
bandwidth, each fused backend's time over the best peer's (spem_bn: and over the plain
tail's; PASS/MISS); model step times per variant, precision and mode, and the extra
activation memory."""
import textwrap

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"eager": "#9e9e9e", "compile": "#5c8fd6", "triton": "#e07b39", "native": "#3fa34d",
          "plain": "#d4c24a", "plain-compile": "#8c7b1e"}
VARIANT_COLORS = {"plain": "#9e9e9e", "eager SPEM": "#c77dba", "fused SPEM": "#3fa34d",
                  "fused SPEM+BN": "#1f6f33"}
TARGET_COLORS = {"PASS": "#1b7a2e", "MISS": "#c62828"}


def _unique(rows, key):
    return list(dict.fromkeys(key(r) for r in rows))


def _value(cell, key):
    return cell.get(key) if cell else None


def _op_axes(ax, rows, impls, groups, copy_gbps):
    """Per implementation: a pale bar for GPU-only GB/s, a solid narrower one from Python."""
    width = 0.8 / len(impls)
    top = copy_gbps
    for i, impl in enumerate(impls):
        for j, group in enumerate(groups):
            row = next((r for r in rows if r["impl"] == impl
                        and (r["dtype"], r["layout"]) == group), None)
            x = j + (i - (len(impls) - 1) / 2) * width
            python_gbps = _value(row and row["python"], "gb_per_s")
            gpu_gbps = _value(row and row["graph"], "gb_per_s")
            if python_gbps is None:
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
                continue
            color = COLORS.get(impl, "k")
            if gpu_gbps is not None:
                ax.bar(x, gpu_gbps, width, color=color, alpha=0.35)
            ax.bar(x, python_gbps, width * 0.6, color=color, label=impl if j == 0 else None)
            label = f"{row['python']['median_ms']:.3g}"
            if gpu_gbps is not None:
                label += f" / {row['graph']['median_ms']:.3g}"
            label += " ms"
            target = row.get("target")
            if target and row.get("vs_best_peer"):  # a fused backend: over the best peer
                label += f", {row['vs_best_peer']:.2f}x"
            if target and row.get("vs_plain"):  # spem_bn: and over the plain tail
                label += f", {row['vs_plain']:.2f}x plain"
            height = max(python_gbps, gpu_gbps or 0)
            top = max(top, height)
            ax.text(x, height, label, ha="center", va="bottom", fontsize=6, rotation=90,
                    color=TARGET_COLORS[target.split()[0]] if target else "k")
    ax.axhline(copy_gbps, color="k", ls="--", lw=1, label="copy bandwidth")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{d}\n{label}" for d, label in groups], fontsize=8)
    ax.set_ylim(0, top * 1.45)  # room for the time labels above the bars
    ax.set_ylabel("GB/s (bytes that must move / median time)", fontsize=8)


def _model_axes(ax_time, ax_mem, models):
    """Step time per (precision, mode) and activation memory per precision, bars per variant."""
    variants = _unique(models, lambda r: r["label"])
    width = 0.8 / len(variants)
    panels = (  # axes, rows, group of a row, value, its label, title
        (ax_time, models, lambda r: (r["precision"], r["mode"]), lambda r: r.get("ms_per_step"),
         lambda r, v: f"{r['x_plain']:.2f}x" if r.get("x_plain") else "",
         "ms per training step (labels: x plain)"),
        (ax_mem, [r for r in models if r["mode"] == "eager"], lambda r: (r["precision"],),
         lambda r: r.get("memory", {}).get("activation_mb"), lambda r, v: f"{v:.0f}",
         "extra activation memory, MiB (eager mode)"))
    for ax, rows, group_of, value_of, label_of, title in panels:
        groups = _unique(rows, group_of)
        for i, variant in enumerate(variants):
            for j, group in enumerate(groups):
                row = next((r for r in rows if r["label"] == variant and group_of(r) == group),
                           None)
                x = j + (i - (len(variants) - 1) / 2) * width
                v = value_of(row) if row else None
                if v is None:
                    ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
                    continue
                ax.bar(x, v, width, color=VARIANT_COLORS.get(variant, "k"),
                       label=variant if j == 0 else None)
                ax.text(x, v, label_of(row, v), ha="center", va="bottom", fontsize=6.5,
                        rotation=90)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(["\n".join(g) for g in groups], fontsize=8)
        ax.set_title(f"ResNet-{models[0]['depth']}, batch {models[0]['batch']}: {title}",
                     fontsize=9)
        ax.margins(y=0.25)
    ax_time.legend(fontsize=8, loc="upper left")


def _notes(ax, result):
    """What the panels show, how the machine was, and the target verdicts."""
    meta, s = result["meta"], result["summary"]
    memory = next((r["memory"]["memory_method"] for r in result["model"]
                   if "memory_method" in r.get("memory", {})), "")
    lines = [f"targets: {s['passed']}/{s['checked']} PASS"]
    lines += [textwrap.shorten(m, 60) for m in s["misses"][:8]]
    lines += ["", "op bars: GB/s = bytes that must move / median",
              "solid: from Python; pale: GPU-only (graph replay)",
              "labels: ms from Python / GPU-only; fused backends:",
              "x the best peer's time (spem_bn: and x plain's),",
              "green PASS, red MISS;",
              "dashed: copy bandwidth (read + write of a large tensor)",
              "model: fused SPEM = " + next((r["resolved_backend"] for r in result["model"]
                                            if r.get("resolved_backend")), "n/a"),
              f"load average: {meta['load_avg_start'][0]:.2f} at start, "
              f"{meta['load_avg_end'][0]:.2f} at end"]
    lines += textwrap.wrap(f"memory: {memory}", 52)
    ax.axis("off")
    ax.text(0, 1, "\n".join(lines), va="top", fontsize=8, family="monospace")


def write(result, path):
    ops, models, meta = result["ops"], result["model"], result["meta"]
    stages = _unique(ops, lambda r: r["stage"])
    directions = _unique(ops, lambda r: (r["op"], r["direction"]))  # a row of panels each
    groups = _unique(ops, lambda r: (r["dtype"], r["layout"]))
    nrows = max(1, len(directions) + (1 if models else 0))
    ncols = max(len(stages), 3 if models else 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(6 * ncols, 10), 4.4 * nrows),
                             squeeze=False)
    copy_gbps = result["copy_bandwidth"]["gb_per_s"]
    for i, (op, direction) in enumerate(directions):
        op_rows = [r for r in ops if (r["op"], r["direction"]) == (op, direction)]
        impls = _unique(op_rows, lambda r: r["impl"])
        for j, stage in enumerate(stages):
            rows = [r for r in op_rows if r["stage"] == stage]
            if not rows:  # a run cut short
                axes[i][j].axis("off")
                continue
            _op_axes(axes[i][j], rows, impls, groups, copy_gbps)
            shape = "x".join(map(str, rows[0]["shape"]))
            axes[i][j].set_title(f"{op} {stage} {shape}: {direction}", fontsize=10)
        for j in range(len(stages), ncols):
            axes[i][j].axis("off")
        if i == 0 or op != directions[i - 1][0]:  # each op's first row: its implementations
            axes[i][0].legend(fontsize=8, loc="upper left", ncol=2)
    if not ops and not models:  # a run cut short before its first figure
        axes[0][0].axis("off")
        axes[0][0].text(0.5, 0.5, f"nothing measured: {meta.get('cut_short') or 'no rows'}",
                        ha="center", va="center", fontsize=10)
    if models:
        bottom = axes[-1]
        _model_axes(bottom[0], bottom[1], models)
        _notes(bottom[2], result)
        for ax in bottom[3:]:
            ax.axis("off")
    targets = [r["target"] for r in ops if r.get("target")]
    passed = sum(t.startswith("PASS") for t in targets)
    fig.suptitle(f"SPEM block tail relu(g*x + residual), spem_bn relu(g*bn(y) + residual) on "
                 f"{meta['device']}, {meta['date'][:10]}\n"
                 f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; "
                 f"copy bandwidth {copy_gbps:.0f} GB/s\nop targets: each fused backend no "
                 "slower than the best peer (GPU: also fwd+bwd speed);\nspem_bn: also no slower "
                 f"than plain, fwd+bwd {result['targets']['op_bn_min_vs_eager_fwd_bwd']:g}x "
                 f"eager; {passed}/{len(targets)} rows PASS"
                 + ("" if result["summary"]["quiet"] else
                    f"; NOT QUIET: others used up to "
                    f"{result['summary']['max_others_cpus']:.1f} CPUs"),
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.85 / fig.get_figheight()))  # room for 4 lines
    fig.savefig(path, dpi=110)
    plt.close(fig)
