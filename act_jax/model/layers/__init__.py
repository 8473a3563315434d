"""Transformer building blocks: RMSNorm, RoPE attention with a KV cache, gated MLP."""
from act_jax.model.layers.attention import Attention, apply_rope, init_cache, project_kv
from act_jax.model.layers.mlp import GatedMLP
from act_jax.model.layers.norms import RMSNorm, rms_norm

__all__ = ['Attention', 'apply_rope', 'init_cache', 'project_kv', 'GatedMLP', 'RMSNorm', 'rms_norm']
