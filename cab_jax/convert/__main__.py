"""Convert PyTorch weights into a checkpoint that ``teacher.init_from`` / ``student.init_from`` reads, and back.

    # DeiT-S from timm / the DeiT release (.pth or .safetensors), or a Hugging Face directory
    python -m cab_jax.convert --src=deit_small_patch16_224.pth --format=timm --model=deit_small --out=DIR
    python -m cab_jax.convert --src=hf/deit-small --format=hf --model=deit_small --out=DIR
    # Vim-S in the original (hustvl/Vim, CAB) layout, and a trained student back to it
    python -m cab_jax.convert --src=vim_s_midclstok.pth --format=vim --model=vim_small --out=DIR
    python -m cab_jax.convert --export --src=WORKDIR --format=vim --model=vim_small --out=student.pth

    # Phi-1.5 teacher from a Hugging Face directory (microsoft/phi-1_5), and back to one (config.json included);
    # --model=phi_custom takes the size from the source's config.json (import) or from the phi_size.json an
    # import writes beside our checkpoint (export)
    python -m cab_jax.convert --src=hf/phi-1_5 --format=hf --model=phi_1_5 --out=DIR
    python -m cab_jax.convert --export --src=DIR --format=hf --model=phi_1_5 --out=hf/phi-1_5-ours

``--image_size`` / ``--num_classes`` / ``--patch_size`` describe the target model (position embeddings are
resized when the checkpoint's patch grid differs). Nothing is executed from pickles.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from absl import flags, logging
from flax import nnx

from cab_jax import checkpoint, cli
from cab_jax.convert import io, mapping, phi, vim, weights
from cab_jax.errors import ConfigError
from cab_jax.models import registry
from cab_jax.models.phi import PHI_SIZES, PhiSize
from cab_jax.models.vim import VIM_SIZES
from cab_jax.models.vit import VIT_SIZES

# --model name -> (registry model, named size; None: read from the weights or phi_size.json)
MODELS = {**{f"deit_{size}": ("vit", size) for size in VIT_SIZES},
          **{f"vim_{size}": ("vim", size) for size in VIM_SIZES},
          **{name: ("phi", name) for name in PHI_SIZES}, "phi_custom": ("phi", None)}
PHI_SIZE_FILE = "phi_size.json"  # written beside an imported Phi checkpoint: its architecture

_SRC = flags.DEFINE_string("src", None, "PyTorch weights (.pth/.safetensors/HF directory), or with --export our "
                           "checkpoint (a run workdir or an earlier --out).", required=True)
_FORMAT = flags.DEFINE_enum("format", None, ["timm", "hf", "vim"], "Layout of the PyTorch weights.", required=True)
_MODEL = flags.DEFINE_enum("model", None, list(MODELS), "Our model the weights are for.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (import) or .pth/.safetensors file (export).",
                           required=True)
_EXPORT = flags.DEFINE_bool("export", False, "Write our checkpoint at --src as PyTorch weights (vim, phi).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input resolution of the target model.")
_PATCH_SIZE = flags.DEFINE_integer("patch_size", 16, "Patch size of the target model.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Classes of the target model's head.")


def vision_model(model: str, image_size: int, patch_size: int, num_classes: int) -> nnx.Module:
    """The abstract vision model ``model`` (e.g. "deit_small", "vim_tiny") for these inputs and classes."""
    name, size = MODELS[model]
    return registry.abstract(name, size, num_classes=num_classes, img_size=image_size, patch_size=patch_size)


def _phi_size(model: str, hf_cfg: dict | None, size_file: pathlib.Path | None) -> PhiSize:
    """A named size, or for phi_custom the one in ``hf_cfg`` (import) or ``size_file`` (export)."""
    if model != "phi_custom":
        return PHI_SIZES[model]
    if hf_cfg is not None:
        return phi.size_from_hf_config(hf_cfg)
    if size_file is not None and size_file.exists():
        return PhiSize(**json.loads(size_file.read_text()))
    raise ConfigError("--model=phi_custom needs a Hugging Face directory with config.json (import) or our "
                         f"checkpoint with its {PHI_SIZE_FILE} (export); otherwise name a size: {sorted(PHI_SIZES)}")


def phi_main(model: str, src: str, out: str, export: bool) -> None:
    """Phi teachers: Hugging Face PhiForCausalLM weights to our checkpoint (with its phi_size.json), or back to
    a Hugging Face directory (``out`` without a suffix) or a weights file."""
    hf_cfg = io.hf_config(src) if not export and io.is_hf_dir(src) else None
    size = _phi_size(model, hf_cfg, pathlib.Path(src) / PHI_SIZE_FILE if export else None)
    abstract = nnx.state(registry.abstract("phi", **dataclasses.asdict(size))).to_pure_dict()
    if export:
        params = checkpoint.load_model_params(src, abstract)
        if pathlib.Path(out).suffix:
            io.save_state_dict(phi.export_phi(params), out)
        else:
            phi.save_hf_dir(params, size, out)
        logging.info("Wrote %s (Phi %s) from %s", out, size, src)
        return
    target = {k: tuple(v.shape) for k, v in mapping.flatten(abstract).items()}
    params = phi.import_phi(io.load_state_dict(src), target, hf_cfg, size=size)
    checkpoint.save_model_params(out, params)
    (pathlib.Path(out) / PHI_SIZE_FILE).write_text(json.dumps(dataclasses.asdict(size), indent=2) + "\n")
    n = sum(v.size for v in mapping.flatten(params).values())
    logging.info("Wrote %s: Phi teacher %s, %d parameters, from %s", out, size, n, src)


def main(argv: list[str]) -> None:
    del argv
    if _MODEL.value.startswith("phi_"):
        if _FORMAT.value != "hf":
            raise ConfigError(f"--model={_MODEL.value} reads Hugging Face weights: use --format=hf")
        phi_main(_MODEL.value, _SRC.value, _OUT.value, _EXPORT.value)
        return
    model = vision_model(_MODEL.value, _IMAGE_SIZE.value, _PATCH_SIZE.value, _NUM_CLASSES.value)
    if _FORMAT.value not in weights.formats(model):
        raise ConfigError(f"--format={_FORMAT.value} does not fit --model={_MODEL.value}; "
                             f"expected one of {weights.formats(model)}")
    if _EXPORT.value:
        if MODELS[_MODEL.value][0] != "vim":
            raise ConfigError("--export writes Vim students (--format=vim); teachers are import-only")
        tensors = vim.export_vim(checkpoint.load_model_params(_SRC.value, nnx.state(model).to_pure_dict()))
        io.save_state_dict(tensors, _OUT.value)
        logging.info("Wrote %s (%d tensors) from %s", _OUT.value, len(tensors), _SRC.value)
        return
    params = weights.import_pytorch(_SRC.value, model, _FORMAT.value)
    checkpoint.save_model_params(_OUT.value, params)
    n = sum(v.size for v in mapping.flatten(params).values())
    logging.info("Wrote %s: %s, %d parameters, from %s", _OUT.value, _MODEL.value, n, _SRC.value)


if __name__ == "__main__":
    cli.run(main)
