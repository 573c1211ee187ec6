"""CLI habits on a user's model: AFS by parity, knobs printed, paper-only knobs on request, solver names and
aliases, seed counts, --threads, previews."""

import json

import numpy as np
import pytest
import torch

from epd_solver.cli import main
from epd_solver.distillation.config import make_config
from epd_solver.epd import EPDParams

TINY_DISTILL = ["--trajectories", "16", "--val-trajectories", "8", "--select-noises", "0", "--lbfgs-rounds", "1",
                "--lbfgs-iterations", "2", "--schedule", "time_uniform", "--teacher-points", "1", "--no-cache",
                "--allow-worse", "--quiet"]


def test_afs_follows_the_parity_of_the_nfe_unless_set():
    assert make_config("epd", 4).afs is False and make_config("epd", 4).n_points == 3  # 2 steps x 2 rounds
    assert make_config("epd", 5).afs is True and make_config("epd", 5).n_points == 4  # 3 steps x 2 - 1
    assert make_config("amed", 6, recipe="amed").afs is False
    with pytest.raises(ValueError, match="not reachable"):
        make_config("epd", 4, afs=True)


def test_distill_even_nfe_by_default_prints_the_afs_choice(tmp_path, capsys):
    out, before = tmp_path / "epd4.safetensors", torch.get_num_threads()
    try:
        assert main(["distill", "--model", "gmm:digits", "--nfe", "4", "--out", str(out), "--threads", "2",
                     *TINY_DISTILL]) == 0
        assert torch.get_num_threads() == 2  # distill takes --threads like every command
    finally:
        torch.set_num_threads(before)
    assert "AFS off: Para.NFE 4 is even" in capsys.readouterr().err
    params = EPDParams.load(out)
    assert params.afs is False and params.nfe()["para_nfe"] == 4 and params.sigmas.numel() == 3
