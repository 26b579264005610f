"""CAB on a laptop CPU: a small DeiT teacher and one Vim student per loss mode on the embedded digits dataset.

    python -m cab_jax.main --config=configs/demo.py --workdir=/tmp/cab_demo

Ablations (a study grid each, soft distillation beside CAB's variants, 3 seeds; docs/results.md has the tables):

    python -m cab_jax.main --config=configs/demo.py:ablation=bridge_form --workdir=/tmp/cab_bridge_form
    python -m cab_jax.main --config=configs/demo.py:ablation=layer_map --workdir=/tmp/cab_layer_map
    python -m cab_jax.main --config=configs/demo.py:ablation=larger_teacher --workdir=/tmp/cab_larger_teacher

A study (``cab_jax.study``): builds the dataset (scikit-learn's 8x8 digits upsampled to 32 px, stored as TFDS
array_record), trains the teacher on the full train split (cached in the workdir), then distils one student per
loss mode (vanilla, soft, cab) on 3 % of each class (40 images) and prints top-1/top-5 on the full test split.
32 px images in 8 px patches: 16 patches + cls = 17 tokens for both models; the student keeps Vim's shape
(bidirectional v2, expand 2, two student layers per teacher layer) at laptop scale.
"""

import ml_collections

from cab_jax import config
from cab_jax.errors import ConfigError


def get_config(arg=None):
    arg = config.parse_arg(arg, subset=0.03, ablation="")
    c = ml_collections.ConfigDict()
    c.domain, c.task, c.seed, c.dtype = "vision", "study", 0, "float32"
    steps = dict(base_lr=1e-3, warmup_epochs=1.0, min_lr=1e-5, mixup_alpha=0.2, cutmix_alpha=0.0, label_smoothing=0.1,
                 log_every=50, checkpoint_every=100, eval_batch_size=120)
    c.teacher = dict(model="vit", embed_dim=64, depth=4, num_heads=2, mlp_ratio=4.0, patch_size=8, drop_path=0.0,
                     init_from="", train=config.vision_train(steps=600, batch_size=64, lr_reference_batch=64, **steps))
    c.student = dict(model="vim", embed_dim=64, depth=8, patch_size=8, d_state=8, d_conv=4, expand=2,
                     bidirectional=True, a_init="cab", scan_impl="auto", scan_blocks="", drop_path=0.0, remat=False,
                     remat_policy="full", init_from="")
    c.bridge = dict(kind="mlp", hidden_layers=1, hidden=64, kernel_map="softmax", layer_map="proportional", layers=(),
                    detach_student=False)
    c.loss = config.loss("cab")
    # 32 px digits: a mild crop, no flip (digits are not mirror-symmetric), no RandAugment or erasing (they would
    # wipe out much of a 32 px digit), one device: the recipe's augmentation is for ImageNet.
    c.data = config.vision_data(name="cab_digits", image_size=32, num_classes=10, eval_split="test",
                                subset_fraction=arg.subset, num_workers=0, crop_scale=(0.7, 1.0), hflip=False,
                                interpolation="bilinear", randaugment="", random_erase=0.0, repeated_augmentation=1,
                                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    c.train = config.vision_train(steps=250, batch_size=16, lr_reference_batch=16, **steps)
    c.mesh = config.mesh(data=-1)
    # The grid: train fractions x modes x seeds (empty: data.subset_fraction, seed).
    c.study = dict(modes=("vanilla", "soft", "cab"), fractions=(), seeds=(), variants=(), variant_modes=("cab",))
    if arg.ablation:
        if arg.ablation not in ABLATIONS:
            raise ConfigError(f"config variant ablation={arg.ablation!r}: expected one of {sorted(ABLATIONS)}")
        c.study.update(modes=("soft", "cab"), seeds=(0, 1, 2), variants=ABLATIONS[arg.ablation])
        if arg.ablation == "larger_teacher":  # twice as wide and deep; the student learns one layer from each
            c.teacher.update(embed_dim=128, depth=8, num_heads=4)
    return c


# The reviewers' ablations, as variants of CAB's student (study.variants: "NAME: field=value; ...").
ABLATIONS = {
    "bridge_form": ("linear: bridge.kind=linear", "mlp1: bridge.hidden_layers=1", "mlp2: bridge.hidden_layers=2",
                    "mlp3: bridge.hidden_layers=3", "mlp1_w128: bridge.hidden=128", "mlp1_w256: bridge.hidden=256",
                    "attention: bridge.kind=attention"),
    "layer_map": ("proportional: bridge.layer_map=proportional", "first: bridge.layer_map=first",
                  "last: bridge.layer_map=last", "every_other: bridge.layer_map=every_other"),
    "larger_teacher": (),
}
