"""serve: continuous-batching serving under a latency SLO.

  serving.py  engine (slots, per-row positions and points), replay scheduler, records, report
  slo.py      the SLO controller: moves along certified points to hold p95 latency
  trace.py    request traces (arrival times, prompt/answer lengths, domains)

May import: errors ... infer, calibrate.
"""
