"""Language CAB, the original recipe: Phi-1.5 teacher -> Phi-Mamba student (24 layers, d_model 2048, discrete
Mamba-2 mixers with d_state 64 and 32 heads, initialised from the teacher's attention), CE + 0.5 KL + 0.5 bridge,
FSDP over all devices.

    python -m cab_jax.main --config=configs/phi_mamba.py --workdir=/tmp/cab_phi_mamba \
        --config.teacher.init_from=/path/to/hf/phi-1_5 --config.data.name=MY_TFDS_TEXT_DATASET \
        --config.data.data_dir=/path/to/tensorflow_datasets --config.data.tokenizer=/path/to/hf/phi-1_5

The teacher directory is a Hugging Face PhiForCausalLM checkpoint (config.json + safetensors or .bin), converted
on load; the text dataset is any TFDS dataset prepared in data_dir with a "text" feature (``data.text_key``).
Without them, ``--config.data.synthetic=True`` runs the same steps on random tokens with a random teacher.
"""

from cab_jax.config import lm_base_config


def get_config():
    return lm_base_config()
