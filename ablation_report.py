"""The ablation study's report: the rules that turn its numbers into verdicts and trends, the
tables those sentences stand beside, and the pictures. Pure functions over the rows ablate.py
gathers from its results file (no data, no training), so every sentence of
docs/ablations.md is one of these rules applied to the numbers its table shows.

A row: {"variant", "budget" (TFLOP), "lr", "bpd" (test bits/dim by seed), "held_out",
"diverged" (runs), "params", "train_gflop_per_image", "steps", "wall_min", "train_s" (the
row's training time on its own path), "train_s_same_path" (the base's, on the path the
experiment's other variants train on)}.
"""

import math
import os

import numpy as np

import pictures


# ------------------------------------------------------------------------------------------
# The rules

def mean_spread(bpd: list[float]) -> tuple[float, float]:
    """The mean of a row's seeds and their spread, max - min (nan: no finished run)."""
    if not bpd:
        return math.nan, math.nan
    return float(np.mean(bpd)), max(bpd) - min(bpd)


def compare(base: list[float], other: list[float]) -> tuple[str, float]:
    """Where `other` stands against `base` (test bits/dim by seed): "ahead" (lower) or
    "behind" (higher) when the gap between the means exceeds both rows' seed spreads, else
    "a tie"; "one seed" when a row has fewer than 2 (no spread to judge by). And the gap,
    mean(other) - mean(base)."""
    (m0, s0), (m1, s1) = mean_spread(base), mean_spread(other)
    gap = m1 - m0
    if len(base) < 2 or len(other) < 2:
        return "one seed", gap
    if abs(gap) <= max(s0, s1):
        return "a tie", gap
    return ("ahead" if gap < 0 else "behind"), gap


# What the claim says of a variant against the base, and what each standing makes of it.
VERDICTS = {"behind": {"behind": "agrees", "ahead": "disagrees", "a tie": "a tie"},
            "not ahead": {"behind": "agrees", "a tie": "agrees", "ahead": "disagrees"},
            "ahead": {"ahead": "agrees", "behind": "disagrees", "a tie": "a tie"}}


def verdict(expect: str | None, standing: str) -> str:
    """The claim's verdict for one variant at one budget: "agrees", "disagrees", "a tie"
    (the claim wants a difference the seeds cannot show), or "" where the claim says nothing
    of bits/dim (expect None) or a row has one seed."""
    return VERDICTS.get(expect, {}).get(standing, "")


def per_4x(gaps: list[tuple[float, float]]) -> list[float]:
    """[(budget, gap)] by budget -> the factor each gap changes by from one budget to the
    next, as a factor per 4x of compute (a step of 16x counts twice)."""
    return [(g1 / g0) ** (math.log(4) / math.log(b1 / b0)) if g0 and g1 / g0 > 0 else g1 / g0
            for (b0, g0), (b1, g1) in zip(gaps, gaps[1:])]


def trend(gaps: list[tuple[float, float]], standings: list[str]) -> str:
    """A variant's trend across budgets from its gaps to the base [(budget, gap)] and its
    standings there: "the lines cross" when it is ahead beyond the spreads at one budget and
    behind at another; else, by the factor per 4x of compute, "the gap halves or more" (every
    factor <= 0.5), "shrinks" (every factor < 1), "grows" (every factor > 1), or "moves both
    ways"; "changes sign within the spreads" where it changes sign without crossing."""
    if len(gaps) < 2:
        return ""
    sequence = " → ".join(f"{g:+.3f}" for _, g in gaps)
    sides = [s for s in standings if s in ("ahead", "behind")]
    if len(set(sides)) == 2:
        first = next(b for (b, _), s in zip(gaps, standings) if s == sides[0])
        then = next(b for (b, _), s in zip(gaps, standings) if s == sides[-1])
        return f"the lines cross between {first:g} and {then:g} TFLOP ({sequence})"
    factors = per_4x(gaps)
    if any(f <= 0 for f in factors):
        return f"the gap changes sign within the spreads ({sequence})"
    span = f"{min(factors):.2f}" + (f"–{max(factors):.2f}" if len(factors) > 1 else "")
    if all(f <= 0.5 for f in factors):
        return f"the gap halves or more per 4x of compute (×{span}; {sequence})"
    if all(f < 1 for f in factors):
        return f"the gap shrinks by ×{span} per 4x of compute ({sequence})"
    if all(f > 1 for f in factors):
        return f"the gap grows by ×{span} per 4x of compute ({sequence})"
    return f"the gap moves both ways (×{span} per 4x of compute; {sequence})"


