"""Evaluation report: report.json, report.md (tables EN vs ZH with 95 % CIs, by topic, examples) and PNG charts."""

from __future__ import annotations

import re
from pathlib import Path

from deccp.io import atomic_directory, atomic_write_json, atomic_write_jsonl, atomic_write_text

LANG_NAMES = {"en": "EN", "zh": "ZH", "zh-Hant": "ZH-Hant"}
# The headline metrics of a model, shared by the report, the summary table and the model card:
# (label, path in a model's metrics below the language, higher is better?).
HEADLINE_METRICS = [
    ("sensitive refusal", ("sensitive", "refusal"), False),
    ("CCP-aligned", ("sensitive", "labels", "ccp_aligned"), False),
    ("confabulated", ("sensitive", "labels", "confabulated"), False),
    ("evasive", ("sensitive", "labels", "evasive"), False),
    ("factual/neutral", ("sensitive", "labels", "factual_neutral"), True),
    ("harmful refusal (keep high)", ("harmful", "refusal"), True),
    ("harmless refusal", ("harmless", "refusal"), False),
]

_LAST_SENSITIVE = [label for label, (group, *_), _ in HEADLINE_METRICS if group == "sensitive"][-1]


def metric_entry(metrics: dict, group: str, lang: str, path: tuple):
    """`metrics[group][lang][*path]` (a `{k, n, rate, ci95}` entry, or a count such as `n`), or None where any
    level is missing."""
    node = metrics
    for key in (group, lang, *path):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80]


def _pct(entry: dict | None, ci: bool = True) -> str:
    if not entry:
        return "–"
    s = f"{entry['rate']:.0%}"
    return f"{s} ({entry['ci95'][0]:.0%}–{entry['ci95'][1]:.0%})" if ci else s


def headline_rows(model: dict) -> dict[str, dict[str, str]]:
    """{metric: {lang: 'rate (ci)'}} for one model, in `HEADLINE_METRICS` order, key-fact recall after the
    sensitive-prompt labels."""
    m = model["metrics"]
    out: dict[str, dict[str, str]] = {}
    for label, (group, *path), _ in HEADLINE_METRICS:
        for lang in m.get(group, {}):
            if (entry := metric_entry(m, group, lang, tuple(path))) is not None:
                out.setdefault(label, {})[lang] = _pct(entry)
        if label == _LAST_SENSITIVE:
            for lang, e in m.get("sensitive", {}).items():
                if e.get("fact_recall") is not None:
                    out.setdefault("key-fact recall", {})[lang] = f"{e['fact_recall']:.0%}"
    return out


def capability_changes(report: dict) -> dict[str, dict[str, dict]]:
    """{model name: `deccp.capability.compare(base, model)`} for every evaluated model beside the base.

    Paired (item by item) where both runs logged their items; empty without a base or capability results."""
    from deccp.capability import compare

    models = report.get("models") or []
    base = next((m for m in models if m["name"] == report.get("base")), None)
    if base is None or not base.get("capability"):
        return {}
    return {m["name"]: compare(base["capability"], m["capability"])
            for m in models if m is not base and m.get("capability")}


def format_change(c: dict) -> str:
    """'−3.3 ± 1.9 points (5 items gained, 9 lost)': one `compare` entry, stderr paired where it could be."""
    text = f"{c['delta']:+.1f}".replace("-", "−") + " points"
    if c.get("delta_stderr") is not None:
        text = text.replace(" points", f" ± {c['delta_stderr']:.1f} points")
    if c.get("paired"):
        text += f" ({c['gained']} items gained, {c['lost']} lost)"
    return text


def summary_table(report: dict) -> str:
    lines = []
    all_changes = capability_changes(report)
    for model in report["models"]:
        lines.append(f"\n{model['name']}")
        for metric, by_lang in headline_rows(model).items():
            cells = "  ".join(f"{LANG_NAMES.get(k, k)} {v}" for k, v in by_lang.items())
            lines.append(f"  {metric:<28} {cells}")
        if model.get("kl"):
            lines.append(f"  KL to base                   first-token {model['kl']['first_token']:.4f}, "
                         f"per-token {model['kl']['per_token']:.4f}")
        changes = all_changes.get(model["name"], {})
        for task, r in (model.get("capability") or {}).items():
            if isinstance(r, dict) and "acc" in r:
                change = f"  ({format_change(changes[task])} vs base)" if task in changes else ""
                lines.append(f"  capability {task:<17} {r['acc']:.1%}{change}")
    return "\n".join(lines)


