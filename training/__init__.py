"""The data scientist's half: simulated or CSV data -> Conv-AE -> thresholds ->
evaluation (vs IsolationForest and PCA) -> ``model.onnx`` + ``model.json``.

Entry points: :func:`windfleet.training.pipeline.train_simulated`,
:func:`windfleet.training.pipeline.train_csv`, :func:`windfleet.training.score.score_csv`
and the ``windfleet train`` / ``windfleet score`` commands (:mod:`.cli`).
"""
