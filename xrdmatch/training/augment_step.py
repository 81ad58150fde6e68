"""The trainer's augmentation step: the drawn rows of the peak-list pools -> weak and strong views.

One step = a weak view of the labelled rows and of the unlabelled rows (one call) and a strong
view of the unlabelled rows, written into one reused (n_l + 2 n_u, L) input buffer; with no
unlabelled rows (supervised) only the labelled weak view.

On a GPU that step is ~300 small kernels whose launches, not their arithmetic, take its time
(2.2 ms op by op on an H200, 0.35 ms replayed from a graph: README, "Training throughput").
With ``cuda_graph`` it is captured once as a CUDA graph and replayed: the drawn indices are
copied into static index tensors and the gathers run inside the graph; the generator is
registered with the graph, so every replay draws fresh numbers from it. The pools are baked
into the graph: a new pool (a pseudo-label round) takes a new :class:`AugmentStep`. Capture is
checked once against the same step run op by op from the same generator state (they must be
bit-identical); if capture fails or differs, the step runs op by op and says so in a warning.
"""

from __future__ import annotations

import warnings

import torch

from xrdmatch.config import AugmentConfig
from xrdmatch.training.augment import Peaks, cat_peaks, strong_augment, weak_augment


class AugmentStep:
    def __init__(self, pool_l: Peaks, pool_u: Peaks | None, n_l: int, n_u: int, cfg: AugmentConfig,
                 gen: torch.Generator, out: torch.Tensor, cuda_graph: bool = False):
        if out.shape[0] != n_l + 2 * n_u:
            raise ValueError(f"AugmentStep: out has {out.shape[0]} rows, the step writes {n_l + 2 * n_u}")
        if n_u and pool_u is None:
            raise ValueError("AugmentStep: n_u > 0 needs an unlabelled pool")
        self.pool_l, self.pool_u, self.n_l, self.n_u = pool_l, pool_u, n_l, n_u
        self.cfg, self.gen, self.out = cfg, gen, out
        # static index buffers: what a captured graph reads (0 is a valid row of a non-empty pool)
        self.idx_l = torch.zeros(n_l, dtype=torch.long, device=out.device)
        self.idx_u = torch.zeros(n_u, dtype=torch.long, device=out.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if cuda_graph and out.is_cuda:
            try:
                self.graph = self._capture()
            except Exception as err:  # noqa: BLE001 - a beta CUDA API: fall back, never stop training
                warnings.warn(f"augmentation: CUDA graph capture failed ({type(err).__name__}: {err}); "
                              "running the step op by op", stacklevel=2)

    def __call__(self, idx_l: torch.Tensor, idx_u: torch.Tensor | None = None) -> torch.Tensor:
        """Augment pool_l rows ``idx_l`` (and pool_u rows ``idx_u``) into ``out``; returns ``out``."""
        self.idx_l.copy_(idx_l)
        if self.n_u:
            self.idx_u.copy_(idx_u)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()
        return self.out

    def _run(self) -> None:
        lab = self.pool_l.take(self.idx_l)
        if not self.n_u:
            weak_augment(lab, self.cfg, self.gen, out=self.out[: self.n_l])
            return
        unl = self.pool_u.take(self.idx_u)
        # one weak call for labelled + unlabelled rows: op by op, the cost is per call, not per row
        weak_augment(cat_peaks(lab, unl), self.cfg, self.gen, out=self.out[: self.n_l + self.n_u])
        strong_augment(unl, self.cfg, self.gen, out=self.out[self.n_l + self.n_u :])

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        side = torch.cuda.Stream(self.out.device)
        side.wait_stream(torch.cuda.current_stream(self.out.device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                self._run()
        torch.cuda.current_stream(self.out.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.gen)  # each replay advances gen's Philox offset
        # thread_local: other threads of a Ray Train worker may use CUDA while this one captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._run()
        state = self.gen.get_state()
        self._run()
        eager = self.out.clone()
        self.gen.set_state(state)
        graph.replay()
        if not torch.equal(eager, self.out):
            warnings.warn("augmentation: the CUDA graph's output differs from the same step op by op; "
                          "running the step op by op", stacklevel=3)
            return None
        return graph
