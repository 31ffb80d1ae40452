"""One GAELLE training step on one worker, and everything it carries between steps
(optimiser, gradient scaler, queues, colour augmentation, counters). Plain torch: the
Ray Train loop (train/loop.py) feeds it batches; tests drive it directly, in one process
or in several gloo processes.

A step: learning rate for this iteration -> prototypes normalised -> colour ops on the
device -> one backbone call per resolution under autocast -> queue scores -> losses ->
(agreed across workers) finite? -> backward (scaled under fp16) -> prototype gradients
dropped while frozen -> LARC step (skipped by the GradScaler after an fp16 overflow, which
then halves its scale) -> queues pushed.

A skipped step (a non-finite loss on any worker, or non-finite gradients behind a finite
loss) changes nothing that a checkpoint holds: no weight, optimiser buffer or queue moves,
and the model's buffers (BatchNorm running statistics, which the forward already updated
from the bad batch) are put back as they were before the step. Its reason names the
images whose crops held non-finite values, on every worker (`image_ids`: the batch's ids).

The same code runs on every device: `train.precision` autocasts on a CPU as on a GPU, and
`train.channels_last` lays out the crops (and the model, in train/loop.py) on both.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from gaelle_ray.data.colour import ColourAugment
from gaelle_ray.losses.gaelle import LossSettings, LossTerms, NonFiniteLossError, gaelle_losses, local_pairs
from gaelle_ray.losses.queue import EmbeddingQueue, per_worker_length
from gaelle_ray.precision import autocast, autocast_dtype, grad_scaler, to_layout
from gaelle_ray.train.optim import build_optimizer, drop_prototype_gradients, learning_rate, set_learning_rate


class TooManyNonFiniteSteps(RuntimeError):
    """Raised after train.max_nonfinite_steps non-finite steps in a row (a non-finite loss, or
    non-finite gradients behind a finite one; an fp16 overflow the GradScaler handles does not count)."""


def code_statistics(codes: torch.Tensor) -> tuple[float, float]:
    """codes: (A, B, K). Returns (mean per-sample code entropy / ln K, fraction of
    prototypes that are the argmax of at least one sample)."""
    k = codes.shape[-1]
    q = codes.float().clamp_min(1e-12)
    entropy = -(q * q.log()).sum(-1).mean() / math.log(k)
    in_use = torch.zeros(k, device=codes.device).index_fill_(0, codes.argmax(-1).flatten(), 1.0).mean()
    return float(entropy), float(in_use)


@dataclass
class StepMetrics:
    loss: float
    loss_global: float
    lr: float
    code_entropy: float
    prototypes_in_use: float
    nonfinite: bool
    step_seconds: float
    # None: the term's weight is 0, so it was not computed
    loss_local: float | None = None
    loss_l2g: float | None = None
    skip_reason: str = ""  # why a non-finite step was skipped (its images, when their input was non-finite)


def _value(term: torch.Tensor | None) -> float | None:
    return None if term is None else float(term.detach())


class GaelleStepper:
    """Holds one worker's training state and runs steps.

    model: the GaelleModel; forward_model: what the step calls (the model itself, or it
    wrapped in DistributedDataParallel and/or torch.compile; None = the model);
    group: the process group for Sinkhorn and for agreeing on skipped steps (None: one
    worker); the model carries the same group for its per-position BatchNorm, given when
    it was built (`build_model(config, position_group=group)`).
    """

    def __init__(self, model: nn.Module, config, device: torch.device, group=None,
                 world_size: int = 1, rank: int = 0, iters_per_epoch: int = 1,
                 forward_model: nn.Module | None = None):
        self.model = model
        self.forward_model = forward_model if forward_model is not None else model
        self.config = config
        self.device = device
        self.group = group
        self.world_size = world_size
        self.rank = rank
        self.iters_per_epoch = iters_per_epoch
        self.settings = LossSettings.from_config(config)
        self.optimizer = build_optimizer(self.model, config.optim)
        self.amp_dtype = autocast_dtype(config.train.precision, device)
        self.scaler = grad_scaler(self.amp_dtype, device)
        self.colour = (ColourAugment(config.augmentation, seed=config.train.seed * 1000 + rank, device=device)
                       if config.augmentation.colour_on_device else None)
        self.queue: EmbeddingQueue | None = None
        self.local_queue: EmbeddingQueue | None = None
        self.iteration = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        # the model's buffers as they were before the current step, put back when it is skipped
        self._buffers = list(self.model.buffers())
        self._buffers_before = [b.detach().clone() for b in self._buffers]

    # -- queues ------------------------------------------------------------------------

    def start_queues(self, epoch: int) -> None:
        """Create the queues once `epoch` reaches queue.epoch_queue_starts (if configured)."""
        qc, b = self.config.queue, self.settings.batch_size
        if epoch < qc.epoch_queue_starts:
            return
        a, d = len(self.settings.crops_for_assign), self.model.feat_dim
        if self.queue is None and qc.queue_length > 0:
            self.queue = EmbeddingQueue(a, per_worker_length(qc.queue_length, b, self.world_size), d, self.device)
        if self.local_queue is None and qc.local_queue_length > 0 and self.settings.weights[1] != 0:
            rows = b * self.settings.n_slots
            length = per_worker_length(qc.local_queue_length, rows, self.world_size)
            self.local_queue = EmbeddingQueue(a, length, d, self.device)

    # -- the step ----------------------------------------------------------------------

    def _prepare(self, crops: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """uint8 crops (n_r*B, 3, S, S) -> normalised float crops on the device."""
        out = []
        for c in crops:
            c = c.to(self.device, non_blocking=True)
            if self.colour is not None:
                c = self.colour(c)
            out.append(to_layout(c.float(), self.config.train.channels_last))
        return out

    def slot_perms(self) -> torch.Tensor | None:
        """(P, S): a new permutation of the S slots for each (code crop, predicting crop) pair
        of the local loss (`local_pairs` order), as the released step draws them; the same on
        every worker (seeded by train.seed and the iteration). None when loss.local_shuffle
        is off."""
        if not self.config.loss.local_shuffle:
            return None
        st = self.settings
        g = torch.Generator().manual_seed(self.config.train.seed * 1_000_003 + self.iteration)
        pairs = local_pairs(st.crops_for_assign, st.n_global)
        return torch.stack([torch.randperm(st.n_slots, generator=g) for _ in pairs]).to(self.device)

    def _all_finite(self, finite: bool) -> bool:
        """Every worker must agree to skip, or DDP's gradient all-reduce would hang."""
        if self.group is None:
            return finite
        flag = torch.tensor([1.0 if finite else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item() > 0)

    def _nonfinite_images(self, inputs: Sequence[torch.Tensor], image_ids: torch.Tensor | None) -> list:
        """The ids (or batch positions, without ids) of the images whose prepared crops hold a
        non-finite value. inputs: per resolution (n_r*B, 3, S, S), crop-major."""
        b = self.settings.batch_size
        bad = torch.zeros(b, dtype=torch.bool, device=inputs[0].device)
        for x in inputs:
            bad |= (~torch.isfinite(x).flatten(1).all(1)).reshape(-1, b).any(0)  # (n_r*B,) -> (B,)
        where = bad.nonzero().flatten().cpu().tolist()
        if image_ids is None:
            return [f"#{i}" for i in where]
        return [int(image_ids[i]) for i in where]

    def _skip_reason(self, error, inputs: Sequence[torch.Tensor], image_ids: torch.Tensor | None) -> str:
        """The reason of a skipped step, with the images of non-finite input on any worker (a
        collective: every worker skips the step together)."""
        mine = self._nonfinite_images(inputs, image_ids)
        everyone = [mine]
        if self.group is not None:
            everyone = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(everyone, mine, group=self.group)
        where = [", ".join(map(str, ids)) + (f" (worker {r})" if len(everyone) > 1 else "")
                 for r, ids in enumerate(everyone) if ids]
        reason = str(error or "another worker saw a non-finite loss")
        if where:
            reason += f"; non-finite input in image{'s' if sum(map(len, everyone)) > 1 else ''} " + ", ".join(where)
        return reason

    def step(self, crops: Sequence[torch.Tensor], epoch: int, total_epochs: int,
             image_ids: torch.Tensor | None = None) -> StepMetrics:
        """crops: one tensor per resolution, crop-major (n_r*B, 3, S_r, S_r); image_ids: (B,)
        the batch's image ids, named when a step is skipped for their non-finite input."""
        t0 = time.perf_counter()
        lr = learning_rate(self.iteration, self.iters_per_epoch, total_epochs, self.config.optim)
        set_learning_rate(self.optimizer, lr)
        self.model.normalize_prototypes()
        self.start_queues(epoch)
        inputs = self._prepare(crops)
        if self._buffers:
            torch._foreach_copy_(self._buffers_before, self._buffers)

        with autocast(self.amp_dtype, self.device):
            out = self.forward_model(inputs)
        queue_scores = self.queue.scores(self.model.prototypes.weight) if self.queue else None
        local_queue_scores = self.local_queue.scores(self.model.local_prototypes.weight) if self.local_queue else None
        terms: LossTerms | None = None
        error: NonFiniteLossError | None = None
        try:
            terms = gaelle_losses(out, self.settings, slot_perms=self.slot_perms(), queue_scores=queue_scores,
                                  local_queue_scores=local_queue_scores, group=self.group)
        except NonFiniteLossError as exc:
            error = exc

        self.optimizer.zero_grad(set_to_none=True)
        if not self._all_finite(error is None):
            return self._skip(self._skip_reason(error, inputs, image_ids), lr, t0)
        self.scaler.scale(terms.total).backward()
        drop_prototype_gradients(self.model, self.iteration, self.config.optim.freeze_prototypes_niters)
        self.scaler.unscale_(self.optimizer.optim)
        grads_finite = self.optimizer.adapt_gradients()
        if not self.scaler.is_enabled() and not bool(grads_finite):
            # fp16's scaler skips such a step itself and shrinks its scale; without it a NaN
            # gradient with a finite loss (seen: bf16 convolutions on a CPU) would reach the weights
            return self._skip(self._skip_reason(f"non-finite gradients in {self._nonfinite_gradients()} (the loss "
                                                "was finite)", inputs, image_ids), lr, t0)
        self.scaler.step(self.optimizer.optim)
        self.scaler.update()
        self.nonfinite_in_a_row = 0
        self._push_queues(out)
        self.iteration += 1
        entropy, in_use = code_statistics(terms.codes)
        return StepMetrics(loss=float(terms.total.detach()), loss_global=float(terms.global_.detach()),
                           loss_local=_value(terms.local), loss_l2g=_value(terms.l2g), lr=lr,
                           code_entropy=entropy, prototypes_in_use=in_use, nonfinite=False,
                           step_seconds=time.perf_counter() - t0)

    def _skip(self, reason: str, lr: float, t0: float) -> StepMetrics:
        self.optimizer.zero_grad(set_to_none=True)
        if self._buffers:  # the forward's BatchNorm updates came from the bad batch
            torch._foreach_copy_(self._buffers, self._buffers_before)
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        self.iteration += 1
        limit = self.config.train.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            raise TooManyNonFiniteSteps(
                f"{self.nonfinite_in_a_row} non-finite steps in a row (train.max_nonfinite_steps = {limit}) at "
                f"iteration {self.iteration}: {reason}")
        nan = float("nan")
        w_local, w_l2g = self.settings.weights[1:]
        return StepMetrics(loss=nan, loss_global=nan, loss_local=nan if w_local else None,
                           loss_l2g=nan if w_l2g else None, lr=lr, code_entropy=nan,
                           prototypes_in_use=nan, nonfinite=True, step_seconds=time.perf_counter() - t0,
                           skip_reason=reason)

    def _nonfinite_gradients(self) -> str:
        names = [n for n, p in self.model.named_parameters() if p.grad is not None and not bool(p.grad.isfinite().all())]
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    @torch.no_grad()
    def _push_queues(self, out) -> None:
        st = self.settings
        assign = list(st.crops_for_assign)
        if self.queue is not None:
            emb = out.embeddings.detach().reshape(st.n_crops, st.batch_size, -1)[assign]  # (A, B, d)
            self.queue.push(emb.float())
        if self.local_queue is not None and out.local_embeddings is not None:
            loc = out.local_embeddings.detach().reshape(st.n_global, st.batch_size * st.n_slots, -1)[assign]  # (A, B*S, d)
            self.local_queue.push(loc.float())

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to resume this worker: model, optimiser, scaler, queues, counters, RNG."""
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "queue": self.queue.state_dict() if self.queue else None,
            "local_queue": self.local_queue.state_dict() if self.local_queue else None,
            "iteration": self.iteration,
            "nonfinite_total": self.nonfinite_total,
            "colour": self.colour.state_dict() if self.colour else None,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict, queues: dict | None = None) -> None:
        """Restore a state_dict; `queues` ({"queue": state or None, "local_queue": ...}) replaces
        the saved queues (used after a world-size change)."""
        from gaelle_ray.model.weights import load_state_strict
        load_state_strict(self.model, state["model"], "checkpoint")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        if self.colour is not None and state.get("colour") is not None:
            self.colour.load_state_dict(state["colour"])
        torch.set_rng_state(state["torch_rng"])
        queues = queues if queues is not None else {"queue": state.get("queue"), "local_queue": state.get("local_queue")}
        for name in ("queue", "local_queue"):
            saved = queues.get(name)
            if saved is None:
                continue
            buf = saved["buffer"]
            q = EmbeddingQueue(buf.shape[0], buf.shape[1], buf.shape[2], self.device)
            q.load_state_dict(saved)
            setattr(self, name, q)
