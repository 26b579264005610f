"""Convert PyTorch weights into a checkpoint that ``teacher.init_from`` / ``student.init_from`` reads, and back.

    # DeiT-S from timm / the DeiT release (.pth or .safetensors), or a Hugging Face directory
    python -m cab_jax.convert --src=deit_small_patch16_224.pth --format=timm --model=deit_small --out=DIR
    python -m cab_jax.convert --src=hf/deit-small --format=hf --model=deit_small --out=DIR
    # Vim-S in the original (hustvl/Vim, CAB) layout, and a trained student back to it
    python -m cab_jax.convert --src=vim_s_midclstok.pth --format=vim --model=vim_small --out=DIR
    python -m cab_jax.convert --export --src=WORKDIR --format=vim --model=vim_small --out=student.pth

``--image_size`` / ``--num_classes`` / ``--patch_size`` describe the target model (position embeddings are
resized when the checkpoint's patch grid differs). Nothing is executed from pickles.
"""

from __future__ import annotations

from absl import app, flags, logging

from cab_jax import checkpoint, config
from cab_jax.convert import io, mapping, weights
from cab_jax.models.vim import VIM_SIZES
from cab_jax.models.vit import VIT_SIZES

MODELS = {**{f"deit_{size}": ("teacher", size) for size in VIT_SIZES},
          **{f"vim_{size}": ("student", size) for size in VIM_SIZES}}

_SRC = flags.DEFINE_string("src", None, "PyTorch weights (.pth/.safetensors/HF directory), or with --export our "
                           "checkpoint (a run workdir or an earlier --out).", required=True)
_FORMAT = flags.DEFINE_enum("format", None, ["timm", "hf", "vim"], "Layout of the PyTorch weights.", required=True)
_MODEL = flags.DEFINE_enum("model", None, list(MODELS), "Our model the weights are for.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (import) or .pth/.safetensors file (export).",
                           required=True)
_EXPORT = flags.DEFINE_bool("export", False, "Write our checkpoint at --src as PyTorch weights (vim only).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input resolution of the target model.")
_PATCH_SIZE = flags.DEFINE_integer("patch_size", 16, "Patch size of the target model.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Classes of the target model's head.")


def model_config(model: str, image_size: int, patch_size: int, num_classes: int):
    """The config whose teacher or student is ``model`` (e.g. "deit_small", "vim_tiny"), and its role."""
    role, size = MODELS[model]
    c = config.base_config()
    if role == "teacher":
        config.set_vit_size(c.teacher, size)
        c.teacher.patch_size = patch_size
    else:
        config.set_vim_size(c.student, size)
        c.student.patch_size = patch_size
    c.data.image_size, c.data.num_classes = image_size, num_classes
    return c, role


def main(argv: list[str]) -> None:
    del argv
    c, role = model_config(_MODEL.value, _IMAGE_SIZE.value, _PATCH_SIZE.value, _NUM_CLASSES.value)
    if _FORMAT.value not in weights.FORMATS[role]:
        raise app.UsageError(f"--format={_FORMAT.value} does not fit --model={_MODEL.value} (a {role}); "
                             f"expected one of {weights.FORMATS[role]}")
    if _EXPORT.value:
        if role != "student":
            raise app.UsageError("--export writes Vim students (--format=vim); teachers are import-only")
        from cab_jax.convert import vim

        tensors = vim.export_vim(checkpoint.load_model_params(_SRC.value, weights.abstract_params(c, role)))
        io.save_state_dict(tensors, _OUT.value)
        logging.info("Wrote %s (%d tensors) from %s", _OUT.value, len(tensors), _SRC.value)
        return
    params = weights.import_pytorch(_SRC.value, c, role, _FORMAT.value)
    checkpoint.save_model_params(_OUT.value, params)
    n = sum(v.size for v in mapping.flatten(params).values())
    logging.info("Wrote %s: %s %s, %d parameters, from %s", _OUT.value, role, _MODEL.value, n, _SRC.value)


if __name__ == "__main__":
    app.run(main)
