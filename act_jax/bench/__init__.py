"""bench: benchmarks. Each prints a table with ratios measured side by side in one run.

  decode.py       decode speed per exit threshold vs full depth (threshold mode)
  drift.py        a domain switch: the fixed certified point vs the drift monitor
  moe.py          dispatch implementations and routers, time and memory
  serving.py      the serving engine on a trace (fixed points vs the SLO controller)
  speculative.py  exact (self-speculative) vs threshold vs full-depth decoding

Nothing outside bench (and the experiments binaries) imports it.
"""