def every(phrases: list[str]) -> str:
    """One sentence for several variants' trends: "every variant's gap halves or more per 4x
    of compute" only when every one halves, "shrinks" when every one shrinks or halves,
    "grows" when every one grows; else nothing."""
    kinds = {"halves or more": ("halves",), "shrinks": ("halves", "shrinks"),
             "grows": ("grows",)}
    for kind, words in kinds.items():
        if len(phrases) > 1 and all(any(f"the gap {w}" in p for w in words) for p in phrases):
            return f"Every variant's gap {kind} per 4x of compute."
    return ""


def at_time(curve: list[tuple[float, float]], seconds: float) -> tuple[float, bool]:
    """bits/dim at `seconds` of training from [(seconds, bpd)], linear in log time between the
    two nearest points; beyond them, extended from the end pair. And whether it was inside."""
    curve = sorted(curve)
    i = min(max(int(np.searchsorted([c[0] for c in curve], seconds)), 1), len(curve) - 1)
    (t0, b0), (t1, b1) = curve[i - 1], curve[i]
    bpd = b0 + (b1 - b0) * math.log(seconds / t0) / math.log(t1 / t0)
    return bpd, curve[0][0] <= seconds <= curve[-1][0]


def equal_time(base: dict, rows: list[dict]) -> str:
    """A variant at the base's training time on the same path (its bits/dim interpolated in
    log time along its budgets): ahead, behind or a tie by the base's seed spread. "" without
    the times or with fewer than 2 budgets."""
    curve = [(r["train_s"], np.mean(r["bpd"])) for r in rows if r["train_s"] and r["bpd"]]
    if len(curve) < 2 or not base["train_s_same_path"] or not base["bpd"]:
        return ""
    bpd, inside = at_time(curve, base["train_s_same_path"])
    mean, spread = mean_spread(base["bpd"])
    gap = bpd - mean
    standing = "a tie" if abs(gap) <= spread else ("ahead" if gap < 0 else "behind")
    where = "" if inside else ", extrapolated beyond its budgets"
    return (f"{bpd:.3f} at the base's {base['budget']:g}-TFLOP training time "
            f"({base['train_s_same_path'] / 60:.1f} min on the same path{where}): {standing} "
            f"({gap:+.3f})")


# ------------------------------------------------------------------------------------------
# An experiment: its sweep table, its table with verdicts, trends and equal time, pictures

def no_runs(claim: str, name: str) -> str:
    """An experiment's text before its first run: the claim and the command that runs it."""
    return f"Claim: {claim}.\n\nNo runs yet: `python ablate.py --experiment {name}`."


def experiment(name: str, e: dict, found: dict, figures: str) -> str:
    """The markdown of one experiment (found: ablate.experiment_rows) and its pictures."""
    rows, first = found["rows"], e["variants"][0].name
    if not rows and not found["sweeps"]:
        return no_runs(e["claim"], name)
    by_budget = {}
    for r in rows:
        by_budget.setdefault(r["budget"], []).append(r)
    by_budget = {b: rs for b, rs in by_budget.items() if rs[0]["variant"] == first and rs[0]["bpd"]}
    lines = [f"Claim: {e['claim']}.", "", sweep_table(found), "", verdict_lines(e, by_budget),
             "", results_table(rows, first)]
    series = [(v.name, [(r["budget"], r["bpd"]) for r in rows
                        if r["variant"] == v.name and r["bpd"]]) for v in e["variants"]]
    pictures.write_study(os.path.join(figures, f"{name}.svg"), series,
                         f"{name}: {e['question']} (each variant at its tuned lr)",
                         "training TFLOP a run (log scale)")
    sweeps = [(f"{v} at {b:g} TFLOP", [(lr, [s]) for lr, s in sorted(scores.items())
                                        if math.isfinite(s)])
              for v, at in found["sweeps"].items() for b, scores in sorted(at.items())]
    pictures.write_study(os.path.join(figures, f"{name}_sweep.svg"), sweeps,
                         f"{name}: held-out bits/dim against the learning rate (seed 0)",
                         "peak learning rate (log scale)", y_label="held-out bits/dim")
    if name == "depth_tradeoff":
        frontier(rows, figures)
    return "\n".join(lines)


def sweep_table(found: dict) -> str:
    """Held-out bits/dim of every seed-0 run by learning rate, a row per variant and budget,
    the best in bold; "no" in the last column where the best is at an end of the sweep."""
    lrs = sorted({lr for at in found["sweeps"].values() for s in at.values() for lr in s})
    lines = ["| variant | TFLOP | " + " | ".join(f"lr {lr:g}" for lr in lrs)
             + " | best lr | inside the sweep |",
             "| --- | ---: | " + " | ".join("---:" for _ in lrs) + " | ---: | --- |"]
    for v, at in found["sweeps"].items():
        for budget, scores in sorted(at.items()):
            best = min(scores, key=lambda lr: (scores[lr], lr))
            cells = ["" if lr not in scores else "diverged" if not math.isfinite(scores[lr])
                     else f"**{scores[lr]:.3f}**" if lr == best else f"{scores[lr]:.3f}"
                     for lr in lrs]
            inside = min(scores) < best < max(scores)
            lines.append(f"| {v} | {budget:g} | " + " | ".join(cells)
                         + f" | {best:g} | {'yes' if inside else 'no'} |")
    return "\n".join(lines)


