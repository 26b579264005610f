"""CAB on ImageNet: DeiT-Ti teacher -> Vim-Ti student (192 wide, 24 layers), the original recipe.

    python -m cab_jax.main --config=configs/vim_tiny.py --workdir=/tmp/cab_vim_tiny \
        --config.data.data_dir=/path/to/tensorflow_datasets --config.teacher.init_from=/path/to/deit_ti \
        --config.data.subset_fraction=0.1

Epochs follow the subset fraction as in the paper (3000/600/300/150 for 1/5/10/20 %).
Without ImageNet, ``--config.data.synthetic=True`` runs the same steps on random images.
"""

from cab_jax.config import base_config, set_vim_size, set_vit_size


def get_config():
    c = base_config()
    set_vit_size(c.teacher, "tiny")
    set_vim_size(c.student, "tiny")
    c.train.batch_size = 512
    return c
