"""serve: continuous-batching serving under a latency SLO.

  engine.py     S slots of one KV cache: prefill into a slot, decode every slot at its own
                position and the operating point of the call (threshold or exact mode)
  scheduler.py  requests and records; continuous (or static) batching over the engine
  slo.py        the SLO controller: moves along certified points to hold p95 latency
  trace.py      request traces (arrival times, prompt/answer lengths, domains)
  summary.py    latency percentiles, agreement with full depth, the exit-latency table, plots
  serving.py    serve_run: a trace replayed on a run under ServeOptions, written to a directory

May import: errors ... infer, calibrate.
"""
