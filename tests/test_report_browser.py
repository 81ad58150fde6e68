"""The campaign report renders in a real headless browser: tables, inlined figures, no network.

The campaign state is written through the real stores (campaign store, validation queue,
labels) and the real Parquet/npz formats, without training anything: the report only reads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from xrdmatch.config import load_config

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _fake_campaign(run_dir: Path, labelled) -> object:
    from xrdmatch.actors.screening import ScreeningResult, write_scores
    from xrdmatch.platform import queue
    from xrdmatch.platform.campaign_store import CampaignStore, campaign_id_for
    from xrdmatch.platform.labels import label_from_result
    from xrdmatch.simulation.validate import protocol_hash

    cfg = load_config(None, {"run_dir": str(run_dir)})
    url = f"sqlite:///{run_dir / 'store.db'}"
    store = CampaignStore(url, campaign_id_for(run_dir))
    store.ensure_campaign(str(run_dir), {})
    rng = np.random.default_rng(0)
    n = len(labelled)
    ids = [f"mp-{1000 + i}" for i in range(n)]
    picks = {1: [3, 7], 2: [11, 19]}
    for rnd in (1, 2):
        store.ensure_round(rnd)
        for stage in ("patterns", "train", "register", "screen", "select", "validate", "label"):
            store.start_stage(rnd, stage)
            result = {}
            extra = {}
            if stage == "train":
                result = {"n_labelled": 112 + rnd - 1, "by_source": {"paper": 112, "mlip-md": rnd - 1},
                          "metrics": {"grouped_cv_macro_f1": 0.6 + 0.05 * rnd, "grouped_cv_pr_auc": 0.4 + 0.1 * rnd,
                                      "grouped_cv_f1_superionic": 0.3 + 0.05 * rnd}}
            if stage == "register":
                result = {"name": "xrdmatch-superionic", "version": str(rnd), "promoted": rnd == 2}
            if stage == "screen":
                p = rng.beta(1, 4, size=n)
                res = ScreeningResult(p.astype(np.float32), (0.1 * rng.uniform(size=n)).astype(np.float32),
                                      np.zeros(n, np.float32))
                path = run_dir / "scores" / f"round-{rnd:03d}.parquet"
                sha = write_scores(path, ids, list(labelled.formulas), res)
                result = {"n": n, "n_positive": int((p >= 0.5).sum())}
                extra = {"scores": {"path": str(path), "n": n, "sha256": sha, "model_version": str(rnd)}}
            if stage == "select":
                extra = {"candidates": [
                    {"rank": r, "structure_id": ids[i], "formula": labelled.groups[i], "p_mean": 0.9 - 0.1 * r,
                     "p_std": 0.05, "score": 0.9 - 0.1 * r} for r, i in enumerate(picks[rnd])]}
                keep = picks[rnd] + [0, 1]
                np.savez_compressed(run_dir / "scores" / f"round-{rnd:03d}-patterns.npz",
                                    ids=np.asarray([ids[i] for i in keep]), X=labelled.X[keep],
                                    p_mean=np.linspace(0.9, 0.5, len(keep)))
            store.finish_stage(rnd, stage, result, 1.0 + rnd, **extra)
    # validation: one superionic verdict with an Arrhenius series, one inconclusive, one failed
    ph = protocol_hash(cfg.validation)
    for rnd, idx in picks.items():
        for i in idx:
            rec = {"id": ids[i], "formula": labelled.groups[i], "lattice": (3.0 * np.eye(3)).tolist(),
                   "species": ["Li", "Cl"], "frac_coords": [[0, 0, 0], [0.5, 0.5, 0.5]]}
            queue.submit(url, ids[i], rec, cfg.validation, campaign_round=rnd)
    outcomes = {ids[3]: "superionic", ids[7]: "inconclusive", ids[11]: "not_superionic", ids[19]: "failed"}
    while (job := queue.claim(url, "w0", 60)) is not None:
        v = outcomes[job.structure_id]
        if v == "failed":
            queue.fail(url, job.id, "w0", "MD exploded at 1200 K")
            store.update_candidate(job.structure_id, verdict="failed")
            continue
        T = [800.0, 1000.0, 1200.0]
        ea = {"superionic": 0.25, "inconclusive": 0.45, "not_superionic": 0.6}[v]
        D = {t: 1e-3 * np.exp(-ea / (8.617e-5 * t)) for t in T}
        result = {"structure_id": job.structure_id, "formula": job.formula, "verdict": v, "method": "mlip-md",
                  "sigma_300": 2e-3 if v == "superionic" else (1e-9 if v == "not_superionic" else None),
                  "temperatures": T, "diffusivity": D, "ea_ev": ea}
        label = label_from_result(result, protocol_hash=ph, job_id=job.id, record=job.record, campaign_round=1)
        queue.complete(url, job.id, "w0", result, label)
        store.update_candidate(job.structure_id, verdict=v, sigma_300k=result["sigma_300"], detail={"result": result})
    return cfg


def test_report_renders_in_headless_chromium(tmp_path, labelled):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("Debian chromium/chromedriver not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    from xrdmatch.platform.report import write_report

    run_dir = tmp_path / "run"
    cfg = _fake_campaign(run_dir, labelled)
    out = write_report(cfg, str(tmp_path / "report.html"))
    html_text = out.read_text()
    assert "http://" not in html_text and "https://" not in html_text  # self-contained
    assert html_text.count("data:image/png;base64,") >= 5  # metrics, histogram, Arrhenius, 2 pattern panels

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=1200,2400"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(out.as_uri())
        rows = driver.find_elements(By.CSS_SELECTOR, "table.candidates tbody tr")
        assert len(rows) == 4
        text = " ".join(r.text for r in rows)
        assert "superionic" in text and "inconclusive" in text and "failed" in text and "2.00e-03" in text
        imgs = driver.find_elements(By.TAG_NAME, "img")
        assert len(imgs) >= 5
        for img in imgs:  # every figure decoded (an inline PNG that fails to load has naturalWidth 0)
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 100
        headings = [h.text for h in driver.find_elements(By.TAG_NAME, "h2")]
        assert {"Candidates per round", "Probability histogram over the database",
                "Arrhenius plots of validated candidates", "Model metrics per round",
                "XRD patterns of the top candidates"} <= set(headings)
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1200, min(int(height) + 100, 8000))
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
        keep = Path("/tmp/xrdmatch-report-screenshot.png")
        shutil.copy(shot, keep)  # for a person to look at
    finally:
        driver.quit()


def test_ids_and_formulas_with_dollar_signs_are_drawn_as_text():
    # ids come from users' files: '$' would start matplotlib's mathtext, and an unbalanced one
    # used to make the whole report fail
    import numpy as np

    from xrdmatch.platform.report import arrhenius_png, patterns_png

    assert patterns_png(["cod-$\\alpha_{1$"], np.random.default_rng(0).random((1, 4501)), np.array([0.5]), "t")
    series = [{"formula": "Li$_{3$N", "structure_id": "x$", "verdict": "superionic",
               "diffusivity": {600.0: 1e-6, 800.0: 1e-5}}]
    assert arrhenius_png(series)
