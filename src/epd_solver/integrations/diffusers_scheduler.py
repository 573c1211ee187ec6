"""``EPDScheduler``: learned EPD tables as a diffusers scheduler for stock pipelines.

**Sequential, no latency gain.** Stock pipelines call the model once per timestep with the same
timestep for every row, so the K branch evaluations of a step cannot share one batched call. Like
``HeunDiscreteScheduler`` / ``KDPM2DiscreteScheduler``, each solver step is expanded into 1 + K
timesteps (``order = 1 + K``): the base evaluation at sigma_i, then one evaluation per branch at
sigma' = a_k tau_k. That is 1 + K sequential model calls per step (x2 rows under CFG): as many
sequential calls as a (1 + K)-stage solver, and no faster than DPM-Solver at equal calls. For EPD's
latency use the batched path, :func:`epd_solver.integrations.diffusers.sample`.

State machine of step i (x in EDM coordinates for VP models, flow coordinates for flow models):

- stage 0 (output at x_i, sigma_i): d_i = (x_i - D)/sigma_i (EPD-Plugin: the Adams-Bashforth direction
  of d_i and earlier base directions); returns the first branch point x_i + (tau_1 - sigma_i) d_i.
- stage k (output at the branch point the pipeline passed back, network sigma a_k tau_k):
  g_k = (x~_k - D)/tau_k, acc += lambda_k c_k g_k; returns the next branch point, or after branch K
  x_{i+1} = x_i + (sigma_{i+1} - sigma_i) acc.

Any scheduled timestep may start a run, as with diffusers' multi-stage schedulers (Heun, KDPM2): a fresh
scheduler handed a branch timestep takes the sample as that branch point (``add_noise`` puts it at tau_k) and
reconstructs the step's line through it (base x - (tau_k - sigma_i) g_k, the missing directions g_k: exact on
a straight trajectory); an unscheduled timestep in [0, num_train_timesteps] maps to the nearest evaluation.

The tables (natural values) and the sigma grid live in the config, so ``save_pretrained`` /
``from_pretrained`` round-trip them. AFS tables are refused (an evaluation-free first step breaks the
pipelines' ``t_start * order`` slicing). ``num_inference_steps`` must equal the table's step count.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from ..denoisers import DiscreteEpsDenoiser
from ..epd.params import EPDParams
from ..epd.step import adams_bashforth

__all__ = ["EPDScheduler", "EPDSchedulerError", "PREDICTION_TYPES", "TIMESTEP_TYPES"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
TIMESTEP_TYPES = ("continuous", "nearest")  # VP time: index interpolated in log sigma, or rounded
SUPPORTED_SOLVERS = ("epd", "epd_plugin", "amed")  # AMED-Solver = EPD with K = 1 and lambda = 1
GRID_RTOL = 1e-6
_NOISE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")


class EPDSchedulerError(ValueError):
    """An EPDScheduler that cannot run as asked: missing or unsupported tables, wrong step count or grid,
    a grid outside the model's noise range, or a call out of sequence."""


def _table(v: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float64)
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise EPDSchedulerError(f"{name} must be a table of shape (steps, K), got shape {tuple(t.shape)}")
    return t


def _alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                    trained_betas: Any) -> torch.Tensor:
    """alphabar_n exactly as diffusers' discrete schedulers build it (float32)."""
    n = num_train_timesteps
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    else:
        raise EPDSchedulerError(f"beta_schedule {beta_schedule!r} is not supported; use linear, scaled_linear, "
                                f"squaredcos_cap_v2 or trained_betas")
    return torch.cumprod(1.0 - betas, dim=0)