def verdict_lines(e: dict, by_budget: dict) -> str:
    """A sentence per budget (each variant's standing against the base and the claim's
    verdict), then each variant's trend across budgets and its standing at equal time."""
    out, trends = [], []
    for budget, rows in sorted(by_budget.items()):
        base, others = rows[0], rows[1:]
        if not others:
            continue
        parts = []
        for r in others:
            standing, gap = compare(base["bpd"], r["bpd"])
            word = verdict(e["expect"], standing)
            parts.append(f"{r['variant']} {np.mean(r['bpd']):.3f}, {gap:+.3f}: {standing}"
                         + (f", {word}" if word else ""))
        out.append(f"- **At {budget:g} TFLOP** (base {np.mean(base['bpd']):.3f}): "
                   + "; ".join(parts) + ".")
    for v in dict.fromkeys(r["variant"] for rows in by_budget.values() for r in rows[1:]):
        mine = [(b, next(r for r in rows if r["variant"] == v), rows[0])
                for b, rows in sorted(by_budget.items())
                if any(r["variant"] == v for r in rows)]
        gaps = [(b, float(np.mean(r["bpd"]) - np.mean(base["bpd"]))) for b, r, base in mine]
        standings = [compare(base["bpd"], r["bpd"])[0] for _, r, base in mine]
        phrase = trend(gaps, standings)
        trends.append(phrase)
        top_b, _, top_base = mine[-1]
        timed = equal_time(top_base, [r for _, r, _ in mine])
        if phrase or timed:
            out.append(f"- **{v}**: " + "; ".join(p for p in (phrase, f"at equal time {timed}"
                                                               if timed else "") if p) + ".")
    if summary := every(trends):
        out.append(f"- {summary}")
    return "\n".join(out)


