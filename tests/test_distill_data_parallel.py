"""Data-parallel distillation: 2 gloo processes, each with half of the training trajectories and all-reduced
gradients, end with the parameters of one process with the same total batch (issue 8)."""

import pytest
import torch
from gloo import run_ranks

from epd_solver.distillation import distill
from epd_solver.problems import digits_mixture

# small runs of both optimisers; 13 trajectories: the shards (7 + 6) and the Adam batches (4) do not align
CASES = {
    "lbfgs": dict(trajectories=13, batch=4, val_trajectories=8, lbfgs_rounds=2, lbfgs_iterations=4, select_noises=0),
    # the default recipe's selection set (2 x 13 noises, replicated), its four (grid, init) candidates screened
    # for one round and the best one finishing
    "select": dict(trajectories=13, batch=4, val_trajectories=8, lbfgs_rounds=3, lbfgs_iterations=3),
    "adam": dict(recipe="official", trajectories=13, batch=4, epochs=2, val_trajectories=8, val_every=2,
                 teacher_points=1),
}
COMMON = dict(compare=False, cache=False, progress=False)


def tables(params) -> dict[str, torch.Tensor]:
    return dict(zip(("r", "weights", "dir_scale", "time_scale"), params.natural(torch.float64)))


def run_case(name: str):
    opts = dict(CASES[name])
    recipe = opts.pop("recipe", "default")
    return distill(digits_mixture(), "epd", 3, recipe=recipe, **COMMON, **opts)


def _worker(rank: int, out: str) -> dict:
    results = {}
    for name in CASES:
        p = run_case(name)
        results[name] = (tables(p), p.meta["timing"]["teacher_evaluations_this_run"], p.meta["data_parallel"])
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(_worker, tmp_path_factory.mktemp("dp"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_processes_equal_one_process(two_ranks, name):
    single = run_case(name)
    ref = tables(single)
    for rank in range(2):
        raw, evaluations, dp = two_ranks[rank][name]
        assert dp == {"processes": 2}
        assert raw.keys() == ref.keys()
        for key in ref:
            diff = (raw[key] - ref[key]).abs().max().item()
            assert diff <= 1e-6, f"rank {rank} {name} {key}: {diff:.2e}"
        # the teacher ran once per trajectory in total, not once per process
        assert evaluations == pytest.approx(single.meta["timing"]["teacher_evaluations_this_run"])
    training = single.meta["training"]
    if name == "select":  # validated on the selection set from round two on: no untrained value to compare with
        sel = single.meta["grid_selection"]
        assert single.meta["selection"]["noises"] == 26 and len(sel["candidates"]) == 4 and sel["after_rounds"] == 1
        return
    # training moved the tables (the comparison is not between two untrained initialisations)
    assert training["best_iteration"] > 0 and training["best_val_rmse"] < 0.9 * training["init_val_rmse"]


def test_data_parallel_needs_a_group():
    with pytest.raises(ValueError, match="process group|several processes"):
        distill(digits_mixture(), "epd", 3, data_parallel=True, trajectories=4, **COMMON)
