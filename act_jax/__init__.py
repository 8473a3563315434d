"""act_jax: Adaptive Computation Transformers in JAX/Flax (dynamic depth and mixture of experts).

    config = experiments/configs/lm.py:get_config(...)   # ConfigDict: flags and config.json
    spec = act_jax.config.resolve(config)              # validated, frozen, every fact derived
    model = act_jax.model.make_model(spec)             # modules, inference, binaries: the spec

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
