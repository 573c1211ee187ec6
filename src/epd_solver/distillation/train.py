"""The training loop: Adam with cosine decay (one update per batch) or full-batch L-BFGS in restarted rounds.

Shared by both: the backbone is frozen (only the tables get gradients), non-finite losses or gradients are
detected, counted and their update skipped, the held-out validation error (student end point vs teacher
end point, or a selection set's reference) is measured at the start and periodically (or from
``validate_from`` on, for a costly set), the best tables by validation are kept (not the last), and
checkpoints (safetensors + JSON state) make a killed run resumable to the same result.
Batches depend only on (seed, iteration), the learning rate only on the iteration, so a resumed run
repeats exactly what the uninterrupted one would have done.

Data parallel (``data_parallel=True`` under torch.distributed): each rank holds a contiguous shard of the
training trajectories (``TrainData.offset``/``total``), computes the loss of its part of every global batch
weighted by its share, and one all_reduce per loss evaluation sums the gradients and the loss, so every rank
takes the same update as one process with the whole batch (up to the order of the floating-point sums).
The validation set is replicated; rank 0 alone writes checkpoints and shows the progress bar.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .. import distributed as dist_utils
from ..epd import EPDTables
from ..files import write_atomic
from .conditions import merge_rows
from .config import DistillConfig
from .losses import DistillLoss
from .optim import Adam, lbfgs
from .student import Student
from .validate import rmse

__all__ = ["TrainData", "TrainOutcome", "Trainer", "CheckpointError", "config_hash", "round_size"]

CHECKPOINT_FORMAT = "epd-distill-checkpoint"


# fields that do not change the trained tables (a run may be resumed with other values)
_UNTRAINED_FIELDS = {"compare", "exact_check", "budget"}  # a budget acts through the sizes it chose


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (other settings, malformed file)."""


@dataclasses.dataclass
class TrainData:
    x0: torch.Tensor          # (n, ...) training start states
    teacher: torch.Tensor     # (n, N-1, ...) teacher states on the student grid
    val_x0: torch.Tensor
    val_teacher: torch.Tensor
    offset: int = 0              # global index of x0[0] (data-parallel shard)
    total: int | None = None     # global number of training trajectories (None: all are here)
    rows: dict[str, Any] | None = None      # per-trajectory conditioning of x0 (row j belongs to x0[j])
    val_rows: dict[str, Any] | None = None  # and of val_x0


@dataclasses.dataclass
class TrainOutcome:
    best_raw: dict[str, torch.Tensor]
    best_val: float
    best_iteration: int
    init_val: float
    final_val: float
    iterations: int
    nonfinite_skipped: int
    history: list[dict[str, float]]
    resumed_from: int | None


def round_size(cfg: DistillConfig, n: int, j: int) -> int:
    """Trajectories used in L-BFGS round ``j`` of ``n``: all of them, or with ``progressive`` a doubling subset
    ending with all in the last round (n/8, n/4, n/2, n for four rounds; at least one batch)."""
    if not cfg.progressive:
        return n
    return max(min(n, cfg.batch), math.ceil(n / 2 ** (cfg.lbfgs_rounds - 1 - j)))


