"""Embedding queues (method.md section 5): extra rows for the Sinkhorn problem.

A queue holds, for each crop used for assignment, the newest `length` embeddings of this
worker, newest first. It is filled round-robin from the start and used only once it is
full (its last row non-zero); from then on it stays in use. Queues are training state:
`state_dict` / `load_state_dict`, and `resized` to re-split after a change of world size.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def per_worker_length(total_length: int, rows_per_step: int, world_size: int) -> int:
    """Rows each worker keeps: the total rounded down to a multiple of rows_per_step * W, over W.

    rows_per_step: rows one worker pushes per step (B for the global queue, B*S for the local).
    """
    if total_length <= 0:
        return 0
    step = rows_per_step * world_size
    return (total_length - total_length % step) // world_size


class EmbeddingQueue:
    """(n_crops, length, d) embeddings on one worker, newest first."""

    def __init__(self, n_crops: int, length: int, dim: int, device: torch.device | str = "cpu"):
        if n_crops <= 0 or length <= 0 or dim <= 0:
            raise ValueError(f"EmbeddingQueue needs positive sizes, got n_crops={n_crops}, length={length}, dim={dim}")
        self.buffer = torch.zeros(n_crops, length, dim, device=device)
        self.in_use = False

    @property
    def length(self) -> int:
        return self.buffer.shape[1]

    def is_full(self) -> bool:
        return bool((self.buffer[:, -1] != 0).any())

    def scores(self, prototypes: torch.Tensor) -> torch.Tensor | None:
        """Queue scores against the prototype matrix (K, d) -> (n_crops, length, K), or None
        while the queue is not yet used. Marks the queue used once it is full."""
        if not self.in_use and self.is_full():
            self.in_use = True
        if not self.in_use:
            return None
        with torch.no_grad():
            return self.buffer @ prototypes.detach().to(self.buffer.dtype).t()  # (n_crops, length, K)

    @torch.no_grad()
    def push(self, embeddings: torch.Tensor) -> None:
        """embeddings: (n_crops, rows, d) newest rows, put at the front; the oldest fall off."""
        if embeddings.dim() != 3 or embeddings.shape[0] != self.buffer.shape[0] or embeddings.shape[2] != self.buffer.shape[2]:
            raise ValueError(f"EmbeddingQueue.push: expected ({self.buffer.shape[0]}, rows, {self.buffer.shape[2]}), "
                             f"got {tuple(embeddings.shape)}")
        rows = embeddings.shape[1]
        if rows >= self.length:
            self.buffer.copy_(embeddings[:, : self.length])
            return
        self.buffer[:, rows:] = self.buffer[:, :-rows].clone()
        self.buffer[:, :rows] = embeddings.to(self.buffer.dtype)

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.detach().cpu().clone(), "in_use": self.in_use}

    def load_state_dict(self, state: dict) -> None:
        buf = state["buffer"]
        if tuple(buf.shape) != tuple(self.buffer.shape):
            raise ValueError(f"EmbeddingQueue.load_state_dict: saved queue has shape {tuple(buf.shape)}, "
                             f"this queue {tuple(self.buffer.shape)}; use resized() when the world size changed")
        self.buffer.copy_(buf.to(self.buffer.device))
        self.in_use = bool(state["in_use"])


def resplit_queue_states(states: list[dict], new_world: int, new_length: int) -> list[dict] | None:
    """Redistribute the queues of W old workers over `new_world` workers.

    states: the old workers' state dicts, rank order. Rows are interleaved newest-first
    (row r of every worker, then row r+1, ...) and dealt out round-robin, so each new
    worker gets a mix of recent rows. Returns None (with a warning) when the old queues
    cannot fill the new length: the caller then starts empty queues.
    """
    if not states:
        return None
    bufs = torch.stack([s["buffer"] for s in states])  # (W_old, n_crops, L_old, d)
    w_old, n_crops, l_old, dim = bufs.shape
    rows = bufs.permute(1, 2, 0, 3).reshape(n_crops, l_old * w_old, dim)  # (n_crops, L_old*W_old, d) newest first
    if rows.shape[1] < new_length * new_world:
        log.warning("queues of %d workers hold %d rows per crop, fewer than %d x %d needed: starting empty queues",
                    w_old, rows.shape[1], new_world, new_length)
        return None
    rows = rows[:, : new_length * new_world].reshape(n_crops, new_length, new_world, dim)  # (n_crops, L, W, d)
    in_use = all(s["in_use"] for s in states)
    return [{"buffer": rows[:, :, w].clone(), "in_use": in_use} for w in range(new_world)]
