"""act_jax: Adaptive Computation Transformers in JAX/Flax (dynamic depth and mixture of experts).

    config = experiments/configs/lm.py:get_config(...)   # ConfigDict: flags and config.json
    spec = act_jax.config.resolve(config)              # validated, frozen, every fact derived
    model = act_jax.model.transformer.make_model(spec)  # modules, inference, binaries: the spec

Packages by subsystem, bottom to top: a unit imports only units below it (tests/test_spec.py
checks every import against LAYERS, and that nothing in act_jax imports experiments).
    errors spec        the contract: ConfigError, the frozen Spec, OperatingPoint
    platforms          which JAX platforms a process initialises (no libtpu probe off TPU)
    telemetry          pure metrics from a forward's aux; JSONL metrics reader
    scale/             mesh, sharding rules, multi-process set-up
    data/              byte vocabulary, embedded corpus, files, synthetic tasks
    model/             transformer, layers, halting policies, MoE, retrieval arm, quant numerics
    config             defaults table and resolve(config) -> Spec (needs the registries above)
    run/               the owner of a run directory: layout, JSON, checkpoints, load
    train/             losses, steps, loop, seed sweeps
    infer/             loops that really stop; exact (self-speculative) decoding; draft choice
    calibrate/         Learn-then-Test and certified operating points
    quant/             post-training quantization and its certified bit choice
    retrieval/         datastores for the retrieval arm; fallback evaluation
    serve/             serving engine, scheduler, SLO controller, traces
    deploy/            AOT compilation for TPU slices, export
    viz/               reports and plots
    bench/             benchmarks (imported by nothing but experiments)

Shape suffixes (`x_BLD`, `w_EDF`): one legend for the whole package, each letter one meaning.
    B batch                      L sequence length (queries)    T key / KV-cache length
    D d_model                    F FFN hidden (dense or expert)  V vocabulary
    H attention heads            J head dim                      N depth steps (scan steps)
    X exit steps (subset of N)   E experts                       C expert capacity (slots)
    G routing groups             S tokens per routing group      K expert choices per token
    M (token, choice) entries    Y flat slot table (E*C)         P soft-MoE slots
    R expert buffer rows         Q dropless row blocks           U rows per dropless block
    Z flattened tokens           W positions per lazy KV-fill chunk
    A positions of a self-speculative draft/verify window (draft length + 1)
    I datastore entries (kNN keys)  O nearest neighbours retrieved per query

"""

LAYERS = ('errors', 'platforms', 'spec', 'telemetry', 'scale', 'data', 'model', 'config', 'run', 'train',
          'infer', 'calibrate', 'quant', 'retrieval', 'serve', 'deploy', 'viz', 'bench')