def results_table(rows: list[dict], first: str) -> str:
    """A row per variant and budget: its lr, sizes, seeds' test bits/dim, mean, spread and
    standing against the first variant (compare)."""
    lines = ["| variant | TFLOP | lr | params | train GFLOP/img | steps | wall/run | "
             "test bpd per seed | mean | spread | vs base |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    bases = {r["budget"]: r["bpd"] for r in rows if r["variant"] == first}
    for r in sorted(rows, key=lambda r: r["budget"]):
        mean, spread = mean_spread(r["bpd"])
        versus = ""
        if r["variant"] != first and r["budget"] in bases:
            standing, gap = compare(bases[r["budget"]], r["bpd"])
            versus = f"{gap:+.3f} ({standing})"
        seeds = " ".join(f"{b:.3f}" for b in r["bpd"]) + " diverged" * r["diverged"]
        lines.append(f"| {r['variant']} | {r['budget']:g} | {r['lr']:g} | {r['params']:,} | "
                     f"{r['train_gflop_per_image']:.3f} | {r['steps']} | "
                     f"{r['wall_min']:.1f} min | {seeds} | {mean:.3f} | {spread:.3f} | "
                     f"{versus} |")
    return "\n".join(lines)


def frontier(rows: list[dict], figures: str) -> None:
    """The depth frontier: bits/dim against forward GFLOP per image, a line per budget
    through the shapes no cheaper shape beats."""
    series = [(f"{b:g} TFLOP", [(r["train_gflop_per_image"] / 3, r["bpd"], r["variant"][:5])
                                for r in rows if r["budget"] == b and r["bpd"]])
              for b in sorted({r["budget"] for r in rows})]
    pictures.write_study(os.path.join(figures, "depth_tradeoff_frontier.svg"), series,
                         "Which shape is best at each budget? (line: the best at that cost "
                         "or less)", "forward GFLOP per image (log scale)", frontier=True)


# ------------------------------------------------------------------------------------------
# Scarce data, transfer, costs

def scarce(claim: str, rows: list[dict], regime: dict, figures: str) -> str:
    """The scarce-data table (rows as ablate.row, with each run's held-out curve [(epoch,
    held-out bpd, training-slice bpd)]) and the held-out curves' picture."""
    if not any(r["bpd"] for r in rows):
        return no_runs(claim, "scarce_data")
    lines = [f"Claim: {claim}.", "",
             "| variant | lr | TFLOP | steps | test bpd per seed | mean | spread | vs base | "
             "best held-out at epoch | end: train / held-out bpd | gap | wall/run |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | --- | --- | --- | ---: | ---: |"]
    series = []
    for r in rows:
        if not r["bpd"]:
            continue
        mean, spread = mean_spread(r["bpd"])
        versus = "" if r is rows[0] else "{1:+.3f} ({0})".format(*compare(rows[0]["bpd"],
                                                                          r["bpd"]))
        best = ", ".join(f"{min(c, key=lambda p: p[1])[0]:.0f}" for c in r["curves"])
        held, trained = (float(np.mean([c[-1][i] for c in r["curves"]])) for i in (1, 2))
        lines.append(f"| {r['variant']} | {r['lr']:g} | {r['budget']:g} | {r['steps']} | "
                     f"{' '.join(f'{b:.3f}' for b in r['bpd'])} | {mean:.3f} | {spread:.3f} | "
                     f"{versus} | {best} | {trained:.3f} / {held:.3f} | {held - trained:.3f} "
                     f"| {r['wall_min']:.1f} min |")
        by_epoch = {}
        for c in r["curves"]:
            for epoch, bpd, _ in c:
                by_epoch.setdefault(round(epoch, 1), []).append(bpd)
        series.append((r["variant"], sorted(by_epoch.items())))
    pictures.write_study(os.path.join(figures, "scarce_data.svg"), series,
                         f"Does Jet overfit {regime['train_images']:,} images? held-out "
                         "bits/dim during training", "epoch", log_x=False,
                         y_label="held-out bits/dim")
    return "\n".join(lines)


TRANSFER_ROWS = {"pretrained": "pretrained on Tiny ImageNet 32x32, not fine-tuned",
                 "scratch 2000": "from scratch", "tuned 2000": "pretrained, then fine-tuned",
                 "scratch 2000, equal compute": "from scratch, pretraining's FLOPs added",
                 "scratch all": "from scratch", "tuned all": "pretrained, then fine-tuned",
                 "scratch all, equal compute": "from scratch, pretraining's FLOPs added"}


def transfer(claim: str, rows: dict, evals: dict) -> str:
    """The transfer table (rows: ablate.transfer_rows, runs by seed or None; evals: run id ->
    its bits/dim on the fine-tuning set's test images), each fine-tuned row against from
    scratch at its own FLOPs and at equal compute (compare)."""
    if not any(r for runs in rows.values() for r in runs):
        return no_runs(claim, "transfer")
    lines = [f"Claim: {claim}.", "",
             "| model | CIFAR-10 training images | TFLOP in all | test bpd per seed | mean | "
             "vs from scratch, same fine-tuning FLOPs | vs from scratch, equal compute |",
             "| --- | --- | ---: | --- | ---: | --- | --- |"]
    for key, runs in rows.items():
        runs = [r for r in runs if r and not r.get("diverged")]
        if not runs:
            continue
        if key == "pretrained":
            bpd = [evals[r["id"]] for r in runs if r["id"] in evals]
            tflop = runs[0]["budget"]
        else:
            bpd = [r["test_bpd"] for r in runs]
            tflop = runs[0]["budget"] + (rows["pretrained"][0] or {}).get(
                "budget", 0) * key.startswith("tuned")
        versus = ["", ""]
        if key.startswith("tuned"):
            for i, other in enumerate((key.replace("tuned", "scratch"),
                                       key.replace("tuned", "scratch") + ", equal compute")):
                them = [r["test_bpd"] for r in rows.get(other, []) if r and r["test_bpd"]]
                if them:
                    versus[i] = "{1:+.3f} ({0})".format(*compare(them, bpd))
        images = "none" if key == "pretrained" else key.split()[1].rstrip(",").replace(
            "2000", "2,000")
        lines.append(f"| {TRANSFER_ROWS[key]} | {images} | {tflop:g} | "
                     f"{' '.join(f'{b:.3f}' for b in bpd)} | {np.mean(bpd):.3f} | "
                     f"{versus[0]} | {versus[1]} |")
    return "\n".join(lines)


def costs(records: list[dict]) -> str:
    """The cost table: each variant's measured training step (ablate.measure_costs) and the
    path it trains on."""
    if not records:
        return "Not measured yet: `python ablate.py --costs --experiment NAME`."
    lines = ["| variant | path | params | GFLOP/img | ms/step | memory |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in records:
        lines.append(f"| {r['variant']} | {r['path']} | {r['params']:,} | "
                     f"{r['gflop_per_image']:.3f} | {r['ms_per_step']:.0f} | "
                     f"{r['memory_mb']:.0f} MB |")
    return "\n".join(lines)
