"""PyTorch checkpoints in and out: timm / Hugging Face DeiT-ViT and Hugging Face Phi teachers, original-layout Vim
students.

``python -m cab_jax.convert --help`` for the command line; ``load_state_dict`` reads weights without
executing pickled code; ``mapping`` holds the table machinery the per-model modules use.
"""

from cab_jax.convert.io import load_state_dict, save_state_dict

__all__ = ["load_state_dict", "save_state_dict"]
