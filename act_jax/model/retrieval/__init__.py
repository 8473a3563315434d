"""The retrieval arm the depth step calls (kNN-LM over a datastore of hidden states).

  knn.py   nearest neighbours on device (exact / approx_max_k, sharded) and kNN-LM
  gate.py  when to retrieve: a logistic gate on the exit head's distribution
  arm.py   the per-step arm inside the depth loop (exit / deeper / retrieve)

Building, tuning and evaluating datastores sit high, in act_jax/retrieval/.
"""
