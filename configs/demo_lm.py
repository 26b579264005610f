"""Language CAB on a laptop CPU: a small Phi teacher and one Phi-Mamba student per loss mode on Python's own
source and docs.

    python -m cab_jax.main --config=configs/demo_lm.py --workdir=/tmp/cab_demo_lm

A study (``cab_jax.study``): builds the corpus (the standard library's source and pydoc topics, capped at 4 MB),
trains a byte-level BPE tokenizer on it, trains the teacher, then distils one student per loss mode: vanilla (CE),
soft (CE + KL) and cab (CE + 0.5 KL + 0.5 bridge, initialised from the teacher's attention), and prints held-out
perplexity and tokens/s. The student mirrors the teacher head for head (n_qk_heads = heads, d_state = head_dim,
d_inner = width), as Phi-Mamba mirrors Phi-1.5, so that its mixers can start from the teacher's attention.
Sample afterwards with
``python -m cab_jax.generate --workdir=/tmp/cab_demo_lm/students/cab/seed0 --prompt="def fib("``.
"""

import ml_collections

from cab_jax import config


def get_config(arg=None):
    del arg  # no variants
    c = ml_collections.ConfigDict()
    c.domain, c.task, c.seed, c.dtype = "language", "study", 0, "float32"
    steps = dict(batch_size=16, base_lr=2e-3, lr_reference_batch=16, warmup_epochs=0.02, min_lr=1e-4,
                 lr_decay="cosine", log_every=50, checkpoint_every=250, eval_batch_size=64)
    c.teacher = dict(model="phi", vocab_size=2048, hidden_size=128, depth=4, num_heads=4, intermediate_size=512,
                     partial_rotary_factor=0.5, rope_theta=10000.0, layer_norm_eps=1e-5, remat=False, init_from="",
                     train=config.language_train(steps=500, **steps))
    c.student = dict(model="phi_mamba", vocab_size=2048, d_model=128, depth=4, d_state=32, n_qk_heads=4, n_v_heads=4,
                     expand=1, d_conv=4, intermediate_size=512, conv_activation="identity", ssd_impl="auto",
                     chunk_size=32, remat=False, init_from="", init_from_attention=True)
    c.bridge = dict(kind="mlp", hidden_layers=1, hidden=0, kernel_map="none", layer_map="proportional", layers=(),
                    detach_student=False)  # hidden 0: the teacher's width
    c.loss = config.loss("cab")
    c.data = dict(name="cab_text", data_dir="", seq_len=128, vocab_size=2048, max_corpus_bytes=4_000_000,
                  tokenizer="", text_key="text", train_split="train", eval_split="test", synthetic=False,
                  synthetic_size=1024, num_workers=0)
    c.train = config.language_train(steps=300, **steps)
    c.mesh = config.mesh(data=-1)
    c.study = dict(modes=("vanilla", "soft", "cab"), init_from_attention_modes=("cab",), seeds=(),  # () = seed
                   variants=(), variant_modes=("cab",))
    return c
