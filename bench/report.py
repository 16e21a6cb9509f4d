"""The benchmark report: one table on stdout, the same as JSON, and a plot (PNG) of each figure
against its baseline with the spread (min..max) of the repeated runs."""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from bench_e2e import Measurement


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.3g}"
    return f"{med:.3g} [{min(values):.3g}-{max(values):.3g}]"


def _figure(m: Measurement) -> str:
    f = m.figure()
    if math.isnan(f):
        return "-"
    if m.kind in ("ratio", "ratio_min"):
        return f"{f:.2f}x"
    if m.kind == "delta":
        return f"{f:+.1f} {m.unit}"
    return f"{f:.3g} {m.unit}"


def table(ms: list[Measurement]) -> str:
    head = ("benchmark", "unit", "worker median [min-max]", "baseline median [min-max]", "baseline", "figure",
            "target", "met")
    rows = [head] + [(m.name, m.unit, _spread(m.worker), _spread(m.baseline), m.baseline_name, _figure(m),
                      m.target, "yes" if m.met() else "NO") for m in ms]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for m in ms:
        for note in m.notes:
            lines.append(f"  * {m.name}: {note}")
    return "\n".join(lines)


def write_json(ms: list[Measurement], path: Path, meta: dict[str, Any]) -> None:
    doc = {"meta": meta, "results": [m.as_dict() for m in ms]}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")


def write_png(ms: list[Measurement], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt

    n = len(ms)
    cols = min(3, n) or 1
    rows = math.ceil(n / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, m in zip(axes.flat, ms, strict=False):
        labels, meds, lo, hi = [], [], [], []
        for label, values in (("worker", m.worker), ("baseline", m.baseline)):
            if not values:
                continue
            med = statistics.median(values)
            labels.append(label)
            meds.append(med)
            lo.append(med - min(values))
            hi.append(max(values) - med)
        ax.bar(labels, meds, yerr=[lo, hi], capsize=6, color=["tab:blue", "tab:gray"][:len(labels)])
        ax.set_title(f"{m.name}\n{_figure(m)} (target {m.target})", fontsize=8)
        ax.set_ylabel(m.unit, fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(ms: list[Measurement], out_dir: Path, meta: dict[str, Any]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"host": platform.node(), "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **meta}
    jpath, ppath = out_dir / "results.json", out_dir / "results.png"
    write_json(ms, jpath, meta)
    write_png(ms, ppath)
    return jpath, ppath
