"""CAB on a laptop CPU: a small DeiT teacher and Vim students on the embedded digits dataset.

    python -m cab_jax.main --config=configs/demo.py --workdir=/tmp/cab_demo

Builds the dataset (scikit-learn's 8x8 digits upsampled to 32 px, stored as TFDS array_record), trains
the teacher on the full train split (cached in the workdir), then distils one student per loss mode
(vanilla, soft, cab) on 3 % of each class (40 images) and prints top-1/top-5 on the full test split.
"""

from cab_jax.config import base_config


def get_config():
    c = base_config()
    c.task = "demo"
    c.data.update(dict(name="cab_digits", data_dir="", image_size=32, num_classes=10, eval_split="test",
                       subset_fraction=0.03, num_workers=0, crop_scale=(0.7, 1.0), hflip=False,
                       mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    # 32 px images in 8 px patches: 16 patches + cls = 17 tokens for both models. The student keeps Vim's
    # shape (bidirectional v2, expand 2, two student layers per teacher layer) at laptop scale.
    c.teacher.update(dict(embed_dim=64, depth=4, num_heads=2, patch_size=8))
    c.student.update(dict(embed_dim=64, depth=8, patch_size=8, d_state=8, remat=False))
    c.bridge.hidden = 64
    for t, steps, batch in ((c.teacher.train, 600, 64), (c.train, 250, 16)):
        t.update(dict(steps=steps, batch_size=batch, base_lr=1e-3, lr_reference_batch=batch, warmup_epochs=1.0,
                      min_lr=1e-5, mixup_alpha=0.2, cutmix_alpha=0.0, label_smoothing=0.1, log_every=50,
                      checkpoint_every=100, eval_batch_size=120))
    return c
