"""diffusers' own, unmodified ``SchedulerCommonTest`` (v0.40.0, vendored in ../shared) run on EPDScheduler.

The suite builds schedulers from ``get_scheduler_config``; here that config holds a 3-step, K = 2 EPD table on a
grid computed from the config's own noise schedule (so the sweeps over betas and train timesteps stay valid).
Tests that cannot apply by design are skipped below with the reason. Where ../shared is absent the module skips.
"""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("diffusers")

from conftest import shared_path  # noqa: E402

try:
    VENDOR = shared_path("vendor", "diffusers-tests")
except pytest.skip.Exception as e:  # shared_path skips a test; at import time skip the module with its reason
    pytest.skip(str(e), allow_module_level=True)
sys.path.insert(0, str(VENDOR))

from diffusers import DDPMScheduler  # noqa: E402
from tests.schedulers import test_schedulers as common  # noqa: E402  (diffusers' test package, not the project's)

from epd_solver.integrations.diffusers_scheduler import EPDScheduler  # noqa: E402
from epd_solver.schedules import discrete  # noqa: E402

STEPS = 3
R = [[0.2, 0.7], [0.35, 0.8], [0.1, 0.5]]
LAM = [[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]]
C = [[1.02, 0.97], [0.99, 1.01], [1.0, 1.03]]
A = [[0.97, 1.02], [1.03, 0.98], [0.96, 1.01]]
NOISE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")


def table_config(**kwargs):
    """An EPDScheduler config whose grid fits the config's noise schedule (VP) or flow sigmas."""
    config = dict(num_train_timesteps=1100, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                  r=R, weights=LAM, dir_scale=C, time_scale=A)
    config.update(kwargs)
    if config.get("prediction_type") == "flow_prediction":
        grid = torch.tensor([1.0, 0.6, 0.3, 0.05], dtype=torch.float64)
    else:
        noise = DDPMScheduler(**{k: config[k] for k in NOISE_KEYS})
        grid = discrete(STEPS + 1, noise.alphas_cumprod)
    config.setdefault("sigmas", grid.tolist())
    return config


class EPDSchedulerCommonTest(common.SchedulerCommonTest):
    scheduler_classes = (EPDScheduler,)
    forward_default_kwargs = (("num_inference_steps", STEPS),)

    @property
    def default_num_inference_steps(self):
        return STEPS  # a table runs the step count it was distilled for (50 would need another table)

    def get_scheduler_config(self, **kwargs):
        return table_config(**kwargs)

    # -- sweeps over the config, as diffusers' scheduler tests do (outputs equal after a save/load round trip) --
    def test_timesteps(self):
        for n in (10, 50, 100, 1000):
            self.check_over_configs(num_train_timesteps=n)

    def test_betas(self):
        for beta_start, beta_end in zip((0.00001, 0.0001, 0.001), (0.0002, 0.002, 0.02)):
            self.check_over_configs(beta_start=beta_start, beta_end=beta_end)

    def test_schedules(self):
        for schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            self.check_over_configs(beta_schedule=schedule)

    def test_prediction_type(self):
        for prediction_type in ("epsilon", "v_prediction", "sample", "flow_prediction"):
            self.check_over_configs(prediction_type=prediction_type)

    def test_solvers(self):
        for solver, order in (("epd", None), ("epd_plugin", 2), ("epd_plugin", 3)):
            self.check_over_configs(solver=solver, plugin_order=order)
        for ttype in ("continuous", "nearest"):
            self.check_over_configs(timestep_type=ttype)

    def test_time_indices(self):
        """Every scheduled timestep (step starts and branch timesteps) and t = 0, handed to a fresh scheduler."""
        sched = EPDScheduler(**table_config())
        for t in list(sched.timesteps) + [0.0]:
            self.check_over_forward(time_step=t)

    # -- inapplicable by design ---------------------------------------------------------------------------
    def test_compatibles(self):
        pytest.skip("EPDScheduler has no compatibles by design: it needs a learned table, so no other scheduler's "
                    "config converts to it (the common test assumes a non-empty list: UnboundLocalError)")

    def test_trained_betas(self):
        pytest.skip("trained_betas [0.1, 0.3] is a 2-step noise schedule whose sigma range excludes any table's "
                    "grid; EPDScheduler refuses a grid outside its noise schedule by design")
