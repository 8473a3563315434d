"""quant: post-training quantization of a run and its certified bit choice.

  ptq.py  quantize a trained run (qwix, w8/w4/w8a8 or 'auto' per-layer bits), re-certify it

The numerics the layers call (einsum, ragged_dot, casts) sit low, in model/quant.py.
May import: errors ... infer, calibrate.
"""