class EPDScheduler(SchedulerMixin, ConfigMixin):
    """EPD-Solver / EPD-Plugin for stock diffusers pipelines, one model call per timestep (sequential).

    Build it from a parameter file and the pipeline's own scheduler (which supplies the noise schedule
    and prediction type)::

        pipe.scheduler = EPDScheduler.from_params("sd15_nfe20.safetensors", pipe.scheduler)
        image = pipe(prompt, num_inference_steps=pipe.scheduler.num_steps).images[0]

    Each of the table's steps takes 1 + K timesteps (``order``), hence 1 + K sequential model calls:
    no latency gain over other solvers at equal calls. The batched path
    (:func:`epd_solver.integrations.diffusers.sample`) evaluates the K branches in one call.

    Args (all stored in the config):
        r, weights, dir_scale, time_scale: natural values, (steps, K) nested lists. Required.
        sigmas: the table's grid, steps + 1 descending values (EDM sigma for VP models, flow sigma in (0, 1]).
        solver: ``"epd"``, ``"epd_plugin"`` (with ``plugin_order``) or ``"amed"``.
        afs: must be False (AFS tables are refused).
        prediction_type: ``epsilon`` | ``v_prediction`` | ``sample`` (VP-discrete) | ``flow_prediction``
            (flow matching; timestep = sigma * num_train_timesteps, no input scaling).
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the VP noise schedule.
        timestep_type: ``continuous`` (index interpolated in log sigma, the default of the batched adapter)
            or ``nearest`` (rounded index); must match how the table was distilled.
        use_flow_sigmas: True for flow tables, so that FLUX-style pipelines let the scheduler own its grid.
        model_id: recorded for reference.
    """

    _compatibles: list[str] = []
    order = 1  # instances: 1 + K

    @register_to_config
    def __init__(self, r: Any = None, weights: Any = None, dir_scale: Any = None, time_scale: Any = None,
                 sigmas: Any = None, solver: str = "epd", plugin_order: int | None = None, afs: bool = False,
                 prediction_type: str = "epsilon", num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                 beta_end: float = 0.012, beta_schedule: str = "scaled_linear", trained_betas: Any = None,
                 timestep_type: str = "continuous", use_flow_sigmas: bool | None = None,
                 model_id: str | None = None):
        if any(v is None for v in (r, weights, sigmas)):
            raise EPDSchedulerError(
                "EPDScheduler needs learned tables (r, weights, sigmas) in its config; it has no default. Build it "
                "with EPDScheduler.from_params(params_or_path, pipe.scheduler) or from a saved EPDScheduler config")
        if afs:
            raise EPDSchedulerError("EPDScheduler cannot run AFS tables (the evaluation-free first step does not fit "
                                    "a pipeline's one-call-per-timestep loop); use the batched path "
                                    "epd_solver.integrations.diffusers.sample")
        if solver not in SUPPORTED_SOLVERS:
            raise EPDSchedulerError(f"EPDScheduler runs solvers {SUPPORTED_SOLVERS}, got {solver!r}")
        if solver == "epd_plugin":
            if isinstance(plugin_order, bool) or not isinstance(plugin_order, int) or not 1 <= plugin_order <= 4:
                raise EPDSchedulerError(f"epd_plugin needs plugin_order in 1..4, got {plugin_order!r}")
        elif plugin_order is not None:
            raise EPDSchedulerError(f"solver {solver!r} takes no plugin_order (got {plugin_order!r})")
        if prediction_type not in PREDICTION_TYPES:
            raise EPDSchedulerError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if timestep_type not in TIMESTEP_TYPES:
            raise EPDSchedulerError(f"timestep_type must be one of {TIMESTEP_TYPES}, got {timestep_type!r}")

        r_t = _table(r, "r")
        ones = torch.ones_like(r_t)
        tables = [r_t] + [ones if v is None else _table(v, n)
                          for v, n in ((weights, "weights"), (dir_scale, "dir_scale"), (time_scale, "time_scale"))]
        if len({t.shape for t in tables}) != 1:
            raise EPDSchedulerError(f"r, weights, dir_scale, time_scale must share one shape (steps, K), got "
                                    f"{[tuple(t.shape) for t in tables]}")
        grid = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
        try:  # the file format's own checks (shapes, simplex, r in [0, 1], descending positive grid)
            EPDParams(*tables, grid, solver=solver, plugin_order=plugin_order)
        except ValueError as e:
            raise EPDSchedulerError(f"invalid EPD tables: {e}") from None
        self.is_flow = prediction_type == "flow_prediction"
        if self.is_flow and float(grid[0]) > 1:
            raise EPDSchedulerError(f"a flow-matching grid lives in (0, 1], got sigma_max = {float(grid[0])}")
        if use_flow_sigmas is None:
            use_flow_sigmas = self.is_flow
        # store plain nested lists, so that the config is JSON (save_pretrained) whatever was passed in
        self.register_to_config(r=tables[0].tolist(), weights=tables[1].tolist(), dir_scale=tables[2].tolist(),
                                time_scale=tables[3].tolist(), sigmas=grid.tolist(),
                                use_flow_sigmas=bool(use_flow_sigmas),
                                trained_betas=None if trained_betas is None else [float(b) for b in trained_betas])

        self._r, self._lam, self._c, self._a = tables
        self._grid = grid
        self.k = int(r_t.shape[1])
        self.num_steps = int(r_t.shape[0])
        self.order = 1 + self.k
        tau = grid[:-1, None] ** (1 - self._r) * grid[1:, None] ** self._r  # geometric branch points
        self._tau = tau
        net = torch.cat([grid[:-1, None], self._a * tau], dim=1)  # network sigma of each evaluation
        self._net_sigmas = net.reshape(-1)
        # noise level of the sample the pipeline passes at each evaluation: sigma_i, then the branch points tau_k
        self._state_sigmas = torch.cat([grid[:-1, None], tau], dim=1).reshape(-1)
        self._time_map = None
        if not self.is_flow:
            self.alphas_cumprod = _alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                  trained_betas)
            self._time_map = DiscreteEpsDenoiser(None, self.alphas_cumprod, quantize=timestep_type == "nearest")
            lo, hi = self._time_map.sigma_min, self._time_map.sigma_max
            bad = (self._net_sigmas < lo * (1 - 1e-9)) | (self._net_sigmas > hi * (1 + 1e-9))
            if bad.any():
                raise EPDSchedulerError(
                    f"the table's grid and branch sigmas span [{float(self._net_sigmas.min()):.6g}, "
                    f"{float(self._net_sigmas.max()):.6g}], outside this noise schedule's range [{lo:.6g}, {hi:.6g}]: "
                    f"the table was distilled for another model or grid")
        self.timesteps = self._timesteps_for(self._net_sigmas).float()
        self.sigmas = torch.cat([self._net_sigmas, grid[-1:]]).float()
        self.num_inference_steps = self.num_steps
        self._step_index = None
        self._begin_index = None
        self._reset_state()

    # -- construction from parameter files ---------------------------------------------------------
    @classmethod
    def from_params(cls, params: EPDParams | str | os.PathLike, scheduler: Any = None, *, k: int | None = None,
                    sigmas: Any = None, timestep_type: str | None = None, **overrides: Any) -> "EPDScheduler":
        """An EPDScheduler for ``params`` (an :class:`EPDParams` or a parameter file path).

        ``scheduler``: the pipeline's scheduler (or its config) supplying the noise schedule and prediction
        type: a FlowMatch scheduler gives a flow table; a discrete one (DDPM, DDIM, Euler, DPM-Solver, ...)
        its betas and ``prediction_type``. ``k`` / ``sigmas``: expected K and grid; a file made for
        another K or grid raises :class:`~epd_solver.epd.params.ParamsMismatchError`.
        ``timestep_type`` defaults to the file's ``meta["timestep_type"]``, else ``continuous``.
        """
        if not isinstance(params, EPDParams):
            params = EPDParams.load(params, k=k, sigmas=sigmas)
        else:
            params.check_compatible(sigmas=sigmas, k=k)
        kwargs: dict[str, Any] = {}
        if scheduler is not None:
            config = dict(getattr(scheduler, "config", scheduler))
            if _is_flow_config(scheduler, config):
                kwargs["prediction_type"] = "flow_prediction"
                kwargs["num_train_timesteps"] = config.get("num_train_timesteps", 1000)
            else:
                kwargs.update({key: config[key] for key in _NOISE_KEYS if key in config})
                if config.get("rescale_betas_zero_snr"):
                    raise EPDSchedulerError("zero-terminal-SNR schedules (rescale_betas_zero_snr) have sigma_max = inf; "
                                            "EPD grids need a finite sigma_max")
        ttype = timestep_type or params.meta.get("timestep_type", "continuous")
        kwargs.update(overrides)
        r, lam, c, a = (v.tolist() for v in params.natural())
        return cls(r=r, weights=lam, dir_scale=c, time_scale=a, sigmas=params.sigmas.tolist(), solver=params.solver,
                   plugin_order=params.plugin_order, afs=params.afs, timestep_type=ttype,
                   model_id=params.meta.get("model_id"), **kwargs)

    def to_params(self) -> EPDParams:
        """The table held by this scheduler, as :class:`EPDParams` (for the batched path)."""
        meta = {"timestep_type": self.config.timestep_type}
        if self.config.model_id is not None:
            meta["model_id"] = self.config.model_id
        return EPDParams(self._r, self._lam, self._c, self._a, self._grid, afs=False, solver=self.config.solver,
                         plugin_order=self.config.plugin_order, meta=meta)

    # -- diffusers scheduler API --------------------------------------------------------------------
    @property
    def init_noise_sigma(self) -> float:
        """x_0 = sigma_0 z in EDM coordinates (VP models), z for flow matching."""
        return 1.0 if self.is_flow else float(self._grid[0])

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start mid-schedule (img2img); only at a step boundary (a multiple of ``order``)."""
        if begin_index % self.order:
            raise EPDSchedulerError(f"begin_index {begin_index} is not on a step boundary (order = {self.order})")
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: Any = None, mu: float | None = None, timesteps: Any = None) -> None:
        """Lay out the (1 + K) timesteps of each step. The grid is the table's: ``num_inference_steps`` must equal
        its step count; ``sigmas`` (optional, a trailing 0 allowed) must equal its grid; ``mu`` is ignored (the
        grid's shift is fixed by the table); custom ``timesteps`` are refused."""
        if timesteps is not None:
            raise EPDSchedulerError("EPDScheduler takes no custom timesteps: its grid is the learned table's")
        if sigmas is not None:
            s = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).cpu()
            if s.numel() == self._grid.numel() + 1 and s[-1] == 0:
                s = s[:-1]
            if s.shape != self._grid.shape or not torch.all((s - self._grid).abs() <= GRID_RTOL * self._grid):
                raise EPDSchedulerError(f"sigmas {s.tolist()} differ from the table's grid {self._grid.tolist()}")
            num_inference_steps = num_inference_steps or self.num_steps
        if num_inference_steps is None:
            num_inference_steps = self.num_steps
        if num_inference_steps != self.num_steps:
            raise EPDSchedulerError(f"this EPD table was distilled for {self.num_steps} steps; "
                                    f"num_inference_steps={num_inference_steps} would need another table")
        self.timesteps = self._timesteps_for(self._net_sigmas).float().to(device)
        self.sigmas = torch.cat([self._net_sigmas, self._grid[-1:]]).float()
        self._step_index = None
        self._begin_index = None
        self._reset_state()

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """VP: x / sqrt(sigma'^2 + 1) at the network sigma of this evaluation; flow: unchanged."""
        if self._step_index is None:
            self._init_step_index(timestep)
        if self.is_flow:
            return sample
        sigma = float(self._net_sigmas[self._checked_index()])
        return sample / math.sqrt(sigma**2 + 1)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True,
             **kwargs: Any) -> SchedulerOutput | tuple:
        """Advance the state machine by one model evaluation; returns the next model input (a branch point or
        x_{i+1}). Extra pipeline kwargs (``generator``, ``eta``) are ignored: EPD is deterministic."""
        if self._step_index is None:
            self._init_step_index(timestep)
        j = self._checked_index()
        i, stage = divmod(j, self.order)
        work = torch.float32 if sample.device.type == "mps" else torch.float64
        x = sample.to(work)
        sigma_net = float(self._net_sigmas[j])
        denoised = self._denoised(model_output.to(work), x, sigma_net)
        t_cur = float(self._grid[i])
        if stage == 0:
            d = (x - denoised) / t_cur
            direction = d
            if self.config.plugin_order is not None:
                direction = adams_bashforth(d, self._history, self.config.plugin_order)
                keep = self.config.plugin_order - 1
                self._history = (self._history + [d])[-keep:] if keep else []
            self._x_base, self._direction, self._acc = x, direction, torch.zeros_like(x)
        else:
            k = stage - 1
            g = (x - denoised) / float(self._tau[i, k])
            if self._x_base is None:  # entered mid-step: the sample is branch point k, the earlier ones are unknown
                self._enter_mid_step(x, g, i, k)
            self._acc = self._acc + float(self._lam[i, k] * self._c[i, k]) * g
        if stage < self.k:  # the next branch point
            prev = self._x_base + (float(self._tau[i, stage]) - t_cur) * self._direction
        else:
            prev = self._x_base + (float(self._grid[i + 1]) - t_cur) * self._acc
            self._x_base = self._direction = self._acc = None
        self._step_index += 1
        prev, denoised = prev.to(sample.dtype), denoised.to(sample.dtype)
        if not return_dict:
            return prev, denoised
        return SchedulerOutput(prev_sample=prev)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Noisy samples at the given timesteps: x0 + sigma n (VP, EDM coordinates) or (1 - sigma) x0 + sigma n
        (flow), with sigma the noise level the scheduler expects there: sigma_i at a step start, the branch point
        tau_k at a branch timestep (its network sigma is a_k tau_k). Timesteps as in :meth:`index_for_timestep`;
        with a begin index (img2img) the sample is placed at the current evaluation, as diffusers' schedulers do."""
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        if self._begin_index is None:
            idx = [self.index_for_timestep(t) for t in timesteps]
        elif self._step_index is not None:
            idx = [self._step_index] * timesteps.numel()
        else:
            idx = [self._begin_index] * timesteps.numel()
        sigma = self._state_sigmas[idx].to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = sigma.reshape((-1,) + (1,) * (original_samples.ndim - 1))
        if self.is_flow:
            return (1 - sigma) * original_samples + sigma * noise
        return original_samples + sigma * noise

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Flow-matching pipelines' name for :meth:`add_noise` (SD3 img2img)."""
        return self.add_noise(sample, noise, timestep)

    def index_for_timestep(self, timestep: Any, schedule_timesteps: torch.Tensor | None = None) -> int:
        """The evaluation index of ``timestep``: a scheduled timestep (step start or branch) gives its index, the
        step start first where a branch shares its value; another timestep in [0, num_train_timesteps] gives the
        evaluation with the nearest timestep (t = 0: the last one, as DPM-Solver falls back to the last index)."""
        ts = (self.timesteps if schedule_timesteps is None else schedule_timesteps).detach().cpu()  # no f64 on mps
        t = torch.as_tensor(timestep).detach().reshape(-1).cpu()
        if t.numel() != 1 or not torch.isfinite(t.double()).all():
            raise EPDSchedulerError(f"index_for_timestep takes one finite timestep, got {timestep!r}")
        t = t[0].to(dtype=ts.dtype)
        hits = [int(j) for j in (ts == t).nonzero().flatten()]
        if hits:
            starts = [j for j in hits if j % self.order == 0]
            return (starts or hits)[0]
        if not 0 <= float(t) <= self.config.num_train_timesteps:
            raise EPDSchedulerError(f"timestep {float(t)} is outside [0, {self.config.num_train_timesteps}]; pass one "
                                    f"of scheduler.timesteps")
        return int((ts.double() - float(t)).abs().argmin())

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # -- internals ----------------------------------------------------------------------------------
    def _enter_mid_step(self, x: torch.Tensor, g: torch.Tensor, i: int, k: int) -> None:
        """State of step i when the first call lands on branch k (a branch timestep handed to a fresh scheduler,
        as diffusers' multi-stage schedulers accept any scheduled timestep): the step's line is taken through x
        with slope g, so the base is x - (tau_k - sigma_i) g, the base direction (EPD-Plugin: its history) is g and
        the missing branch directions are g. On a straight trajectory (every direction equal) this is exactly
        EPD's step."""
        self._direction = g
        if self.config.plugin_order is not None and self.config.plugin_order > 1:
            self._history = [g]
        self._x_base = x - (float(self._tau[i, k]) - float(self._grid[i])) * g
        self._acc = float((self._lam[i, :k] * self._c[i, :k]).sum()) * g

    def _reset_state(self) -> None:
        self._x_base = self._direction = self._acc = None
        self._history: list[torch.Tensor] = []

    def _init_step_index(self, timestep: Any) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
        elif timestep is None:
            self._step_index = 0
        else:
            self._step_index = self.index_for_timestep(timestep)
        self._reset_state()

    def _checked_index(self) -> int:
        if self._step_index >= self._net_sigmas.numel():
            raise EPDSchedulerError(f"the schedule has {self._net_sigmas.numel()} evaluations; call set_timesteps "
                                    f"before running it again")
        return self._step_index

    def _timesteps_for(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.is_flow:
            return sigma * self.config.num_train_timesteps
        return self._time_map.sigma_to_t(sigma)

    def _denoised(self, out: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """D(x; sigma) from the model output, as the batched adapters compute it."""
        ptype = self.config.prediction_type
        if ptype in ("epsilon", "flow_prediction"):
            return x - sigma * out
        if ptype == "v_prediction":
            return x / (1 + sigma**2) - sigma / math.sqrt(1 + sigma**2) * out
        return out  # "sample"


def _is_flow_config(scheduler: Any, config: Mapping[str, Any]) -> bool:
    name = type(scheduler).__name__ if not isinstance(scheduler, Mapping) else str(config.get("_class_name", ""))
    return ("FlowMatch" in name or config.get("prediction_type") == "flow_prediction"
            or bool(config.get("use_flow_sigmas")))
