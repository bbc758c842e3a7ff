"""Preload for Dask schedulers and workers: ``dask worker tcp://HOST:8786 --preload flows.dask_preload``.

Imports torch, Prefect, MLflow and vitflow's flow module when the worker (or scheduler) starts, instead of while
it deserializes the first fold task (the scheduler unpickles the task graph too): on a small machine that import
takes 10-30 s and blocks the process's event loop ("Event loop was unresponsive"). The import happens in
``dask_setup``, which runs in the worker process only: the ``dask worker`` command imports this module to read
its options, in the nanny process, where torch would cost another ~1 GB per worker."""


def dask_setup(server) -> None:
    import flows.vit_pipeline  # noqa: F401
