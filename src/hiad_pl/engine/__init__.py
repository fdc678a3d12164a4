"""The engine: fits one detector per task and loads the fitted run for inference.

- :mod:`~hiad_pl.engine.run_folder`: a model folder's layout, lock and resume state;
- :mod:`~hiad_pl.engine.task_trainer`: one task's Lightning fit (options, loggers, callbacks);
- :mod:`~hiad_pl.engine.callbacks`, :mod:`~hiad_pl.engine.validation`: validation on synthetic
  anomalies, checkpoint selection, normalisation statistics;
- :mod:`~hiad_pl.engine.routing`: the patches of retrieval tasks;
- :mod:`~hiad_pl.engine.launchers`: where fits and scoring run (local processes, Ray);
- :mod:`~hiad_pl.engine.loading`: fitted detectors -> the inference pipeline;
- :mod:`~hiad_pl.engine.runs`: a fitted run folder loaded by category (predict, serve, export);
- :mod:`~hiad_pl.engine.orchestrator`: :class:`TaskOrchestrator`, which composes them.
"""
