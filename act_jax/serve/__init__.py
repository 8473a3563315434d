"""serve: continuous-batching serving under a latency SLO, as a trace replay or over HTTP.

  engine.py     S slots of one KV cache: batched, chunked prefill into slots, decode every
                slot at its own position and operating point (threshold or exact mode)
  scheduler.py  requests and records; continuous (or static) batching over the engine,
                latency classes (a controller per class)
  slo.py        the SLO controller: moves along certified points to hold p95 latency
  monitor.py    drift: shadow scoring of live requests at every point, Learn-then-Test on a
                sliding window, alarms that restrict the controllers to certified points
  trace.py      request traces (arrival times, prompt/answer lengths, domains)
  summary.py    latency percentiles, agreement with full depth, the exit-latency table, plots
  metrics.py    the Prometheus metrics of the HTTP server
  server.py     the HTTP server: OpenAI-compatible completions, SSE streaming, /metrics,
                /healthz, drain on SIGTERM; one engine thread
  serving.py    serve_run: a trace replayed on a run under ServeOptions, written to a
                directory; serve_http: the same run behind the HTTP server

May import: errors ... infer, calibrate.
"""