def markdown(report: dict, rows_by_model: dict[str, list[dict]], examples_per_topic: int) -> str:
    models = report["models"]
    names = [m["name"] for m in models]
    langs = sorted({lang for m in models for lang in m["metrics"].get("sensitive", {})},
                   key=lambda x: ["en", "zh", "zh-Hant"].index(x) if x in ("en", "zh", "zh-Hant") else 9)
    md = ["# deccp evaluation report", "",
          f"Split `{report['config']['split']}`; models: " + ", ".join(f"`{n}`" for n in names)
          + (f"; base (KL reference): `{report['base']}`" if report.get("base") else "") + ".",
          "Rates are over prompts with 95 % Wilson intervals. Labels: `refusal`, `ccp_aligned`, `factual_neutral`, "
          "`evasive`, `confabulated`, `unverified`.", ""]
    md += ["## Headline, English vs Chinese", "", "| metric | " + " | ".join(
        f"{n} {LANG_NAMES.get(lang, lang)}" for n in names for lang in langs) + " |",
           "|---|" + "---|" * (len(names) * len(langs))]
    heads = {m["name"]: headline_rows(m) for m in models}
    metrics = list(dict.fromkeys(k for h in heads.values() for k in h))
    for metric in metrics:
        md.append(f"| {metric} | " + " | ".join(heads[n].get(metric, {}).get(lang, "–") for n in names for lang in langs) + " |")
    md.append("")
    kl = [(m["name"], m["kl"]) for m in models if m.get("kl")]
    if kl:
        md += ["## KL divergence to the base (harmless prompts)", "", "| model | first-token | per-token (greedy continuation) |",
               "|---|---|---|"] + [f"| {n} | {k['first_token']:.4f} | {k['per_token']:.4f} |" for n, k in kl] + [""]
    caps = [(m["name"], m["capability"]) for m in models if m.get("capability")]
    if caps:
        tasks = sorted({t for _, c in caps for t, r in c.items() if isinstance(r, dict) and "acc" in r})
        md += ["## Capability (lm-eval-harness)", "", "| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        md += [f"| {n} | " + " | ".join(f"{c[t]['acc']:.1%}" if t in c else "–" for t in tasks) + " |" for n, c in caps]
        md.append("")
        changes = capability_changes(report)
        if changes:
            md += [f"Change against the base `{report['base']}`, with the standard error of the difference (paired "
                   "over the same items where both runs logged them; more than 2 standard errors is marked *):", "",
                   "| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
            md += [f"| {n} | " + " | ".join(
                (format_change(ch[t]) + (" *" if ch[t].get("significant") else "")) if t in ch else "–" for t in tasks)
                + " |" for n, ch in changes.items()]
            md.append("")
    md += ["## Sensitive prompts by topic (refusal / CCP-aligned / confabulated / factual)", "",
           "| topic | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    topics = sorted({k for m in models for k in m["metrics"].get("sensitive_topic", {})})
    for key in topics:
        cells = []
        for m in models:
            e = m["metrics"].get("sensitive_topic", {}).get(key)
            cells.append("–" if not e else " / ".join(_pct(x, ci=False) for x in (
                e["refusal"], e["labels"]["ccp_aligned"], e["labels"]["confabulated"], e["labels"]["factual_neutral"])))
        md.append(f"| {key} (n={models[0]['metrics'].get('sensitive_topic', {}).get(key, {}).get('n', '?')}) | "
                  + " | ".join(cells) + " |")
    md.append("")
    md += ["## Example answers", ""]
    by_prompt: dict[str, dict[str, dict]] = {}
    for name, rows in rows_by_model.items():
        for r in rows:
            if r["kind"] == "sensitive" and r["sample"] == 0:
                by_prompt.setdefault(r["prompt"], {"_row": r})[name] = r
    shown: dict[tuple, int] = {}
    for prompt, per in by_prompt.items():
        r0 = per["_row"]
        key = (r0["topic"], r0["lang"])
        if shown.get(key, 0) >= examples_per_topic or r0["lang"] == "zh-Hant":
            continue
        shown[key] = shown.get(key, 0) + 1
        md.append(f"**[{r0['topic']}, {r0['lang']}] {prompt}**")
        md.append("")
        for name in names:
            if name in per:
                ans = " ".join(per[name]["answer"].split())
                md.append(f"- `{name}` ({per[name]['label']}): {ans[:400]}{'…' if len(ans) > 400 else ''}")
        md.append("")
    md += ["## Charts", "", "![refusal and labels by language](labels_by_language.png)", "",
           "![refusal by topic](refusal_by_topic.png)", ""]
    return "\n".join(md)


def charts(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = report["models"]
    langs = [lang for lang in ("en", "zh", "zh-Hant") if any(lang in m["metrics"].get("sensitive", {}) for m in models)]
    cats = ["refusal", "ccp_aligned", "confabulated", "evasive", "factual_neutral", "unverified"]
    colors = ["#7f7f7f", "#d62728", "#ff7f0e", "#bcbd22", "#2ca02c", "#c7c7c7"]
    fig, axes = plt.subplots(1, max(1, len(langs)), figsize=(4 + 2.2 * len(models) * len(langs), 4.5), squeeze=False)
    for ax, lang in zip(axes[0], langs, strict=False):
        bottom = np.zeros(len(models))
        for cat, color in zip(cats, colors, strict=True):
            vals = np.array([m["metrics"].get("sensitive", {}).get(lang, {}).get("labels", {}).get(cat, {}).get("rate", 0)
                             for m in models])
            ax.bar(range(len(models)), vals, bottom=bottom, color=color, label=cat)
            bottom += vals
        ax.set_xticks(range(len(models)), [m["name"][:18] for m in models], rotation=20, ha="right")
        ax.set_title(f"sensitive prompts, {LANG_NAMES.get(lang, lang)}")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("share of answers")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "labels_by_language.png", dpi=110)
    plt.close(fig)

    topics = sorted({k.split("/")[0] for m in models for k in m["metrics"].get("sensitive_topic", {})})
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(topics) * max(1, len(models))), 4.5))
    width = 0.8 / max(1, len(models) * len(langs))
    i = 0
    for m in models:
        for lang in langs:
            vals, errs = [], [[], []]
            for t in topics:
                e = m["metrics"].get("sensitive_topic", {}).get(f"{t}/{lang}")
                r = e["refusal"] if e else {"rate": 0, "ci95": [0, 0]}
                vals.append(r["rate"])
                errs[0].append(r["rate"] - r["ci95"][0])
                errs[1].append(r["ci95"][1] - r["rate"])
            ax.bar(np.arange(len(topics)) + i * width, vals, width, yerr=errs, capsize=2,
                   label=f"{m['name'][:16]} {LANG_NAMES.get(lang, lang)}")
            i += 1
    ax.set_xticks(np.arange(len(topics)) + 0.4 - width / 2, topics, rotation=30, ha="right")
    ax.set_ylabel("refusal rate (95 % CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "refusal_by_topic.png", dpi=110)
    plt.close(fig)
    return ["labels_by_language.png", "refusal_by_topic.png"]


def write_report(out: str | Path, report: dict, rows_by_model: dict[str, list[dict]], *, examples_per_topic: int = 1) -> Path:
    """Write the report directory atomically (a previous report stays intact until the new one is complete)."""
    out = Path(out)
    with atomic_directory(out, overwrite=True) as tmp:
        for name, rows in rows_by_model.items():
            atomic_write_jsonl(tmp / f"answers-{_slug(name)}.jsonl", rows)
        report = {**report, "charts": charts(report, tmp),
                  "answers": {n: f"answers-{_slug(n)}.jsonl" for n in rows_by_model}}
        atomic_write_json(tmp / "report.json", report)
        atomic_write_text(tmp / "report.md", markdown(report, rows_by_model, examples_per_topic))
    return out
