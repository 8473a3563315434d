"""model: the adaptive transformer and everything its forward pass calls.

  transformer.py  embed -> depth loop (masked scan over stacked steps) -> head; make_model
  layers/         attention (RoPE, KV cache), gated MLP, RMSNorm, the shared head and its
                  cross-entropy by length tiles (head.py: no [N,B,L,V] in training)
  halting/        one file per halting policy, registered by name (POLICIES)
  moe/            routers decide, dispatch moves, layer computes, fallback
  retrieval/      the per-step retrieval arm (kNN-LM over a datastore) the depth step calls
  quant.py        quantized numerics (qwix einsum / ragged_dot / casts) the layers call

May import: errors, spec, telemetry, scale, data. Takes a resolved Spec, never a raw config.
"""
