"""The shootout's picture: per workload, grouped bars (notify modes x ABIs) for throughput,
latency and notifications per op, with the spread as error bars and the limit as a line."""

from __future__ import annotations

from typing import Any

ABI_COLORS = {"virtio-split": "#1f77b4", "virtio-packed": "#2ca02c", "vbus": "#d62728"}
DPI = 100
PANEL_W, PANEL_H = 4.2, 3.2


def figure_size(results: dict[str, Any]) -> tuple[int, int]:
    """The PNG's size in pixels for these results."""
    n = max(1, len(results["config"]["workloads"]))
    return int(round(PANEL_W * n * DPI)), int(round(PANEL_H * 3 * DPI))


def plot(results: dict[str, Any], path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    workloads = cfg["workloads"]
    abis = cfg["abis"]
    modes = cfg["notify"]
    guests = cfg.get("guests", ["process"])
    cells = {(c["workload"], c["notify"], c["abi"], c["guest"]): c for c in results["cells"]}
    # one bar series per (ABI, guest) that has cells; KVM guests' bars are hatched
    series = [(a, g) for g in guests for a in abis
              if any(k[2:] == (a, g) for k in cells)]
    n = max(1, len(workloads))
    fig, axes = plt.subplots(3, n, figsize=(PANEL_W * n, PANEL_H * 3), dpi=DPI, squeeze=False)
    width = 0.8 / max(1, len(series))
    for col, w in enumerate(workloads):
        sample = next((c for c in results["cells"] if c["workload"] == w), None)
        title = sample["title"] if sample else w
        thr = "bytes_per_s" if sample and sample["key_metric"] == "bytes_per_s" else "ops_per_s"
        scale, unit = (1e9, "GB/s") if thr == "bytes_per_s" else (1e3, "k ops/s")
        panels = ((thr, scale, f"throughput ({unit})"), ("lat_p50_us", 1.0, "latency p50 (µs)"),
                  ("notif", 1.0, "doorbells + interrupts per op"))
        for row, (metric, div, label) in enumerate(panels):
            ax = axes[row][col]
            for i, (abi, guest) in enumerate(series):
                xs, ys, lo, hi, failed = [], [], [], [], []
                for j, mode in enumerate(modes):
                    c = cells.get((w, mode, abi, guest))
                    x = j + (i - (len(series) - 1) / 2) * width
                    if not c or c["status"] != "ok":
                        failed.append((x, c["status"] if c else "not-run"))
                        continue
                    m = c["metrics"]
                    if metric == "notif":
                        y = m["doorbells_per_op"]["median"] + m["interrupts_per_op"]["median"]
                        a = m["doorbells_per_op"]["min"] + m["interrupts_per_op"]["min"]
                        b = m["doorbells_per_op"]["max"] + m["interrupts_per_op"]["max"]
                    else:
                        y, a, b = (m[metric][k] / div for k in ("median", "min", "max"))
                    xs.append(x)
                    ys.append(y)
                    lo.append(max(0.0, y - a))
                    hi.append(max(0.0, b - y))
                name = abi if len(guests) == 1 else f"{abi} ({guest})"
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=ABI_COLORS.get(abi),
                       hatch="//" if guest == "kvm" else None, edgecolor="white",
                       label=name if col == 0 and row == 0 else None)
                for x, status in failed:
                    ax.text(x, 0, status, rotation=90, ha="center", va="bottom", fontsize=7,
                            color="red" if status == "failed" else "gray")
            # the limit, per notify mode (pingpong's differs: eventfd or shared memory)
            for j, mode in enumerate(modes):
                lim = next((cells[(w, mode, a, g)]["limit"] for a, g in series
                            if (w, mode, a, g) in cells
                            and cells[(w, mode, a, g)]["status"] == "ok"), None)
                if lim is None:
                    continue
                value = None
                if metric == thr:
                    value = lim[thr] / div
                elif metric == "lat_p50_us" and "lat_p50_us" in lim:
                    value = lim["lat_p50_us"]
                if value is not None:
                    ax.hlines(value, j - 0.45, j + 0.45, colors="black", linestyles="dashed",
                              label="limit" if col == 0 and row == 0 and j == 0 else None)
            if metric == thr:
                ax.set_yscale("log")     # the limits are often ten times the results
            ax.set_xticks(range(len(modes)))
            ax.set_xticklabels(modes, fontsize=8)
            ax.tick_params(axis="y", labelsize=8)
            ax.set_ylabel(label, fontsize=8)
            if row == 0:
                ax.set_title(title, fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = max(1, min(len(labels), 4 if n > 1 else 2))
    rows = (len(labels) + ncol - 1) // ncol
    fig.legend(handles, labels, loc="upper center", ncol=ncol, fontsize=8)
    m = results["machine"]
    fig.text(0.5, 0.005, f"{m.get('cpu', '')}, {m.get('cores')} cores, Linux {m.get('kernel')}, "
                         f"Python {m.get('python')}; bars: median, whiskers: min-max over "
                         f"{cfg['repeat']} interleaved runs; dashed: the limit measured in the "
                         f"same run", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1 - 0.025 * (rows + 1)))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
