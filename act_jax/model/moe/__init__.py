"""Mixture-of-experts FFN layers: routers, dispatch paths and the MoEFFN module.

Routers: Switch top-1 (Fedus et al. 2021), GShard top-2 (Lepikhin et al. 2021), expert choice
(Zhou et al. 2022), Soft MoE (Puigcerver et al. 2023), hash layers (Roller et al. 2021),
dropless top-k; V-MoE batch prioritized routing (Riquelme et al. 2021), ST-MoE z-loss
(Zoph et al. 2022), DeepSeek-V3 aux-loss-free bias balancing (2024), DeepSeekMoE shared experts
(Dai et al. 2024). See routers.py / dispatch.py / layer.py for the math.
"""
from act_jax.model.moe.layer import AUX_KEYS, MoEFFN, router_aux
from act_jax.model.moe.routers import (ROUTERS, RouterInfo, RoutingPlan, SoftPlan, capacity,
                                 expert_choice_route, hash_route, soft_route, top_k_route,
                                 update_bias, validate_moe)

MOE_STATE = 'moe_state'  # non-param variable collection holding the DeepSeek-V3 bias

__all__ = [
    'AUX_KEYS', 'MOE_STATE', 'MoEFFN', 'ROUTERS', 'RouterInfo', 'RoutingPlan',
    'SoftPlan', 'capacity', 'expert_choice_route', 'hash_route', 'router_aux', 'soft_route',
    'top_k_route', 'update_bias', 'validate_moe',
]