def config_hash(cfg: DistillConfig) -> str:
    d = {k: v for k, v in cfg.as_dict().items() if k not in _UNTRAINED_FIELDS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Trainer:
    """Fits ``tables`` so that ``student`` follows the teacher (see the module docstring)."""

    def __init__(self, model: Callable[..., torch.Tensor], cfg: DistillConfig, student: Student, tables: EPDTables,
                 loss: DistillLoss, data: TrainData, extra_args: dict[str, Any] | None = None,
                 checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 50, progress: bool = True,
                 on_iteration: Callable[[int, dict[str, float]], None] | None = None, run_key: str = "",
                 data_parallel: bool = False, label: str = "", validate_from: int = 0):
        self.model, self.cfg, self.student, self.tables, self.loss = model, cfg, student, tables, loss
        self.data, self.extra_args = data, extra_args
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.checkpoint_every = max(1, int(checkpoint_every))
        self.progress, self.on_iteration = progress, on_iteration
        self.label = label  # shown after the progress bar's title (e.g. which candidate grid)
        self.validate_from = int(validate_from)  # no validation before this iteration (a costly validation set)
        self.key = f"{config_hash(cfg)}:{run_key}"
        self.params = [p for p in tables.parameters() if p.requires_grad]
        self.n = data.total if data.total is not None else data.x0.shape[0]
        self.lo, self.hi = data.offset, data.offset + data.x0.shape[0]
        if not 0 <= self.lo <= self.hi <= self.n:
            raise ValueError(f"training shard [{self.lo}, {self.hi}) outside the {self.n} trajectories")
        self.data_parallel = bool(data_parallel) and dist_utils.world_size() > 1
        if not self.data_parallel and (self.lo, self.hi) != (0, self.n):
            raise ValueError("a shard of the training trajectories needs data_parallel=True in a process group")
        self.main = dist_utils.is_main() if self.data_parallel else True
        # state
        self.iteration = 0
        self.best_raw = tables.raw()
        self.best_val = math.inf
        self.best_iteration = 0
        self.init_val = math.nan
        self.nonfinite = 0
        self.history: list[dict[str, float]] = []
        self.running = math.nan

    # -- pieces ---------------------------------------------------------------------------------------
    def validate(self) -> float:
        end = self.student.sample(self.model, self.tables, self.data.val_x0, self.extra_args, rows=self.data.val_rows)
        return rmse(end, self.data.val_teacher[:, -1])

    def _record_validation(self) -> float:
        val = self.validate()
        if self.iteration == 0 and math.isnan(self.init_val):
            self.init_val = val
        self.history.append({"iteration": self.iteration, "val_rmse": val, "loss": self.running})
        if val < self.best_val:
            self.best_val, self.best_iteration, self.best_raw = val, self.iteration, self.tables.raw()
        return val

    def _last_val(self) -> float:
        return self.history[-1]["val_rmse"] if self.history else math.nan

    def _batch_loss(self, idx: torch.Tensor) -> torch.Tensor:
        x0, teacher = self.data.x0[idx], self.data.teacher[idx]
        states = self.student.states(self.model, self.tables, x0, teacher,
                                     merge_rows(self.extra_args, self.data.rows, idx))
        return self.loss(states, teacher)

    def _share_backward(self, idx: torch.Tensor, denominator: int) -> float:
        """Backward of this rank's part of the global trajectories ``idx``, weighted by its share of
        ``denominator``; returns its loss (0 when none of them is here)."""
        local = idx[(idx >= self.lo) & (idx < self.hi)] - self.lo
        if local.numel() == 0:
            return 0.0
        loss = self._batch_loss(local)
        if local.numel() != denominator:
            loss = loss * (local.numel() / denominator)
        loss.backward()
        return float(loss.detach())

    def _sync(self, loss: float) -> float:
        """Data parallel: sum gradients and loss over the ranks (one all_reduce); identity otherwise."""
        if not self.data_parallel:
            return loss
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).to(torch.float64) for g in grads]
                         + [torch.tensor([loss], dtype=torch.float64)])
        dist.all_reduce(flat)
        pos = 0
        for p, g in zip(self.params, grads):
            p.grad = flat[pos:pos + g.numel()].reshape(g.shape).to(p.dtype)
            pos += g.numel()
        return float(flat[-1])

    def _grads_finite(self) -> bool:
        return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.params)

    def _lr(self, it: int) -> float:
        total = self.cfg.iterations
        c = self.cfg
        return c.lr_floor + (c.lr - c.lr_floor) * 0.5 * (1 + math.cos(math.pi * it / total))

    def _batch_indices(self, it: int) -> torch.Tensor:
        per_epoch = math.ceil(self.n / self.cfg.batch)
        epoch, j = divmod(it, per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch))
        return perm[j * self.cfg.batch:(j + 1) * self.cfg.batch]

    def _note(self, loss: float) -> None:
        self.running = loss if math.isnan(self.running) else 0.9 * self.running + 0.1 * loss

    # -- loops ----------------------------------------------------------------------------------------
    def run(self, resume: bool = False, until: int | None = None) -> TrainOutcome:
        """Train to the end, or (L-BFGS) to iteration ``until`` at a round boundary; calling ``run`` again
        continues exactly where it stopped."""
        resumed_from = None
        adam_state = None
        if resume and self.checkpoint is not None and self.checkpoint.exists():
            adam_state = self._load_checkpoint()
            resumed_from = self.iteration
        if self.iteration == 0 and not self.history and self.validate_from == 0:
            self._record_validation()
        if self.cfg.optimizer == "adam":
            self._run_adam(adam_state)
        else:
            self._run_lbfgs(until)
        final_val = self._last_val()
        return TrainOutcome(self.best_raw, self.best_val, self.best_iteration, self.init_val, final_val,
                            self.iteration, self.nonfinite, list(self.history), resumed_from)

    def _bar(self, total: int, unit: str):
        return tqdm(total=total, initial=self.iteration, disable=not (self.progress and self.main),
                    desc=f"distill {self.cfg.solver} NFE {self.cfg.nfe}{self.label}", unit=unit, dynamic_ncols=True, leave=False)

    def _postfix(self, bar) -> None:
        bar.set_postfix(loss=f"{self.running:.3e}", val=f"{self._last_val():.4g}",
                        best=f"{self.best_val:.4g}", refresh=False)

    def _run_adam(self, state: dict[str, torch.Tensor] | None) -> None:
        c = self.cfg
        opt = Adam(self.params)
        if state is not None:
            opt.load_state(state)
        total = c.iterations
        with self._bar(total, "it") as bar:
            while self.iteration < total:
                it = self.iteration
                self._zero_grad()
                idx = self._batch_indices(it)
                loss = self._sync(self._share_backward(idx, idx.numel()))
                if math.isfinite(loss) and self._grads_finite():
                    opt.step(self._lr(it))
                    self._note(loss)
                else:
                    self.nonfinite += 1
                self.iteration = it + 1
                if self.iteration % c.val_every == 0 or self.iteration == total:
                    self._record_validation()
                if self.checkpoint is not None and self.main and (self.iteration % self.checkpoint_every == 0
                                                    or self.iteration == total):
                    self._save_checkpoint(opt.state())
                self._postfix(bar)
                bar.update(1)
                if self.on_iteration is not None:
                    self.on_iteration(self.iteration, {"loss": self.running, "val": self._last_val()})

    def _zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _full_loss(self, flat: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
        """Mean loss over the first ``n`` training trajectories at ``flat`` and its gradient (accumulated per
        chunk)."""
        torch.nn.utils.vector_to_parameters(flat.to(self.params[0].dtype), self.params)
        self._zero_grad()
        total = 0.0
        for start in range(max(0, self.lo - self.lo % self.cfg.batch), min(n, self.hi), self.cfg.batch):
            total += self._share_backward(torch.arange(start, min(start + self.cfg.batch, n)), n)
        total = self._sync(total)
        if not math.isfinite(total):
            raise FloatingPointError("non-finite loss")
        if not self._grads_finite():
            raise FloatingPointError("non-finite gradient")
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        return total, grad.to(torch.float64)

    def _round_size(self, j: int) -> int:
        return round_size(self.cfg, self.n, j)

    def _run_lbfgs(self, until: int | None = None) -> None:
        """Rounds of ``lbfgs_iterations`` L-BFGS steps on the training set; the memory restarts every round,
        so a checkpoint at a round boundary holds the whole state."""
        c = self.cfg
        stop = c.iterations if until is None else min(c.iterations, until)
        with self._bar(c.iterations, "it") as bar:
            while self.iteration < stop:
                start = torch.nn.utils.parameters_to_vector(self.params).detach().to(torch.float64)

                def seen(f: float) -> None:
                    self._note(f)
                    bar.set_postfix(loss=f"{self.running:.3e}", best=f"{self.best_val:.4g}", refresh=False)

                try:
                    n = self._round_size(self.iteration // c.lbfgs_iterations)
                    result = lbfgs(lambda flat: self._full_loss(flat, n), start, c.lbfgs_iterations,
                                   on_evaluation=seen)
                    end = result.x
                except FloatingPointError:
                    self.nonfinite += 1
                    end = start  # the round's update is skipped
                with torch.no_grad():
                    torch.nn.utils.vector_to_parameters(end.to(self.params[0].dtype), self.params)
                self._zero_grad()
                self.iteration += c.lbfgs_iterations
                if self.iteration >= self.validate_from:
                    self._record_validation()
                if self.checkpoint is not None and self.main:
                    self._save_checkpoint(None)
                self._postfix(bar)
                bar.update(c.lbfgs_iterations)
                if self.on_iteration is not None:
                    self.on_iteration(self.iteration, {"loss": self.running, "val": self._last_val()})

    # -- checkpoints ----------------------------------------------------------------------------------
    def _save_checkpoint(self, opt_state: dict[str, torch.Tensor] | None) -> None:
        from safetensors.torch import save_file

        tensors = {f"tables.{n}": v for n, v in self.tables.raw().items()}
        tensors.update({f"best.{n}": v for n, v in self.best_raw.items()})
        tensors.update({f"adam.{n}": v for n, v in (opt_state or {}).items()})
        state = {"format": CHECKPOINT_FORMAT, "key": self.key, "iteration": self.iteration,
                 "best_val": self.best_val, "best_iteration": self.best_iteration, "init_val": self.init_val,
                 "nonfinite": self.nonfinite, "history": self.history, "running": self.running,
                 "adam": opt_state is not None}
        path = self.checkpoint
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: save_file({n: t.contiguous() for n, t in tensors.items()}, tmp,
                                                 metadata={"state": json.dumps(state)}))

    def _load_checkpoint(self) -> dict[str, torch.Tensor] | None:
        from safetensors import safe_open

        try:
            with safe_open(str(self.checkpoint), framework="pt") as f:
                state = json.loads((f.metadata() or {})["state"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"{self.checkpoint}: not a readable distillation checkpoint ({e})") from None
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{self.checkpoint}: not a distillation checkpoint")
        if state.get("key") != self.key:
            raise CheckpointError(f"{self.checkpoint}: written by a run with other settings; remove it or resume "
                                  "with the same options")
        self.tables.load_raw_({k[7:]: v for k, v in tensors.items() if k.startswith("tables.")})
        self.best_raw = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        self.iteration, self.best_val = int(state["iteration"]), float(state["best_val"])
        self.best_iteration, self.init_val = int(state["best_iteration"]), float(state["init_val"])
        self.nonfinite, self.history, self.running = int(state["nonfinite"]), state["history"], float(state["running"])
        if not state.get("adam"):
            return None
        return {k[5:]: v for k, v in tensors.items() if k.startswith("adam.")}

