"""What a campaign did, for people: `campaign status` lines and a self-contained HTML report.

The report has no external resources (figures are base64 PNG, styles inline), so it can be
mailed or archived as one file. Everything is read back from the campaign store, the
queue/label store, the scores Parquet files and the MLflow registry.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from xrdmatch.config import Config, redact
from xrdmatch.platform.campaign_store import DONE, CampaignStore, campaign_id_for
from xrdmatch.training.metrics import metric_text

STAGE_ORDER = ("patterns", "train", "register", "screen", "select", "validate", "label")


def _first_line(e: BaseException) -> str:
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg.splitlines()[0]}" if msg else type(e).__name__


def _error_line(error: str) -> str:
    """The line of a stored stage error worth showing: its first, cut at 300 characters."""
    lines = error.strip().splitlines()
    return lines[0][:300] if lines else ""


def _open(cfg: Config) -> tuple[CampaignStore, str]:
    from xrdmatch.platform.db import store_url
    from xrdmatch.platform.paths import RunPaths

    root = RunPaths.of(cfg.run_dir).root
    cid = campaign_id_for(root, create=False)  # CampaignError: a campaign.json that cannot be used
    if cid is None:
        raise FileNotFoundError(f"no campaign in {root} (no campaign.json); start one with `xrdmatch campaign run`")
    url = store_url(cfg)
    return CampaignStore(url, cid), url


def _champion(cfg: Config) -> dict[str, Any] | None:
    """The registry's champion, or None if there is none yet; RuntimeError if the store cannot be read."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from xrdmatch.platform.campaign import _champion as champ
    from xrdmatch.platform.registry import not_found
    from xrdmatch.platform.tracking import configure, tracking_uri

    try:
        uri = tracking_uri(cfg)
    except Exception as e:  # noqa: BLE001 - e.g. the run directory cannot be created
        raise RuntimeError(f"tracking store: {_first_line(e)}") from e
    try:
        configure(cfg)
        # campaign._champion says None for any failure; ask once here to tell "no champion" from "no store"
        MlflowClient().get_model_version_by_alias(cfg.tracking.registry_name, "champion")
    except MlflowException as e:
        if not not_found(e):
            raise RuntimeError(f"tracking store {redact(uri)}: {_first_line(e)}") from e
        return None
    except Exception as e:  # noqa: BLE001 - unreadable store (corrupt SQLite, bad URI, ...)
        raise RuntimeError(f"tracking store {redact(uri)}: {_first_line(e)}") from e
    return champ(cfg)


def current_stage(store: CampaignStore) -> tuple[int, str, str] | None:
    """(round, stage, status) of the first stage that is not done, or None. A round that is not
    done but whose stages so far are (killed between two stages) is at its first stage not yet
    started ("pending")."""
    stages = store.stages()
    for s in stages:
        if s.status != DONE:
            return s.round, s.stage, s.status
    recorded = {(s.round, s.stage) for s in stages}
    for r in store.rounds():
        if r.status != DONE:
            nxt = next((name for name in STAGE_ORDER if (r.round, name) not in recorded), None)
            if nxt is not None:
                return r.round, nxt, "pending"
    return None


