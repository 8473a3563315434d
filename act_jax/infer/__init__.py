"""infer: inference loops that really stop.

  inference.py    while-loop forward, row compaction, KV-cache decode (threshold mode), KV fill
  speculative.py  exact mode: self-speculative decoding (shallow draft, full-depth verify)
  draft.py        the draft choice of exact mode (layer, length), measured or given

May import everything below it: errors ... model, config, run, train.
"""
