"""CAB on ImageNet: DeiT-S teacher -> Vim-S student (384 wide, 24 layers), the original recipe.

    python -m cab_jax.main --config=configs/vim_small.py --workdir=/tmp/cab_vim_small \
        --config.data.data_dir=/path/to/tensorflow_datasets --config.teacher.init_from=/path/to/deit_s \
        --config.data.subset_fraction=0.1

Epochs follow the subset fraction as in the paper (3000/600/300/150 for 1/5/10/20 %).
Without ImageNet, ``--config.data.synthetic=True`` runs the same steps on random images.
"""

from cab_jax.config import base_config


def get_config():
    c = base_config()
    c.train.batch_size = 512
    return c
