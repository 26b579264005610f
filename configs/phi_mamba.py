"""Language CAB, the original recipe: Phi-1.5 teacher -> Phi-Mamba student (24 layers, d_model 2048, discrete
Mamba-2 mixers with d_state 64 and 32 heads, initialised from the teacher's attention), CE + 0.5 KL + 0.5 bridge,
FSDP over all devices, bfloat16 compute.

    python -m cab_jax.main --config=configs/phi_mamba.py --workdir=/ckpt/phi_mamba \
        --config.teacher.init_from=/path/to/hf/phi-1_5 --config.data.name=MY_TFDS_TEXT_DATASET \
        --config.data.data_dir=/path/to/tensorflow_datasets --config.data.tokenizer=/path/to/hf/phi-1_5

The teacher directory is a Hugging Face PhiForCausalLM checkpoint (config.json + safetensors or .bin), converted
on load; the text dataset is any TFDS dataset prepared in data_dir with a "text" feature (``data.text_key``).
Variants after the colon: ``mode=vanilla|soft|cab``, ``synthetic=True`` (random tokens and a random teacher: the
same steps without data or weights).
"""

import ml_collections

from cab_jax import config


def get_config(arg=None):
    arg = config.parse_arg(arg, mode="cab", synthetic=False)
    c = ml_collections.ConfigDict()
    c.domain, c.task, c.seed, c.dtype = "language", "distill", 0, "bfloat16"
    c.teacher = dict(model="phi", vocab_size=51200, hidden_size=2048, depth=24, num_heads=32, intermediate_size=8192,
                     partial_rotary_factor=0.5, rope_theta=10000.0, layer_norm_eps=1e-5, remat=True, init_from="",
                     train=config.language_train())  # train: for task=train_teacher
    c.student = dict(model="phi_mamba", vocab_size=51200, d_model=2048, depth=24, d_state=64, n_qk_heads=32,
                     n_v_heads=32, expand=1, d_conv=4, intermediate_size=8192, conv_activation="identity",
                     ssd_impl="auto", chunk_size=128, remat=True, init_from="", init_from_attention=True)
    c.bridge = dict(kind="mlp", hidden_layers=1, hidden=0, kernel_map="none", layer_map="proportional", layers=(),
                    detach_student=False)  # hidden 0: the teacher's width
    c.loss = config.loss(arg.mode)
    c.data = dict(name="cab_text", data_dir="", seq_len=2048, vocab_size=51200, max_corpus_bytes=4_000_000,
                  tokenizer="", text_key="text", train_split="train", eval_split="test", synthetic=arg.synthetic,
                  synthetic_size=1024, num_workers=0)
    c.train = config.language_train()
    c.mesh = config.mesh(data=1, fsdp=-1)
    return c
