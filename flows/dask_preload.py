"""Preload for Dask schedulers and workers: ``dask worker tcp://HOST:8786 --preload flows.dask_preload``.

Imports torch, Prefect, MLflow and vitflow's flow module when the process starts, instead of while it
deserializes the first fold task (the scheduler unpickles the task graph too): on a small machine that import
takes 10-30 s and blocks the worker's event loop ("Event loop was unresponsive")."""

import flows.vit_pipeline  # noqa: F401