def campaign_status(cfg: Config) -> list[str]:
    from xrdmatch.platform import queue
    from xrdmatch.platform.labels import list_labels

    store, url = _open(cfg)
    camp = store.campaign()
    lines = [f"campaign {store.cid} in {cfg.run_dir}: {camp.status if camp else 'unknown'}"]
    by_round: dict[int, dict[str, Any]] = {}
    for s in store.stages():
        by_round.setdefault(s.round, {})[s.stage] = s
    for rnd in sorted(by_round):
        parts = []
        for name in STAGE_ORDER:
            s = by_round[rnd].get(name)
            if s is None:
                parts.append(f"{name}: -")
            elif s.status == DONE:
                parts.append(f"{name}: done {s.duration_s:.0f}s")
            else:
                parts.append(f"{name}: {s.status.upper()} (attempt {s.attempts})")
        lines.append(f"round {rnd}: " + ", ".join(parts))
        for name in STAGE_ORDER:  # why a stage failed: the traceback is gone with the terminal
            s = by_round[rnd].get(name)
            if s is not None and s.status != DONE and s.error:
                lines.append(f"  {name} {s.status.lower()}: {_error_line(s.error)}")
    from xrdmatch.platform.lock import lock_holder
    from xrdmatch.platform.paths import RunPaths

    holder = lock_holder(RunPaths.of(cfg.run_dir).lock_file)
    cur = current_stage(store)
    if cur:
        who = (f"; campaign process pid {holder.get('pid')} on {holder.get('host')}" if holder
               else "; no campaign process: rerun `xrdmatch campaign run` to resume")
        lines.append(f"current: round {cur[0]} stage {cur[1]} ({cur[2]}{who})")
    elif by_round:
        done = sum(r.status == DONE for r in store.rounds())
        lines.append(f"current: none ({done} rounds finished)")
    counts = queue.counts_by_state(url)
    lines.append("queue: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    labels = list_labels(url)
    methods: dict[str, int] = {}
    for lab in labels:
        methods[lab.method] = methods.get(lab.method, 0) + 1
    from xrdmatch.platform.data import LabelledDataError, load_labelled

    try:
        methods = {"paper": len(load_labelled(cfg.labels.path))} | methods
        lines.append("labels: " + (", ".join(f"{k} {v}" for k, v in methods.items()) or "none"))
    except Exception as e:  # noqa: BLE001 - shown, not hidden: a campaign cannot train without it
        why = str(e) if isinstance(e, LabelledDataError) else f"{cfg.labels.path}: {_first_line(e)}"
        rest = ", ".join(f"{k} {v}" for k, v in methods.items())
        lines.append(f"labels: ERROR {why}" + (f" (store: {rest})" if rest else ""))
    cands = store.candidates()
    if cands:
        lines.append("candidates: " + ", ".join(f"r{c.round} {c.formula} ({c.structure_id}) p={c.p_mean:.2f} "
                                                f"{c.verdict or 'pending'}" for c in cands))
    try:
        champ = _champion(cfg)
    except RuntimeError as e:
        lines.append(f"champion: unavailable ({e})")
    else:
        if champ:
            ms = ", ".join(f"{k} {metric_text(k, v)}" for k, v in sorted(champ["metrics"].items())
                           if k.startswith("grouped_cv"))
            hand = f"; set by hand ({champ['by_hand']})" if champ.get("by_hand") else ""
            lines.append(f"champion: {cfg.tracking.registry_name} v{champ['version']} ({ms or 'no metrics'}){hand}")
        else:
            lines.append("champion: none yet")
    return lines


# ------------------------------------------------------------------------------------ figures
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def histogram_png(scores_by_round: dict[int, np.ndarray], threshold: float = 0.5) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    bins = np.linspace(0, 1, 41)
    for rnd, p in sorted(scores_by_round.items()):
        ax.hist(p, bins=bins, histtype="step", linewidth=1.6, label=f"round {rnd} (n={len(p)})")
    ax.axvline(threshold, color="grey", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("mean P(superionic) over the ensemble")
    ax.set_ylabel("structures")
    ax.set_title("Screening scores over the database")
    ax.legend(fontsize=8)
    return _png(fig)


def _plain(text: str) -> str:
    """A user's string (an id, a formula) as matplotlib text, never as maths: '$' would start
    mathtext, and an unbalanced one makes the whole report fail."""
    return text.replace("$", r"\$")


def arrhenius_png(series: list[dict[str, Any]]) -> str | None:
    """log10 D vs 1000/T per validated candidate, with its Arrhenius fit when Ea is known."""
    pts = [s for s in series if s.get("diffusivity")]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for s in pts:
        T = np.array(sorted(s["diffusivity"]), dtype=float)
        D = np.array([s["diffusivity"][t] for t in sorted(s["diffusivity"])], dtype=float)
        ok = D > 0
        if not ok.any():
            continue
        label = _plain(f"{s['formula']} ({s['structure_id']}, {s.get('verdict') or '?'})")
        line, = ax.plot(1000.0 / T[ok], np.log10(D[ok]), "o", label=label)
        if ok.sum() >= 2:
            slope, icpt = np.polyfit(1000.0 / T[ok], np.log10(D[ok]), 1)
            xs = np.linspace(1000.0 / 1300.0, 1000.0 / 300.0, 50)
            ax.plot(xs, slope * xs + icpt, "--", color=line.get_color(), linewidth=1)
    ax.axvline(1000.0 / 300.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("1000 / T (1/K)")
    ax.set_ylabel("log10 D(Li) (cm$^2$/s)")
    ax.set_title("Arrhenius plots of validated candidates (dotted: 300 K)")
    ax.legend(fontsize=7)
    return _png(fig)


def patterns_png(ids: list[str], X: np.ndarray, p: np.ndarray, title: str) -> str:
    from xrdmatch import N_BINS, TWO_THETA_STEP

    plt = _plt()
    n = len(ids)
    fig, axes = plt.subplots(n, 1, figsize=(6.4, 1.3 * n + 0.6), sharex=True, squeeze=False)
    tt = TWO_THETA_STEP * np.arange(N_BINS) if X.shape[1] == N_BINS else np.arange(X.shape[1])
    for ax, sid, x, pi in zip(axes[:, 0], ids, X, p):
        ax.plot(tt[: len(x)], x, linewidth=0.7)
        ax.set_yticks([])
        ax.text(0.99, 0.8, f"{sid}  p={pi:.2f}", transform=ax.transAxes, ha="right", fontsize=8, parse_math=False)
    axes[-1, 0].set_xlabel("2θ (degrees)")
    axes[0, 0].set_title(title)
    return _png(fig)


def metrics_png(rows: list[dict[str, Any]]) -> str | None:
    keys = sorted({k for r in rows for k in r["metrics"] if k.startswith("grouped_cv_")
                   and k.removeprefix("grouped_cv_") in ("macro_f1", "f1_superionic", "pr_auc")})
    if not keys:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    for k in keys:
        xs = [r["round"] for r in rows if k in r["metrics"]]
        ys = [r["metrics"][k] for r in rows if k in r["metrics"]]
        ax.plot(xs, ys, "o-", label=k.removeprefix("grouped_cv_"))
    ax.set_xlabel("round")
    ax.set_ylabel("grouped CV")
    ax.set_ylim(0, 1)
    ax.set_xticks(sorted({r["round"] for r in rows}))
    ax.legend(fontsize=8)
    ax.set_title("Model metrics per round")
    return _png(fig)


# ------------------------------------------------------------------------------------ html
def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "–" if not math.isfinite(x) else format(x, spec)
    return html.escape(str(x))


def _table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(b64: str | None, alt: str) -> str:
    if not b64:
        return f'<p class="empty">{html.escape(alt)}: nothing to plot yet.</p>'
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px} h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0;font-size:13px} th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3} .superionic{color:#0a7a2f;font-weight:600} .not_superionic{color:#8a1f11}
.empty{color:#777;font-style:italic} img{max-width:100%;border:1px solid #eee;margin:6px 0}
.meta{color:#555;font-size:13px}
"""


def build_report(cfg: Config) -> str:
    from xrdmatch.platform import queue
    from xrdmatch.platform.labels import list_labels

    store, url = _open(cfg)
    camp = store.campaign()
    stages = store.stages()
    results = {(s.round, s.stage): s for s in stages}
    rounds = sorted({s.round for s in stages})
    # a candidate's own MD verdict: its job's label, never another source's label of the structure
    labels = {str(lab.job_id): lab for lab in list_labels(url) if lab.job_id is not None}
    cands = store.candidates()

    parts = [f"<h1>xrdmatch campaign report</h1><p class='meta'>campaign {html.escape(store.cid)} · run dir "
             f"{html.escape(str(cfg.run_dir))} · status {html.escape(camp.status if camp else '?')} · "
             f"strategy {html.escape(cfg.campaign.acquisition)} · {cfg.campaign.candidates_per_round} candidates/round"
             f" · validation {html.escape(cfg.validation.calculator)}</p>"]

    # candidates per round
    parts.append("<h2>Candidates per round</h2>")
    rows = []
    for c in cands:
        lab = labels.get(str(c.job_id)) if c.job_id is not None else None
        sigma = lab.sigma_300 if lab is not None and lab.sigma_300 is not None else c.sigma_300k
        verdict = c.verdict or "pending"
        rows.append([str(c.round), str(c.rank + 1), _fmt(c.formula), _fmt(c.structure_id), _fmt(c.p_mean, ".3f"),
                     _fmt(c.p_std, ".3f"), f'<span class="{html.escape(verdict)}">{html.escape(verdict)}</span>',
                     _fmt(sigma, ".2e")])
    parts.append(_table(["round", "rank", "formula", "id", "P(superionic)", "spread", "verdict", "σ(300 K) S/cm"],
                        rows, "candidates") if rows else "<p class='empty'>no candidates yet</p>")

    # model metrics per round
    parts.append("<h2>Model metrics per round</h2>")
    mrows, mdata = [], []
    for rnd in rounds:
        tr = results.get((rnd, "train"))
        rg = results.get((rnd, "register"))
        sc = results.get((rnd, "screen"))
        if tr is None or tr.status != DONE:
            continue
        m = (tr.result or {}).get("metrics", {})
        mdata.append({"round": rnd, "metrics": m})
        reg = (rg.result or {}) if rg and rg.status == DONE else {}
        mrows.append([str(rnd), _fmt(tr.result.get("n_labelled")), _fmt(json.dumps(tr.result.get("by_source"))),
                      _fmt(m.get("grouped_cv_macro_f1"), ".3f"), _fmt(m.get("grouped_cv_f1_superionic"), ".3f"),
                      _fmt(m.get("grouped_cv_pr_auc"), ".3f"),
                      _fmt(f"v{reg['version']}" if reg.get("version") else None) + (" (champion)" if reg.get("promoted") else ""),
                      _fmt((sc.result or {}).get("n_positive") if sc and sc.status == DONE else None)])
    parts.append(_table(["round", "labels", "by source", "CV macro-F1", "CV F1 (superionic)", "CV PR-AUC",
                         "registered", "called superionic in database"], mrows) if mrows else "<p class='empty'>no model yet</p>")
    parts.append(_img(metrics_png(mdata), "model metrics per round"))

    # histogram
    parts.append("<h2>Probability histogram over the database</h2>")
    scores: dict[int, np.ndarray] = {}
    for srow in store.all_scores():
        p = Path(srow.path)
        if p.exists():
            import pyarrow.parquet as pq

            scores[srow.round] = pq.read_table(p, columns=["p_mean"]).column("p_mean").to_numpy()
    parts.append(_img(histogram_png(scores) if scores else None, "probability histogram"))

    # Arrhenius
    parts.append("<h2>Arrhenius plots of validated candidates</h2>")
    series = []
    for c in cands:
        lab = labels.get(str(c.job_id)) if c.job_id is not None else None
        if lab is not None and lab.diffusivity:
            series.append({"structure_id": c.structure_id, "formula": c.formula, "diffusivity": lab.diffusivity,
                           "verdict": c.verdict})
        elif c.detail_json:
            res = (json.loads(c.detail_json) or {}).get("result") or {}
            d = {float(k): float(v) for k, v in (res.get("diffusivity") or {}).items() if v is not None}
            if d:
                series.append({"structure_id": c.structure_id, "formula": c.formula, "diffusivity": d,
                               "verdict": c.verdict})
    parts.append(_img(arrhenius_png(series), "Arrhenius plot"))
    jobs = [j for j in queue.list_jobs(url) if j.structure_id in {c.structure_id for c in cands}]
    if jobs:
        parts.append(_table(["job", "structure", "state", "verdict", "σ(300 K)", "Ea (eV)", "error"],
                            [[str(j.id), _fmt(j.structure_id), _fmt(j.state), _fmt(j.verdict), _fmt(j.sigma_300, ".2e"),
                              _fmt((j.result or {}).get("ea_ev"), ".3f"), _fmt((j.error or "")[:160])] for j in jobs]))

    # patterns of top candidates
    parts.append("<h2>XRD patterns of the top candidates</h2>")
    for rnd in rounds:
        f = Path(cfg.run_dir) / "scores" / f"round-{rnd:03d}-patterns.npz"
        if f.exists():
            z = np.load(f, allow_pickle=False)
            ids = [str(i) for i in z["ids"]][:6]
            parts.append(_img(patterns_png(ids, z["X"][: len(ids)], z["p_mean"][: len(ids)],
                                           f"round {rnd}: picks and best-scored structures"), f"patterns round {rnd}"))

    # timings
    parts.append("<h2>Stage timings</h2>")
    trows = [[str(s.round), html.escape(s.stage), html.escape(s.status), str(s.attempts),
              _fmt(s.duration_s, ".1f"), html.escape(_error_line(s.error or "")) if s.status != DONE else ""]
             for s in stages]
    parts.append(_table(["round", "stage", "status", "attempts", "seconds", "error"], trows))
    body = "\n".join(parts)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>xrdmatch campaign report</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")


def write_report(cfg: Config, out: str | None = None) -> Path:
    """Build the report and write it whole (temporary file + rename): a failed write leaves the
    previous report, not half of a new one."""
    from xrdmatch.platform.paths import RunPaths
    from xrdmatch.platform.patterns import atomic_write_bytes

    path = Path(out).expanduser() if out else RunPaths.of(cfg.run_dir).root / "report.html"
    atomic_write_bytes(path, build_report(cfg).encode("utf-8"))
    return path
