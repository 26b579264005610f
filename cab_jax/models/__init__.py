"""The models: DeiT (vit), Vim (vim, with the Mamba mixer of mamba), Phi (phi) and Phi-Mamba (phi_mamba, with
the Mamba-2 mixer of mamba2); build them through ``registry``."""
