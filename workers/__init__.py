"""Work that runs on Ray workers: compress or measure a layer group, calibrate, evaluate.

``workers.jobs`` holds the job specs and result records (small, frozen, picklable: references
in, records out, never tensors); ``workers.compress``, ``workers.calibrate`` and
``workers.evaluate`` the plain functions (testable without Prefect or Ray); ``workers.tasks``
wraps them as Prefect tasks, which prefect-ray's ``RayTaskRunner`` runs as Ray tasks.
"""
