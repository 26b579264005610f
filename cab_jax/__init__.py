"""CAB (Cross-Architecture distillation via Attention Bridge) in JAX/Flax: DeiT -> Vim and Phi -> Phi-Mamba.

Imports run one way: kernels -> models -> bridge/losses -> domains -> train -> entry points (main, study,
generate, convert).
"""
