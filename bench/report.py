"""Turn the device run's records into results.md (Markdown tables, printed last) and PNG plots."""
from __future__ import annotations

from typing import Optional

from . import anchors

DTYPE_NAME = {"fp32": "fp32", "bf16": "bf16 autocast + channels_last"}


def _sig(rec: dict, *fields: str) -> tuple:
    return tuple(rec["case"][f] for f in fields)


def _key(rec: dict) -> tuple:
    c = rec["case"]
    return (rec["variant"], c["mode"], c["dtype"], c["ckpt"], c["batch"], c["t"], c["backend"])


def index(records: list[dict]) -> dict:
    """(variant, mode, dtype, ckpt, batch, t, backend) -> record; timing sections win over the
    checkpoint table for the same configuration, and a measured record over a skipped one."""
    out: dict = {}
    rank = {"ok": 3, "oom": 2, "error": 1, "skipped": 0}
    for rec in records:
        if rec.get("section") not in ("speed", "compile", "ckpt"):
            continue
        k = _key(rec)
        old = out.get(k)
        better = old is None or rank[rec["status"]] > rank[old["status"]] or (
            rank[rec["status"]] == rank[old["status"]] and old["section"] == "ckpt")
        if better:
            out[k] = rec
    return out


def mib(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def cell(rec: Optional[dict], memory: bool = True, nvml: bool = False) -> str:
    """'12.3 ms / 3142 MiB' (peak), with nvml ' (NVML 3900)': the device's used memory after the
    timed calls (every process and the CUDA context included)."""
    if rec is None:
        return ""
    status = rec["status"]
    if status == "ok":
        text = f"{rec['ms']:.1f} ms" if rec["ms"] >= 10 else f"{rec['ms']:.2f} ms"
        if memory and rec.get("peak_mib") is not None:
            text += f" / {mib(rec['peak_mib'])} MiB"
        if nvml and rec.get("nvml_used_mib") is not None:
            text += f" (NVML {rec['nvml_used_mib']:.0f})"
        if rec.get("compile_s"):
            text += f" ({rec['compile_s']:.0f} s to compile)"
        return text
    if status == "oom":
        return "OOM"
    if status == "skipped":
        return rec.get("reason", "skipped")
    return "error"


def _anchor_cell(a: Optional[tuple]) -> str:
    if not a:
        return ""
    ms, mib, note = a
    return f"{ms} ms / {mib} MiB" + (f" ({note})" if note else "")


def _backends(records: list[dict]) -> list[str]:
    seen = dict.fromkeys(r["case"]["backend"] for r in records if "case" in r)
    return sorted(seen, key=lambda b: (b != "reference", b))


def comparator_table(records: list[dict]) -> list[str]:
    """Train step, one row per configuration the official port was measured at (plus our CUDA-graph
    and compile cases), one column per backend, the official number last."""
    idx, backends = index(records), _backends(records)
    keys = set(anchors.TRAIN)
    for rec in records:
        c = rec.get("case", {})
        timed = rec.get("section") in ("speed", "compile") and c.get("mode") == "train"
        if timed and rec["variant"] != "eager":
            keys.add((rec["variant"], c["dtype"], c["ckpt"], c["batch"], c["t"]))
    order = {"eager": 0, "graph": 1, "compile-default": 2, "compile-max-autotune": 3}
    rows = ["| configuration | t | batch | " + " | ".join(backends) + f" | {anchors.LABEL} |",
            "|---|---|---|" + "---|" * len(backends) + "---|"]
    for variant, dtype, ckpt, batch, t in sorted(
            keys, key=lambda k: (k[2], k[3], order.get(k[0], 9), k[1] != "fp32", k[4])):
        name = f"{DTYPE_NAME[dtype]}, {variant}" + (", each iteration checkpointed" if ckpt else "")
        cells = [cell(idx.get((variant, "train", dtype, ckpt, batch, t, b)), nvml=True) for b in backends]
        official = _anchor_cell(anchors.TRAIN.get((variant, dtype, ckpt, batch, t)))
        rows.append(f"| {name} | {t} | {batch} | " + " | ".join(cells) + f" | {official} |")
    return rows


def sweep_table(records: list[dict], mode: str, memory: bool) -> list[str]:
    idx = index(records)
    sweep = [r for r in records if r.get("section") == "speed" and r["variant"] == "eager"
             and r["case"]["mode"] == mode]
    ts = sorted({r["case"]["t"] for r in sweep})
    if not ts:
        return ["(no measurements)"]
    rows = ["| backend | precision | batch | " + " | ".join(f"t={t}" for t in ts) + " |",
            "|---|---|---|" + "---|" * len(ts)]
    series = dict.fromkeys(_sig(r, "backend", "dtype", "batch") for r in sweep)
    for backend, dtype, batch in sorted(series, key=lambda s: (s[0] != "reference", s[0], s[2], s[1])):
        cells = [cell(idx.get(("eager", mode, dtype, False, batch, t, backend)), memory) for t in ts]
        rows.append(f"| {backend} | {dtype} | {batch} | " + " | ".join(cells) + " |")
    if mode == "infer":
        cells = [f"{anchors.INFER_FP32_B2[t]} ms" if t in anchors.INFER_FP32_B2 else "" for t in ts]
        rows.append(f"| {anchors.LABEL} | fp32 | 2 | " + " | ".join(cells) + " |")
    return rows


def cap_table(records: list[dict]) -> list[str]:
    caps = [r for r in records if r.get("section") == "cap"]
    if not caps:
        return ["(no measurements)"]
    batches = sorted({r["case"]["batch"] for r in caps})
    head = " | ".join(f"batch {b}" for b in batches)
    official = ", ".join(f"batch {b}" for b in batches)
    rows = [f"| backend | configuration | {head} | {anchors.LABEL}: {official} |",
            "|---|---|" + "---|" * len(batches) + "---|"]
    series = dict.fromkeys(_sig(r, "backend", "dtype", "ckpt") for r in caps)
    for backend, dtype, ckpt in sorted(series, key=lambda s: (s[0] != "reference", s[2], s[1] != "fp32")):
        cells, official = [], []
        for b in batches:
            rec = next((r for r in caps if _sig(r, "backend", "dtype", "ckpt", "batch")
                        == (backend, dtype, ckpt, b)), None)
            cells.append(_cap_cell(rec))
            official.append(anchors.CAP_8GIB.get((dtype, ckpt, b), "-"))
        name = f"{DTYPE_NAME[dtype]}" + (", each iteration checkpointed" if ckpt else ", eager")
        rows.append(f"| {backend} | {name} | " + " | ".join(cells) + " | " + " / ".join(official) + " |")
    return rows


def _cap_cell(rec: Optional[dict]) -> str:
    if rec is None:
        return ""
    if rec["status"] != "ok":
        return cell(rec)
    peak = rec.get("peak_mib")
    return rec["result"] + (f" (peak {mib(peak)} MiB)" if peak else "")


def ckpt_table(records: list[dict]) -> list[str]:
    recs = [r for r in records if r.get("section") == "ckpt"]
    if not recs:
        return ["(no measurements)"]
    ts = sorted({r["case"]["t"] for r in recs})
    rows = ["| backend | precision | batch | checkpoint_iters | " + " | ".join(f"t={t}" for t in ts) + " |",
            "|---|---|---|---|" + "---|" * len(ts)]
    series = dict.fromkeys(_sig(r, "backend", "dtype", "batch", "ckpt") for r in recs)
    for backend, dtype, batch, ckpt in sorted(series, key=lambda s: (s[0], s[2], s[1], s[3])):
        by_t = {r["case"]["t"]: r for r in recs if _sig(r, "backend", "dtype", "batch", "ckpt")
                == (backend, dtype, batch, ckpt)}
        cells = [cell(by_t.get(t), nvml=True) for t in ts]
        yes = "yes" if ckpt else "no"
        rows.append(f"| {backend} | {dtype} | {batch} | {yes} | " + " | ".join(cells) + " |")
    return rows


def problems(records: list[dict], notes: list[str]) -> list[str]:
    """Skips grouped by section and reason; each distinct error once (its last line)."""
    lines = list(notes)
    skipped: dict = {}
    for r in records:
        if r.get("status") == "skipped":
            k = (r.get("section"), r.get("reason", "skipped"))
            skipped.setdefault(k, []).append(r["case"])
    for (section, reason), cases in skipped.items():
        what = ", ".join(sorted({f"{c['backend'][:3]} {c['mode']} {c['dtype']}{'+ck' if c['ckpt'] else ''} "
                                 f"b{c['batch']} t{c['t']}" for c in cases}))
        lines.append(f"- {section}: {reason}: {len(cases)} configuration(s): {what[:400]}")
    errors: dict = {}
    for r in records:
        if r.get("status") == "error":
            last = (r.get("error") or "?").strip().splitlines()[-1][:300]
            errors.setdefault((r.get("section"), last), []).append(r["case"])
    for (section, last), cases in errors.items():
        first = cases[0]
        lines.append(f"- {section}: error in {len(cases)} configuration(s) (first: {first['backend']} "
                     f"t{first['t']} b{first['batch']} {first['dtype']}): {last}")
    return lines or ["- none"]


def _size(mib_value: float) -> str:
    return f"{mib_value / 1024:g} GiB" if mib_value >= 1024 else f"{mib_value:g} MiB (simulated)"


def render(env: dict, meta: dict, records: list[dict], notes: list[str]) -> str:
    card = f"{env.get('card')} ({env.get('card_mib')} MiB)" if env.get("card_mib") else str(env.get("card"))
    head = [
        "# bionet_fast device benchmark", "",
        f"card {card}; driver {env.get('driver')}; torch {env.get('torch')} (CUDA {env.get('cuda')}, "
        f"cuDNN {env.get('cudnn')}); triton {env.get('triton')}; {env.get('date')}; "
        f"TF32 conv {env.get('tf32_cudnn')}, cudnn.benchmark {env.get('cudnn_benchmark')}.",
        f"Profile {meta['profile']}: 3x{meta['size']}x{meta['size']}, multiplier {meta['multiplier']}, depth "
        f"{meta['depth']}, BCE with logits vs random binary targets, Adam. Median ms per call, every call "
        f"synchronised. Peak = {meta['peak_def']}. Run took {meta['elapsed_s']:.0f} s (budget "
        f"{meta['budget_s']:.0f} s).", ""]
    cap = f"{_size(meta['cap_mib'])} cap (bisection on 1..{meta['max_t']})"
    body = ["## Train step (forward, backward, Adam step) vs the official port",
            "ms / peak MiB (NVML: device memory used after the timed steps, MiB)", "",
            *comparator_table(records),
            "", "## Train step sweep, eager: ms / peak MiB", *sweep_table(records, "train", True), "",
            "## Inference forward (eval, no grad), eager: ms / peak MiB",
            *sweep_table(records, "infer", True), "",
            f"## Largest t that trains under a {cap}", *cap_table(records), "",
            "## Checkpoint table (issue 3): train step ms / peak MiB", *ckpt_table(records), "",
            "## Skipped and failed", *problems(records, notes), ""]
    return "\n".join(head + body)
