"""Embedding queues: newest first, fill-then-use, checkpointable, re-split across world sizes."""

import pytest
import torch

from gaelle_ray.losses.queue import EmbeddingQueue, per_worker_length, resplit_queue_states


def test_per_worker_length_rounds_to_global_batch_multiples():
    assert per_worker_length(3840, 64, 2) == 1920
    assert per_worker_length(3900, 64, 2) == 1920  # 3900 - 3900 % 128 = 3840
    assert per_worker_length(0, 64, 2) == 0


def test_round_robin_newest_first_and_fill_then_use():
    q = EmbeddingQueue(n_crops=2, length=6, dim=3)
    protos = torch.eye(3)
    for step in range(3):
        assert q.scores(protos) is None  # not used until full
        q.push(torch.full((2, 2, 3), float(step + 1)))
    assert q.buffer[0, :, 0].tolist() == [3, 3, 2, 2, 1, 1]  # newest at the front
    scores = q.scores(protos)
    assert scores.shape == (2, 6, 3) and q.in_use
    q.push(torch.full((2, 2, 3), 4.0))
    assert q.buffer[1, :, 0].tolist() == [4, 4, 3, 3, 2, 2]


def test_local_queue_is_scored_with_the_prototypes_it_is_given():
    q = EmbeddingQueue(1, 2, 2)
    q.push(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    local_protos = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    # row r, prototype k: <queued embedding r, prototype k>, worked out by hand
    torch.testing.assert_close(q.scores(local_protos)[0], torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]]))


def test_state_dict_roundtrip_and_shape_check():
    q = EmbeddingQueue(2, 4, 3)
    q.push(torch.randn(2, 4, 3))
    q.scores(torch.eye(3))
    r = EmbeddingQueue(2, 4, 3)
    r.load_state_dict(q.state_dict())
    assert r.in_use and torch.equal(r.buffer, q.buffer)
    with pytest.raises(ValueError, match="resized|world size"):
        EmbeddingQueue(2, 8, 3).load_state_dict(q.state_dict())


def test_resplit_for_a_new_world_size():
    states = []
    for w in range(2):
        q = EmbeddingQueue(2, 4, 3)
        q.push(torch.full((2, 4, 3), float(w + 1)))
        q.in_use = True
        states.append(q.state_dict())
    four = resplit_queue_states(states, new_world=4, new_length=2)
    assert len(four) == 4 and all(s["buffer"].shape == (2, 2, 3) for s in four)
    rows = torch.cat([s["buffer"] for s in four], dim=1)
    assert sorted(rows[0, :, 0].tolist()) == [1, 1, 1, 1, 2, 2, 2, 2]  # nothing lost or duplicated
    assert resplit_queue_states(states, new_world=1, new_length=16) is None  # too few rows: start empty
