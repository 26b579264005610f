"""CAB on ImageNet, the original recipe: a DeiT-S teacher (384 wide, 12 layers, 6 heads) distilled into Vim-S
(384 wide, 24 bidirectional Mamba layers) on a per-class subset of the train split.

    python -m cab_jax.main --config=configs/vim_small.py:subset=0.1 --workdir=/ckpt/vim_s_10 \
        --config.data.data_dir=/path/to/tensorflow_datasets --config.teacher.init_from=/ckpt/deit_s

Variants after the colon: ``subset=0.01|0.05|0.1|0.2|1.0`` (the fraction of each class; the epochs follow the
paper: 3000/600/300/150/300), ``mode=vanilla|soft|cab|attention_transfer`` (the loss), ``synthetic=True``
(random images of the right shape and a random teacher: the same steps without ImageNet),
``teacher=small|base`` (the DeiT size: a larger teacher for the same student, an ablation the paper's
reviewers asked for).
"""

import ml_collections

from cab_jax import config
from cab_jax.errors import ConfigError
from cab_jax.models.vit import VIT_SIZES


def get_config(arg=None):
    arg = config.parse_arg(arg, subset=0.1, mode="cab", synthetic=False, teacher="small")
    if arg.teacher not in ("small", "base"):
        raise ConfigError(f"config variant teacher={arg.teacher!r}: expected small or base")
    size = VIT_SIZES[arg.teacher]
    c = ml_collections.ConfigDict()
    c.domain, c.task, c.seed, c.dtype = "vision", "distill", 0, "float32"
    c.teacher = dict(model="vit", embed_dim=size.embed_dim, depth=size.depth, num_heads=size.num_heads, mlp_ratio=4.0,
                     patch_size=16, drop_path=0.0, init_from="",
                     train=config.vision_train())  # train: for task=train_teacher
    c.student = dict(model="vim", embed_dim=384, depth=24, patch_size=16, d_state=16, d_conv=4, expand=2,
                     bidirectional=True, a_init="cab", scan_impl="auto", scan_blocks="", drop_path=0.0, remat=True,
                     remat_policy="full", init_from="")
    c.bridge = dict(kind="mlp", hidden_layers=1, hidden=128, kernel_map="softmax", layer_map="proportional", layers=(),
                    detach_student=False)
    c.loss = config.loss(arg.mode)
    c.data = config.vision_data(subset_fraction=arg.subset, synthetic=arg.synthetic)
    c.train = config.vision_train(batch_size=512)
    c.mesh = config.mesh(data=-1)
    return c
