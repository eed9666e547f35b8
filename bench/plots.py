"""PNG plots of the device run (matplotlib, Agg): latency vs t and peak memory vs t, one line per
configuration."""
from __future__ import annotations

from pathlib import Path


def _lines(records: list[dict], section: str, mode: str, field: str) -> dict:
    """label -> sorted [(t, value)] over ok records of one section and mode."""
    out: dict = {}
    for r in records:
        c = r.get("case", {})
        if r.get("section") != section or r.get("status") != "ok" or c.get("mode") != mode:
            continue
        if r.get(field) is None:
            continue
        ck = "+ckpt" if c["ckpt"] else ""
        variant = "" if r["variant"] == "eager" else f" {r['variant']}"
        label = f"{c['backend']}{variant} {c['dtype']}{ck} b{c['batch']}"
        out.setdefault(label, []).append((c["t"], r[field]))
    return {k: sorted(v) for k, v in sorted(out.items())}


def _panel(ax, lines: dict, title: str, ylabel: str, log: bool = False) -> None:
    for label, pts in lines.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_title(title)
    ax.set_xlabel("iterations t")
    ax.set_ylabel(ylabel)
    if log:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(True, alpha=0.3)
    if lines:
        ax.legend(fontsize=6)


def write_plots(records: list[dict], outdir: Path, card: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    specs = [
        ("latency_vs_t.png", "ms", [("speed", "train", "train step (eager)"),
                                    ("speed", "infer", "inference forward (eager)")], False),
        ("memory_vs_t.png", "peak_mib", [("speed", "train", "train step peak (sweep)"),
                                         ("ckpt", "train", "checkpoint table peak")], True),
        ("checkpoint_time_vs_t.png", "ms", [("ckpt", "train", "checkpoint table: train step")], True),
    ]
    for name, field, panels, log in specs:
        fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
        for ax, (section, mode, title) in zip(axes[0], panels):
            _panel(ax, _lines(records, section, mode, field), f"{title} - {card}",
                   "ms" if field == "ms" else "peak MiB", log)
        fig.tight_layout()
        fig.savefig(outdir / name, dpi=90)
        plt.close(fig)
        written.append(name)
    return written
