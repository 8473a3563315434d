"""retrieval: datastores for the retrieval arm, and the generalist-fallback evaluation.

  datastore.py     build (tensorstore, restartable), load, tune and evaluate a kNN datastore
  fallback_run.py  evaluate a run with MoE generalist fallback and/or the retrieval arm

The arm itself (knn, gate, the per-step choice) is part of the model: model/retrieval/.
May import: errors ... infer, calibrate.
"""
