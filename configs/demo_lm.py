"""Language CAB on a laptop CPU: a small Phi teacher and Phi-Mamba students on Python's own source and docs.

    python -m cab_jax.main --config=configs/demo_lm.py --workdir=/tmp/cab_demo_lm

Builds the corpus (the standard library's source and pydoc topics, capped at 4 MB), trains a byte-level BPE
tokenizer on it, trains the teacher, then distils one student per loss mode: CE only, CE + KL, and CAB
(CE + 0.5 KL + 0.5 bridge, initialised from the teacher's attention), and prints held-out perplexity and tokens/s.
Sample afterwards with ``python -m cab_jax.generate --workdir=/tmp/cab_demo_lm/students/cab --prompt="def fib("``.
"""

from cab_jax.config import lm_base_config


def get_config():
    c = lm_base_config()
    c.task = "demo"
    c.dtype = "float32"
    c.mesh.update(dict(data=-1, fsdp=1))
    c.data.update(dict(seq_len=128, vocab_size=2048, max_corpus_bytes=4_000_000))
    # The student mirrors the teacher head for head (n_qk_heads = heads, d_state = head_dim, d_inner = width),
    # as Phi-Mamba mirrors Phi-1.5, so that its mixers can start from the teacher's attention projections.
    c.teacher.update(dict(vocab_size=2048, hidden_size=128, depth=4, num_heads=4, intermediate_size=512, remat=False))
    c.student.update(dict(vocab_size=2048, d_model=128, depth=4, d_state=32, n_qk_heads=4, n_v_heads=4,
                          intermediate_size=512, chunk_size=32, remat=False))
    for t, steps in ((c.teacher.train, 500), (c.train, 300)):
        t.update(dict(steps=steps, batch_size=16, base_lr=2e-3, lr_reference_batch=16, warmup_epochs=0.02,
                      min_lr=1e-4, lr_decay="cosine", log_every=50, checkpoint_every=250, eval_batch_size=64))
    return c
