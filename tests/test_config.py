"""Every config builds and validates; bad overrides fail before any work, naming the key."""

import pathlib
import subprocess
import sys

import jax
import ml_collections
import pytest
import readme_text
from ml_collections import config_flags

from cab_jax import config as config_lib
from cab_jax.errors import ConfigError

CONFIGS = sorted(pathlib.Path(__file__).parents[1].glob("configs/*.py"))


def load(path: pathlib.Path | str, *overrides: str):
    """Parse a config file (with an optional ``:variant``) and command-line style overrides, as main.py does."""
    from absl import flags

    argv = ["prog", f"--config={path}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_builds_and_validates(path):
    c = load(path)
    config_lib.validate(c)
    assert c.task in config_lib.TASKS


def test_there_are_the_three_documented_configs():
    assert {p.stem for p in CONFIGS} >= {"demo", "vim_small", "vim_tiny"}


def test_variants_set_the_subset_and_its_epochs():
    """``vim_small.py:subset=0.01`` trains on 1 % of each class for the recipe's 3000 epochs."""
    path = CONFIGS[0].parent / "vim_small.py"
    c = load(f"{path}:subset=0.01,mode=soft,synthetic=True")
    assert (c.data.subset_fraction, c.loss.mode, c.data.synthetic) == (0.01, "soft", True)
    config_lib.validate(c)
    assert config_lib.schedule(c.train, 12_800, c.data.subset_fraction).total_steps == 3000 * 25
    assert load(path).data.subset_fraction == 0.1  # the default variant
    with pytest.raises(Exception, match="subsett"):
        load(f"{path}:subsett=0.01")
    with pytest.raises(Exception, match="expected a float"):
        load(f"{path}:subset=lots")


def test_parse_arg_types_and_errors():
    arg = config_lib.parse_arg("n=3,x=0.5,flag=True,name=abc", n=1, x=0.1, flag=False, name="")
    assert (arg.n, arg.x, arg.flag, arg.name) == (3, 0.5, True, "abc")
    assert config_lib.parse_arg(None, n=1).n == 1
    with pytest.raises(ValueError, match="True or False"):
        config_lib.parse_arg("flag=maybe", flag=False)
    with pytest.raises(ValueError, match="key=value"):
        config_lib.parse_arg("n", n=1)


def test_batch_must_divide_the_data_parallel_mesh():
    c = load(CONFIGS[0].parent / "vim_small.py", "--config.train.batch_size=100")
    config_lib.validate(c)  # no mesh given: nothing to divide
    with pytest.raises(ValueError, match=r"config\.train\.batch_size.*divisible by the data-parallel mesh size"):
        config_lib.validate(c, {"data": 2, "fsdp": 4, "tensor": 1})
    config_lib.validate(c, {"data": 4, "fsdp": 1, "tensor": 2})
    c.teacher.train.eval_batch_size = 6
    with pytest.raises(ValueError, match=r"config\.teacher\.train\.eval_batch_size"):
        config_lib.validate(c, {"data": 4, "fsdp": 1, "tensor": 2})


def test_the_configs_xla_gpu_options_parse_and_this_xla_knows_them():
    """The train step's GPU compile options, as every config sets them, are options the installed XLA accepts (it
    rejects an unknown one at compile time: a renamed option would fail every GPU run)."""
    assert config_lib.xla_options(" xla_a=1, xla_b=x ,") == {"xla_a": "1", "xla_b": "x"}
    assert config_lib.xla_options("") == {}
    assert config_lib.xla_options("xla_a=1,, xla_b=x") == {"xla_a": "1", "xla_b": "x"}
    assert config_lib.xla_options("xla_a=1,xla_gpu_enable_command_buffer=FUSION,CUBLAS") == {
        "xla_a": "1", "xla_gpu_enable_command_buffer": "FUSION,CUBLAS"}  # a list value keeps its commas
    with pytest.raises(ConfigError, match="dot_merger=0"):
        config_lib.xla_options("xla_a=1,dot_merger=0")
    options = {}
    for path in CONFIGS:
        c = load(path)
        for train in (c.train, c.teacher.get("train")):
            options.update(config_lib.xla_options(train.xla_gpu_options) if train else {})
    assert options == {"xla_gpu_dot_merger_threshold_mb": "0"}
    assert float(jax.jit(lambda x: x + 1, compiler_options=options)(1.0)) == 2.0
    with pytest.raises(Exception, match="xla_gpu_no_such_option"):
        jax.jit(lambda x: x + 2, compiler_options={"xla_gpu_no_such_option": "0"})(1.0)


def test_sizes_follow_the_paper():
    small, tiny = load(CONFIGS[0].parent / "vim_small.py"), load(CONFIGS[0].parent / "vim_tiny.py")
    assert (small.teacher.embed_dim, small.teacher.num_heads, small.student.embed_dim) == (384, 6, 384)
    assert (tiny.teacher.embed_dim, tiny.teacher.num_heads, tiny.student.embed_dim) == (192, 3, 192)
    assert small.student.depth == 24 and small.teacher.depth == 12 and small.student.d_state == 16


def test_overrides_apply():
    c = load(CONFIGS[0].parent / "vim_small.py", "--config.train.batch_size=128", "--config.loss.mode=soft",
             "--config.data.subset_fraction=0.05")
    assert (c.train.batch_size, c.loss.mode, c.data.subset_fraction) == (128, "soft", 0.05)
    config_lib.validate(c)
    assert config_lib.schedule(c.train, 64_000, c.data.subset_fraction).total_steps == 600 * 500


def test_unknown_key_fails_naming_it():
    with pytest.raises(Exception, match="batch_szie"):
        load(CONFIGS[0].parent / "vim_small.py", "--config.train.batch_szie=128")


def test_wrong_type_fails():
    with pytest.raises(Exception, match="batch_size"):
        load(CONFIGS[0].parent / "vim_small.py", "--config.train.batch_size=abc")


@pytest.mark.parametrize("override, key", [
    ("--config.train.xla_gpu_options=dot_merger=0", "train.xla_gpu_options"),
    ("--config.train.xla_gpu_options=xla_gpu_dot_merger_threshold_mb", "train.xla_gpu_options"),
    ("--config.data.subset_fraction=-0.1", "data.subset_fraction"),
    ("--config.data.subset_fraction=1.5", "data.subset_fraction"),
    ("--config.loss.mode=hard", "loss.mode"),
    ("--config.student.scan_impl=cuda", "student.scan_impl"),
    ("--config.student.scan_blocks=2,x,1,1,1", "student.scan_blocks"),
    ("--config.student.scan_blocks=0,32,1,1,1", "student.scan_blocks"),
    ("--config.student.a_init=zeros", "student.a_init"),
    ("--config.bridge.kernel_map=cosine", "bridge.kernel_map"),
    ("--config.bridge.layer_map=explicit", "bridge.layers"),
    ("--config.task=finetune", "task"),
    ("--config.student.model=mamba", "student.model"),
    ("--config.dtype=float16", "dtype"),
    ("--config.train.batch_size=0", "train.batch_size"),
    ("--config.train.ema_decay=1.0", "train.ema_decay"),
    ("--config.student.patch_size=14", "student.patch_size"),
    ("--config.teacher.num_heads=5", "teacher.num_heads"),
    ("--config.mesh.tensor=0", "mesh.tensor"),
    ("--config.data.subset_fraction=0.3", "train.epochs"),
    ("--config.data.interpolation=lanczos", "data.interpolation"),
    ("--config.data.randaugment=rand-m9-inc0", "data.randaugment"),
    ("--config.data.random_erase=1.5", "data.random_erase"),
    ("--config.data.repeated_augmentation=0", "data.repeated_augmentation"),
    ("--config.study.fractions=(0.1, 1.5)", "study.fractions"),
    ("--config.study.fractions=(0.1, 0.1)", "study.fractions"),
    ("--config.study.seeds=(0, 0)", "study.seeds"),
    ("--config.study.modes=('hard',)", "study.modes"),
])
def test_bad_values_fail_with_the_key(override, key):
    study = key.startswith("study.")  # the demo is a study; vim_small trains one student
    c = load(CONFIGS[0].parent / ("demo.py" if study else "vim_small.py"), override)
    with pytest.raises(ValueError, match=f"config.{key}".replace(".", r"\.")):
        config_lib.validate(c)


def test_schedule_derivation():
    t = load(CONFIGS[0].parent / "vim_small.py").train
    s = config_lib.schedule(t, train_size=128_000, subset_fraction=0.1)
    assert s.steps_per_epoch == 250 and s.total_steps == 300 * 250 and s.warmup_steps == 5 * 250
    assert s.peak_lr == pytest.approx(5e-4)
    t.batch_size, t.steps = 64, 10
    s = config_lib.schedule(t, train_size=128_000, subset_fraction=0.1)
    assert s.total_steps == 10 and s.peak_lr == pytest.approx(6.25e-5) and s.warmup_steps == 9
    assert config_lib.schedule(t, train_size=128_000, subset_fraction=0.03).total_steps == 10  # no default needed


def test_main_rejects_bad_override_before_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cab_jax.main", f"--config={CONFIGS[0].parent / 'demo.py'}",
         f"--workdir={tmp_path}", "--config.loss.mode=nonsense"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "config.loss.mode" in proc.stderr and "nonsense" in proc.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written before validation passes"


def test_a_language_study_has_no_train_fractions():
    c = load(CONFIGS[0].parent / "demo_lm.py")
    with c.unlocked():
        c.study.fractions = (0.5,)
    with pytest.raises(ValueError, match=r"config\.study\.fractions"):
        config_lib.validate(c)


def test_the_defaults_readme_names():
    """README's stated defaults: AdamW weight decay 0.05 and the two newest checkpoints kept (the vision recipe),
    the scan picked by the backend (student.scan_impl auto) in every vision config but study_digits (the sequential
    scan, for the CPU it is sized for), the ablation variants of
    configs/demo.py (CAB's variants beside soft distillation over three seeds), and phi_mamba.py's mesh and
    synthetic variant."""
    from configs import demo, study_digits, vim_small, vim_tiny

    t = config_lib.vision_train()
    assert (t.weight_decay, t.keep_checkpoints) == (0.05, 2)
    for module in (demo, vim_small, vim_tiny):
        assert module.get_config().student.scan_impl == "auto", module.__name__
    assert study_digits.get_config().student.scan_impl == "reference"
    for ablation, variants in demo.ABLATIONS.items():
        c = demo.get_config(f"ablation={ablation}")
        assert (tuple(c.study.modes), tuple(c.study.seeds), tuple(c.study.variants)) == (("soft", "cab"), (0, 1, 2),
                                                                                        variants)
    assert "attention: bridge.kind=attention" in demo.ABLATIONS["bridge_form"]
    # README: `configs/demo.py:ablation=bridge_form` (or `layer_map`, `larger_teacher`): those names, no others
    assert set(demo.ABLATIONS) == set(readme_text.find(
        r"`configs/demo\.py:ablation=(\w+)` \(or `(\w+)`, `(\w+)`\) runs the reviewers' ablations"))
    from configs import phi_mamba  # FSDP over every device; ":synthetic=True" needs no data nor weights

    assert (phi_mamba.get_config().mesh.data, phi_mamba.get_config().mesh.fsdp) == (1, -1)
    assert phi_mamba.get_config("synthetic=True").data.synthetic and not phi_mamba.get_config().data.synthetic
    with pytest.raises(ValueError, match="ablation"):
        demo.get_config("ablation=bridge")


@pytest.mark.parametrize("name", ["vim_tiny", "vim_small"])
def test_the_vision_recipe_is_the_one_readme_states(name):
    """README: AdamW, lr 5e-4 x batch/512, weight decay 0.05, 5 warmup epochs from 1e-6, cosine to 1e-5, label
    smoothing 0.1, mixup 0.8 / cutmix 1.0, float32, epochs 3000/600/300/150 for the 1/5/10/20 % subsets, per-class
    subsets chosen with seed 2025; ``configs/vim_tiny.py:subset=0.01`` selects 1 %; DeiT's augmentation: random
    resized crop (bicubic), flip, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25 and repeated
    augmentation (3), the values read from README."""
    import importlib

    module = importlib.import_module(f"configs.{name}")
    c = module.get_config()
    t = c.train
    assert (t.base_lr, t.lr_reference_batch, t.weight_decay) == (5e-4, 512, 0.05)
    assert (t.warmup_epochs, t.warmup_lr, t.lr_decay, t.min_lr) == (5.0, 1e-6, "cosine", 1e-5)
    assert (t.label_smoothing, t.mixup_alpha, t.cutmix_alpha, c.dtype) == (0.1, 0.8, 1.0, "float32")
    assert c.data.subset_seed == 2025
    # README's augmentation sentence: crop (bicubic), flip, the RandAugment policy, erasing and repeated augmentation
    interpolation, policy, erase, repeats = readme_text.find(
        r"The augmentation is DeiT's: random resized crop \((\w+)\), flip, RandAugment `([^`]+)`, random erasing "
        r"([\d.]+), and repeated augmentation \((\d+)\) when training on more than one device")
    assert (c.data.interpolation, c.data.hflip, c.data.randaugment, c.data.random_erase,
            c.data.repeated_augmentation) == (interpolation, True, policy, float(erase), int(repeats))
    per_epoch = 10  # steps per epoch of a subset of 10 batches
    for fraction, epochs in {0.01: 3000, 0.05: 600, 0.1: 300, 0.2: 150}.items():
        assert config_lib.schedule(t, per_epoch * t.batch_size, fraction).total_steps == epochs * per_epoch, fraction
    assert load(f"{module.__file__}:subset=0.01").data.subset_fraction == 0.01


def test_the_language_recipe_is_the_one_readme_states():
    """README: phi_mamba.py trains with AdamW lr 5e-4 without weight decay, 10 % linear warmup then linear decay,
    gradient clipping at 1, one epoch, bfloat16 compute (the language demo has a test of its own, below)."""
    from configs import phi_mamba

    c = phi_mamba.get_config()
    t = c.train
    assert (t.base_lr * t.batch_size / t.lr_reference_batch, t.weight_decay, t.grad_clip) == (5e-4, 0.0, 1.0)
    assert (t.warmup_epochs / t.epochs, t.lr_decay, t.epochs, c.dtype) == (0.1, "linear", 1.0, "bfloat16")


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _study_stage(c: ml_collections.ConfigDict, **changes):
    """One stage of the study ``c`` as ``study.run`` makes it: the job, its train-set size and its schedule."""
    from cab_jax import domains, study

    stage = study._stage(c, **changes)
    domain = domains.for_config(stage)
    job = domain.job()
    size = domain.data.train_size(job.data)
    return job, size, config_lib.schedule(job.train, size, job.data.get("subset_fraction", 1.0))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> str:
    """A data_dir for the embedded digits, built by the first test that reads it (a few seconds)."""
    return str(tmp_path_factory.mktemp("tfds"))


def test_the_vision_demo_teacher_is_the_one_readme_logs(digits_dir):
    """README's log of configs/demo.py at full size: ``teacher: 214218 parameters, 1438 train examples, 600 steps (22
    warmup, 22 per epoch), peak lr 0.001``, a line per 50 steps, and the 1,438 train / 359 test images of its prose,
    all derived from the unmodified config without training (the lr logged at step 50 too)."""
    from cab_jax import summary, train
    from cab_jax.data import images
    from configs import demo

    c = demo.get_config()
    job, size, sched = _study_stage(c, task="train_teacher", **{"data.data_dir": digits_dir})
    params, examples, steps, warmup, per_epoch, peak_lr = readme_text.find(
        r"train\.py:\d+\] teacher: (\d+) parameters, (\d+) train examples, (\d+) steps \((\d+) warmup, (\d+) per "
        r"epoch\), peak lr ([\d.e-]+),")
    assert (summary.parameter_count(job.model), size, sched.total_steps, sched.warmup_steps, sched.steps_per_epoch,
            f"{sched.peak_lr:.3g}") == (int(params), int(examples), int(steps), int(warmup), int(per_epoch), peak_lr)
    log_every, total, lr = readme_text.find(r"\[teacher (\d+)/(\d+)\] .*? lr=([\d.e-]+) ")
    (final_step, eval_examples) = readme_text.find(r"\[teacher\] final eval at step (\d+): .* eval_examples=(\d+)")
    assert (job.train.log_every, sched.total_steps, sched.total_steps) == (int(log_every), int(total), int(final_step))
    # the lr logged at step s is the one the s-th update used: the schedule's value at s - 1
    assert f"{float(train.learning_rate_fn(job.train, sched)(int(log_every) - 1)):.4g}" == lr
    train_images, test_images = readme_text.find(r"(\d[\d,]*) train / (\d[\d,]*) test images")
    test_size = len(images._eval_source(job.data))
    assert (size, test_size, test_size) == (_number(train_images), _number(test_images), int(eval_examples))


def test_the_vision_demo_table_is_the_one_readme_shows(digits_dir):
    """README's table of configs/demo.py at full size: the teacher's 600 steps on 1438 images, then one Vim student
    per loss mode (vanilla, soft, cab) on 3 % of each class (40 images) for 250 steps: each row's mode, fraction,
    seed, train images and steps, in order, derived from the unmodified config as ``study.run`` derives them."""
    from cab_jax import study
    from configs import demo

    text = readme_text.README.read_text()
    header = "| model | mode | fraction | seed | train images |"
    lines = text[text.index(header):].splitlines()
    table = [readme_text.table_cells(line) for line in lines[:next(
        i for i, line in enumerate(lines) if not line.startswith("|"))]]
    rows = [dict(zip(table[0], row, strict=True)) for row in table[2:]]
    shown = [(r["mode"], float(r["fraction"]), int(r["seed"]), int(r["train images"]), int(r["steps"])) for r in rows]

    c = demo.get_config()
    _, size, sched = _study_stage(c, task="train_teacher", **{"data.data_dir": digits_dir})
    derived = [("supervised", 1.0, c.seed, size, sched.total_steps)]
    for fraction, mode, variant, seed in study.grid(c):
        assert variant == study.NO_VARIANT
        _, size, sched = _study_stage(c, task="distill", seed=seed, **{
            "loss.mode": mode, "data.data_dir": digits_dir, "data.subset_fraction": fraction})
        derived.append((mode, fraction, seed, size, sched.total_steps))
    assert shown == derived
    # ... and the prose says the same: the modes, 3 % of each class (40 images), the students' workdirs
    modes, percent, images = readme_text.find(r"distils one Vim student per loss mode \(([^)]*)\) on (\d+) % of each "
                                          r"class \((\d+) images\)")
    _, fraction, _, size, _ = derived[1]
    assert (modes.split(", "), float(percent) / 100, int(images)) == (list(c.study.modes), fraction, size)
    mode, fraction, seed = readme_text.find(r"/tmp/cab_demo/students/(\w+)/fraction([\d.]+)_seed(\d+)")
    assert (mode, float(fraction), int(seed)) in [(d[0], d[1], d[2]) for d in derived[1:]]


WORD_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


def test_the_language_demo_is_the_one_readme_states():
    """README's language demo (configs/demo_lm.py): a 4 MB corpus with a byte-level BPE of 2,048 tokens, a 4-layer
    Phi teacher and three 4-layer Phi-Mamba students (vanilla, soft, and cab initialised from the teacher's
    attention), whose workdirs ``students/MODE/seedN`` the sampling commands read."""
    from cab_jax import study
    from configs import demo_lm

    c = demo_lm.get_config()
    megabytes, vocab, teacher_depth, students, student_depth = readme_text.find(
        r"Laptop demo \(the Python standard library's own source and pydoc topics, (\d+) MB, with a byte-level BPE of "
        r"([\d,]+) tokens trained on it; a (\d+)-layer Phi teacher, (\w+) (\d+)-layer Phi-Mamba students\)")
    assert c.data.max_corpus_bytes == int(megabytes) * 1_000_000
    assert (c.data.vocab_size, c.teacher.vocab_size, c.student.vocab_size) == (_number(vocab),) * 3
    assert (c.teacher.model, c.teacher.depth, c.student.model, c.student.depth) == (
        "phi", int(teacher_depth), "phi_mamba", int(student_depth))
    cells = study.grid(c)
    assert len(cells) == WORD_NUMBERS[students]
    (perplexities,) = readme_text.find(r"Held-out perplexity: teacher [\d.]+; students ([^(]*\([^)]*\) [\d.]+)")
    shown = [(part.split()[0], "initialised from the teacher's attention" in part) for part in perplexities.split(", ")]
    assert shown == [(mode, mode in c.study.init_from_attention_modes) for _, mode, _, _ in cells]
    mode, seed = readme_text.find(r"--workdir=/tmp/cab_demo_lm/students/(\w+)/seed(\d+)")
    assert (mode, int(seed)) in [(m, s) for _, m, _, s in cells]


def test_every_config_file_shows_its_launch_command():
    """README: each file in configs/ has a docstring with the command that runs it."""
    import importlib

    assert len(CONFIGS) >= 6
    for path in CONFIGS:
        module = importlib.import_module(f"configs.{path.stem}")
        assert f"python -m cab_jax.main --config=configs/{path.name}" in (module.__doc__ or ""), path.name


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested dict (a config's ``to_dict()``) as {dotted field name: value}."""
    return {k: v for name, value in tree.items()
            for k, v in (flatten(value, f"{prefix}{name}.") if isinstance(value, dict) else
                         {f"{prefix}{name}": value}).items()}


def test_every_config_file_states_every_field():
    """README: each config has every field of its domain, the fields of every other config of that domain (a study's
    grid only in studies), so no config leaves a field to the code's fallback (``student.get("remat_policy", ...)``)."""
    import importlib

    configs = {p.name: importlib.import_module(f"configs.{p.stem}").get_config() for p in CONFIGS}
    stated = {name: set(flatten(c.to_dict())) for name, c in configs.items()}
    for name, c in configs.items():
        domain = set().union(*(stated[other] for other, o in configs.items() if o.domain == c.domain))
        expected = {f for f in domain if c.task == "study" or not f.startswith("study.")}
        assert stated[name] == expected, (name, "lacks", sorted(expected - stated[name]), "adds",
                                          sorted(stated[name] - expected))


def test_the_study_digits_grid_is_4_fractions_3_modes_3_seeds_on_65_tokens():
    """README: configs/study_digits.py runs the default grid (4 fractions x 3 modes x 3 seeds) on the digits in 65
    tokens (32 px images in 4 px patches, plus the cls token), for teacher and student alike."""
    from configs import study_digits

    c = study_digits.get_config()
    assert (len(c.study.fractions), tuple(c.study.modes), len(c.study.seeds)) == (4, ("vanilla", "soft", "cab"), 3)
    for model in (c.teacher, c.student):
        assert (c.data.image_size // model.patch_size) ** 2 + 1 == 65


def test_the_gpu_extra_pins_the_jax_the_kernels_are_tested_with():
    """README: `pip install -e .[gpu]` pins the JAX release the GPU kernels are tested with: a lower and an upper
    bound on one minor release."""
    import re

    text = (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text()
    (gpu,) = re.findall(r'^gpu = \["([^"]+)"\]$', text, re.M)
    pinned, low, high = re.fullmatch(r"jax\[cuda\d+\]>=((\d+\.\d+)\.\d+),<(\d+\.\d+)", gpu).groups()
    assert tuple(map(int, high.split("."))) == (int(low.split(".")[0]), int(low.split(".")[1]) + 1), gpu
    # ... and its lower bound is the release README's kernel table says each GPU kernel was compiled and tested with
    readme = readme_text.README.read_text()
    for kernel in ("pallas_triton", "pallas_mosaic"):
        (row,) = [line for line in readme.splitlines() if line.startswith(f"| `{kernel}` |")]
        assert f"jax {pinned}, H" in row, (kernel, pinned, row)


def test_the_vision_demo_runs_on_the_17_tokens_readme_states():
    """README: the demo's teacher and student run "on 17 tokens of upsampled digits": 32 px images in 8 px patches
    plus the cls token, in the config and in the position embeddings of the models the domain builds from it."""
    from flax import nnx

    from cab_jax import domains
    from configs import demo

    (tokens,) = readme_text.find(r"on (\d+) tokens of upsampled digits")
    c = demo.get_config()
    domain = domains.for_config(c)
    for model, build in ((c.teacher, domain.build_teacher), (c.student, domain.build_student)):
        assert (c.data.image_size // model.patch_size) ** 2 + 1 == int(tokens), model.model
        assert nnx.eval_shape(lambda build=build: build(nnx.Rngs(0))).pos_embed.shape[1] == int(tokens)


def test_study_digits_bridges_raw_q_and_k():
    """README: configs/study_digits.py runs "its bridge on raw q and k targets": no kernel map on the teacher's q and
    k (bridge.kernel_map none), where the demo's CAB keeps the softmax map."""
    from configs import demo, study_digits

    readme_text.find(r"`configs/study_digits\.py` runs the default grid .*?(its bridge on raw q and k targets)")
    assert (study_digits.get_config().bridge.kernel_map, demo.get_config().bridge.kernel_map) == ("none", "softmax")


# The shared sections README says start from cab_jax/config.py's defaults, and the functions that make them.
SHARED_SECTIONS = {"train": {"vision": "vision_train", "language": "language_train"}, "loss": "loss", "mesh": "mesh",
                   "data": {"vision": "vision_data"}}


def test_every_config_builds_its_shared_sections_from_config_py():
    """README: the sections the recipes share (training, loss, mesh, the vision data) start from the defaults in
    cab_jax/config.py, which each file changes through arguments: in each config file's source, each such section
    (the teacher's ``train`` too) is assigned once, from a call of that config.py function, and not changed after."""
    import ast
    import importlib

    for path in CONFIGS:
        domain = importlib.import_module(f"configs.{path.stem}").get_config().domain
        wanted = {name: f if isinstance(f, str) else f.get(domain) for name, f in SHARED_SECTIONS.items()}
        wanted = {name: f for name, f in wanted.items() if f}
        tree = ast.parse(path.read_text())
        made = {}  # section -> the config.py function called to make it
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                            and target.value.id == "c" and target.attr in wanted:
                        call = node.value
                        assert isinstance(call, ast.Call) and ast.unparse(call.func).startswith("config."), \
                            (path.name, target.attr, ast.unparse(call))
                        assert target.attr not in made, (path.name, target.attr, "assigned twice")
                        made[target.attr] = ast.unparse(call.func)
            if isinstance(node, ast.keyword) and node.arg == "train":  # c.teacher = dict(..., train=config.X(...))
                made["teacher.train"] = ast.unparse(node.value.func) if isinstance(node.value, ast.Call) else None
            # no later change: c.SECTION.field = ..., c.SECTION[...] += ..., c.SECTION.update(...)
            changed = [t.value for t in getattr(node, "targets", [getattr(node, "target", None)])
                       if isinstance(t, ast.Attribute | ast.Subscript)]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                changed.append(node.func.value)
            for section in changed:
                assert ast.unparse(section) not in {f"c.{name}" for name in wanted}, \
                    (path.name, "changes", ast.unparse(node), "after config.py made it")
        expected = {name: f"config.{f}" for name, f in wanted.items()}
        expected["teacher.train"] = expected["train"]
        assert made == expected, path.name
