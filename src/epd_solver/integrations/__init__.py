"""Thin layers between epd-solver and host libraries.

Each host is an optional dependency imported only by its own module: ``import epd_solver`` and
``import epd_solver.integrations`` never import diffusers. Use

- :mod:`epd_solver.integrations.diffusers`: diffusers models/pipelines as denoisers, batched ``sample``,
  ``load_diffusers_model``;
- :mod:`epd_solver.integrations.diffusers_scheduler`: ``EPDScheduler`` for stock diffusers pipelines.
"""
