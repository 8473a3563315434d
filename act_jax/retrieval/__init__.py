"""Retrieval as a gating choice (kNN-LM over a datastore of hidden states -> next bytes).

  knn.py        nearest neighbours on device (exact / approx_max_k, sharded) and kNN-LM
  gate.py       when to retrieve: a logistic gate on the exit head's distribution
  arm.py        the per-step arm inside the depth loop (exit / deeper / retrieve)
  datastore.py  build (tensorstore, restartable), load, tune and evaluate
"""
