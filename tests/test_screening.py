"""Screening on Ray actors survives losing one: real Ray, a real tiny ensemble, a real SIGKILL."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import numpy as np


def _scorer_pids() -> list[int]:
    """PIDs of the screening actors' processes (Ray titles them ``ray::_Scorer...``)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes().startswith(b"ray::_Scorer"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return sorted(pids)


def test_a_dead_screening_actor_is_replaced_and_its_blocks_scored_again(labelled, caplog):
    """An actor killed mid-screen (OOM killer, lost node): a new one scores its blocks, and every
    structure gets the ensemble's score, as if nothing had happened."""
    import ray

    from xrdmatch.actors.screening import blocks_of, screen
    from xrdmatch.config import TrainingConfig
    from xrdmatch.platform.ray_utils import init_ray
    from xrdmatch.training.ensemble import train_ensemble

    ens = train_ensemble(labelled.X, labelled.y, None, TrainingConfig(
        network="fast", algorithm="supervised", iterations=2, ensemble_size=2, batch_labelled=16), use_ray=False)
    X = np.repeat(np.asarray(labelled.X, np.float32), 4, axis=0)  # 448 patterns, 28 blocks of 16
    killed: list[int] = []

    def kill_an_actor(n_scored: int) -> None:
        if not killed:
            pid = _scorer_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    was_running = ray.is_initialized()
    init_ray(None, 2)
    try:
        with caplog.at_level(logging.WARNING, logger="xrdmatch.actors.screening"):
            res = screen(ens, blocks_of(X, 16), len(X), actors=2, progress=kill_an_actor)
    finally:
        if not was_running:
            ray.shutdown()
    assert killed and "screening actor" in caplog.text and "a new one scores its blocks again" in caplog.text
    want = ens.predict_proba(X)
    np.testing.assert_allclose(res.p_mean, want["p_mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.p_std, want["p_std"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(res.votes, want["votes"])


def test_scores_that_cannot_be_put_in_place_leave_no_temp_file(tmp_path):
    """``path`` a folder: os.replace fails; the written temp file is removed, not left beside it."""
    import pytest

    from xrdmatch.actors.screening import ScreeningResult, write_scores

    folder = tmp_path / "scores"
    folder.mkdir()
    res = ScreeningResult(p_mean=np.asarray([0.9]), p_std=np.zeros(1), votes=np.ones(1))
    with pytest.raises(OSError):
        write_scores(folder, ["a"], ["Li2O"], res)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores"] and list(folder.iterdir()) == []
