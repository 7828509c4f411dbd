"""The report of a hyperparameter search (`danlu tune`): report.md / report.html and plots/ in the tune
directory, from the summary that danlu.jobs.tune writes as tune.json (plain data: no Optuna needed here).

Sections: the best run (linked), the optimisation history (each trial's value and the best so far), the
validation curve of every trial (pruned ones stop early), parameter importance, and the trials table with a
link to every trial's own report.

>>> write_tune_report("runs/tune_zh_sentiment", summary)            # doctest: +SKIP
"""
from __future__ import annotations

import os

from danlu.evaluate.fonts import new_figure, plot_style
from danlu.evaluate.plots import TRAIN_COLOR, VAL_COLOR, save_figure
from danlu.evaluate.report import write_blocks

STATE_STYLE = {"complete": (TRAIN_COLOR, "o"), "pruned": ("#7f7f7f", "x"), "failed": (VAL_COLOR, "v")}


def write_tune_report(tune_dir, summary):
    """report.md and report.html of the search; returns the markdown path."""
    plots_dir = os.path.join(tune_dir, "plots")
    rows, metric, best = summary["trials"], summary["metric"], summary["best"]
    maximize = summary["direction"] == "maximize"
    counts = summary["counts"]
    blocks = [("h1", f"Hyperparameter search: {os.path.basename(os.path.normpath(tune_dir))}")]
    said = (f"{len(rows)} trials: {counts['complete']} completed, {counts['pruned']} pruned, {counts['failed']} failed. "
            f"Objective: `{metric}` on the validation split ({'higher' if maximize else 'lower'} is better); each "
            "trial is a run directory with its own report. Study: `study.db` (Optuna, SQLite).")
    blocks.append(("p", said))
    if best:
        test = f", test {best['test']:.4f}" if best.get("test") is not None else ""
        blocks.append(("h2", "Best run"))
        blocks.append(("p", f"**[{best['run']}]({best['run']}/report.html)** (trial {best['number']}): "
                            f"{metric} {best['value']:.4f}{test}; " + _params(best["params"])))
    kinds = per_kind(rows, maximize)
    if kinds:
        blocks.append(("h2", "Best of each model kind"))
        blocks.append(("table", ["model.kind", "trials", "best trial", metric, "test"],
                       [[kind, n, f"[{r['run']}]({r['run']}/report.html)", _num(r["value"]), _num(r["test"])]
                        for kind, (n, r) in kinds.items()]))
    blocks.append(("h2", "Optimisation history"))
    blocks.append(("image", plot_history(rows, metric, maximize, os.path.join(plots_dir, "history.png")),
                   "each trial's value (pruned: its last epoch's) and the best so far"))
    if any(r["curve"] for r in rows):
        blocks.append(("image", plot_trial_curves(rows, metric, os.path.join(plots_dir, "trials.png")),
                       f"{metric} after each epoch of each trial; pruned trials stop early"))
    blocks.append(("h2", "Parameter importance"))
    if summary["importance"]:
        blocks.append(("image", plot_importance(summary["importance"], os.path.join(plots_dir, "importance.png")),
                       "share of the variance of the objective over the completed trials (fANOVA)"))
    else:
        blocks.append(("p", "Needs at least two completed trials that differ in a parameter drawn in all of them."))
    blocks.append(("h2", "Trials"))
    keys = sorted({k for r in rows for k in r["params"]})
    header = ["trial", "state", metric, "test", "epochs", "seconds"] + keys
    table = [[f"[{r['run']}]({r['run']}/report.html)" if r["state"] in ("complete", "pruned") and r["run"] else r["number"],
              _state(r), _num(r["value"]), _num(r["test"]), r["epochs"] if r["epochs"] is not None else "",
              f"{r['seconds']:.1f}" if r["seconds"] is not None else ""] + [_cell(r["params"].get(k)) for k in keys]
             for r in rows]
    blocks.append(("table", header, table))
    return write_blocks(blocks, tune_dir)


def per_kind(rows, maximize):
    """{model.kind: (trials of that kind, its best completed trial)}, best kind first; {} unless the search
    draws model.kind."""
    best = {}
    for r in rows:
        kind = r["params"].get("model.kind")
        if kind is None:
            continue
        n, top = best.get(kind, (0, None))
        better = r["state"] == "complete" and r["value"] is not None and (
            top is None or (r["value"] > top["value"] if maximize else r["value"] < top["value"]))
        best[kind] = (n + 1, r if better else top)
    ranked = {k: v for k, v in best.items() if v[1] is not None}
    return dict(sorted(ranked.items(), key=lambda kv: kv[1][1]["value"], reverse=maximize))


def plot_history(rows, metric, maximize, path):
    """Each trial's value by trial number, marked by state, and the best value so far as a step line."""
    with plot_style():
        fig = new_figure(8, 4)
        ax = fig.subplots()
        for state, (color, marker) in STATE_STYLE.items():
            points = [(r["number"], r["value"]) for r in rows if r["state"] == state and r["value"] is not None]
            if points:
                xs, ys = zip(*points)
                ax.scatter(xs, ys, color=color, marker=marker, label=state, zorder=3)
        done = sorted((r["number"], r["value"]) for r in rows if r["state"] == "complete" and r["value"] is not None)
        if done:
            best, line = None, []
            for number, value in done:
                best = value if best is None else (max(best, value) if maximize else min(best, value))
                line.append((number, best))
            xs, ys = zip(*line)
            ax.step(xs, ys, where="post", color=VAL_COLOR, label="best so far")
        ax.set(xlabel="trial", ylabel=metric, title="optimisation history")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        return save_figure(fig, path)


def plot_trial_curves(rows, metric, path):
    """The validation metric after each epoch, one line per trial (pruned trials grey and dashed)."""
    with plot_style():
        fig = new_figure(8, 4)
        ax = fig.subplots()
        for r in rows:
            if not r["curve"]:
                continue
            pruned = r["state"] == "pruned"
            ax.plot(range(1, len(r["curve"]) + 1), r["curve"], marker="o", markersize=3,
                    linestyle="--" if pruned else "-", color="#7f7f7f" if pruned else None,
                    label=f"{r['number']}" + (" (pruned)" if pruned else ""))
        ax.set(xlabel="epoch", ylabel=metric, title="trials, epoch by epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if len(rows) <= 12:
            ax.legend(fontsize=7, title="trial")
        return save_figure(fig, path)


def plot_importance(importances, path):
    """Horizontal bars, the most important parameter on top."""
    names = sorted(importances, key=importances.get, reverse=True)
    values = [importances[n] for n in names]
    with plot_style():
        fig = new_figure(7, 1.2 + 0.45 * len(names))
        ax = fig.subplots()
        bars = ax.barh(range(len(names)), values, color=TRAIN_COLOR)
        ax.set(yticks=range(len(names)), xlim=(0, max(values + [0.0]) * 1.15 or 1), xlabel="importance",
               title="parameter importance")
        ax.set_yticklabels(names)
        ax.invert_yaxis()
        for bar, v in zip(bars, values):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.2f}", va="center")
        return save_figure(fig, path)


def _state(r):
    if r["interrupted"]:
        return "failed (interrupted; run again)"
    if r["error"]:
        return f"failed: {r['error'][:160]}"
    return r["state"] + (f" (re-run of {r['rerun_of']})" if r["rerun_of"] is not None else "")


def _params(params):
    return ", ".join(f"`{k}={_cell(v)}`" for k, v in params.items())


def _cell(value):
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _num(value):
    return f"{value:.4f}" if isinstance(value, (int, float)) else ""
