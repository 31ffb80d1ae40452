"""What a training run keeps besides the checkpoint folders themselves (their format is in
gaelle_ray.storage): the record of why a run stopped itself (STOPPED.json in the run's
folder), and each rank's queue state after a change of world size.

Ray Train uploads each checkpoint folder to the run's storage and keeps the newest
`train.keep_checkpoints`; `storage.latest_epoch` finds the newest complete one from the
storage side (the data stream starts there after a restart).
"""

from __future__ import annotations

import logging

from gaelle_ray import storage
from gaelle_ray.losses.queue import resplit_queue_states

log = logging.getLogger(__name__)

STOP_FILE = "STOPPED.json"


def write_stop_reason(run_uri: str, reason: str, epoch: int, iteration: int) -> None:
    """Record why a run stopped itself (Ray's result carries only checkpointed metrics)."""
    storage.write_json(run_uri, STOP_FILE, {"reason": reason, "epoch": epoch, "iteration": iteration})


def read_stop_reason(run_uri: str) -> dict | None:
    """The stop record of a run's folder, or None when the run did not stop itself."""
    return storage.read_json(run_uri, STOP_FILE)


def clear_stop_reason(run_uri: str) -> None:
    storage.delete_file(run_uri, STOP_FILE)


def queues_for_rank(saved: list[dict | None] | None, rank: int, world_size: int, lengths: dict[str, int],
                    name: str) -> dict | None:
    """This rank's queue state from every old rank's saved queue states.

    Same world size: the rank's own queue. Different world size: re-split across the new
    ranks (resplit_queue_states), or None (start empty, with a warning) when it cannot be.
    """
    if not saved or any(s is None for s in saved):
        return None
    if len(saved) == world_size:
        return saved[rank]
    log.warning("%s: checkpoint was written by %d workers, resuming with %d: re-splitting the queue",
                name, len(saved), world_size)
    parts = resplit_queue_states(saved, world_size, lengths.get(name, 0))
    return None if parts is None else parts[rank]
