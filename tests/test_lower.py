"""The whole sharded train step exported for TPU and CUDA from this CPU machine (``cab_jax.lower``): each platform's
scan kernel inside it, once per device on its shard, no host callbacks; and a kernel left outside the per-device
split is caught. The meshes need 8 fake devices, so each case runs in a fresh process."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import readme_text
from readme_text import table_cells

from cab_jax import lower, memory_plan, sharding, train
from configs import demo

ROOT = pathlib.Path(__file__).parents[1]
SHALLOW = ("--config.student.depth=2", "--config.teacher.depth=2")  # the program's shape per layer is the same


def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=os.environ)


def test_the_command_line_lowers_a_data_and_fsdp_sharded_vim_step_for_tpu_and_cuda():
    proc = run(["-m", "cab_jax.lower", "--config=configs/vim_tiny.py", "--devices=8", "--config.mesh.data=2",
                "--config.mesh.fsdp=4", "--config.train.batch_size=64", "--tpu=v5e", *SHALLOW])
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("tpu (", "cuda:"))]
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert len(lines) == 2, proc.stdout
    # 64 images over data x fsdp = 8 devices: 8 rows of Vim-Ti's 197 tokens x 384 channels per kernel call; the TPU
    # kernel built for the generation --tpu names (v5e: 128 MiB of VMEM, v4's default 16)
    assert lines[0].startswith("tpu (v5e, 128 MiB VMEM): pallas_tpu kernel called 3 times on shards 8x197x384;"), (
        lines[0])
    assert lines[1].startswith("cuda: pallas_") and "on shards 8x197x384;" in lines[1], lines[1]
    assert all(line.endswith(": ok") for line in lines), lines


def test_the_command_line_exits_1_naming_a_failed_check():
    """A GPU kernel forced onto a TPU export runs interpreted there (XLA ops, no kernel): the line says FAILED and
    why, and the exit status is 1."""
    proc = run(["-m", "cab_jax.lower", "--config=configs/vim_tiny.py", "--platforms=tpu", "--devices=8",
                "--config.student.scan_impl=pallas_triton", *SHALLOW])
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert "tpu (v4, 16 MiB VMEM): pallas_triton kernel called 0 times" in proc.stdout
    assert "FAILED: no __gpu$xla.gpu.triton call: the pallas_triton scan kernel is not in the step" in proc.stdout


CASES_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    from cab_jax import lower, memory_plan, sharding, train
    from cab_jax.models import mamba

    def config(path, overrides):
        spec = importlib.util.spec_from_file_location("config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        c = module.get_config()
        for field, value in overrides.items():
            *parents, leaf = field.split(".")
            node = c
            for parent in parents:
                node = node[parent]
            node[leaf] = value
        return c

    out = {}
    for name, path, overrides, platform in json.loads(sys.argv[1]):
        if name.startswith("kernel outside shard_map"):  # the bug to catch: the scan run on the global arrays
            mamba.Mamba._scan_per_device = lambda self, scan, dirs, z: scan(dirs, z)
        r = lower.lower(config(path, overrides), platform)
        out[name] = {"kernel": r.kernel, "calls": r.calls, "shapes": sorted(set(r.call_shapes)),
                     "custom_calls": r.custom_calls, "problems": r.problems}
    # the train state split over 8 devices by FSDP, against its copy on each of 8 data-parallel devices
    c = lower.lowering_config(config("configs/vim_tiny.py", {"student.depth": 2, "teacher.depth": 2}))
    acts = memory_plan.activations(c, jax.devices()[0])
    for mesh_cfg in ({"data": 8, "fsdp": 1}, {"data": 1, "fsdp": 8}):
        c.mesh.update(mesh_cfg)
        mesh = sharding.make_mesh(c.mesh)
        out[f"state {mesh_cfg}"] = memory_plan.estimate(c, mesh, acts).state
    # by hand: a leaf whose spec names "fsdp" keeps 1/8 of its bytes, the others all of them
    trainer, state, _ = train.abstract_setup(c, mesh)
    specs = [s.spec for s in jax.tree.leaves(trainer.state_shardings)]
    out["by hand"] = sum(x.size * x.dtype.itemsize // (8 if "fsdp" in jax.tree.leaves(tuple(spec)) else 1)
                         for x, spec in zip(jax.tree.leaves(state), specs))
    print("RESULT" + json.dumps(out))
""")


def test_vim_small_language_and_tensor_parallel_steps_lower_and_a_kernel_outside_shard_map_is_caught():
    shallow = {"student.depth": 2, "teacher.depth": 2}
    cases = [
        ("vim_s data 8", "configs/vim_small.py", {"train.batch_size": 64, **shallow}, "tpu"),
        ("vim_ti data 4 x tensor 2", "configs/vim_tiny.py",
         {"train.batch_size": 64, "mesh.data": 4, "mesh.tensor": 2, **shallow}, "tpu"),
        ("phi_mamba fsdp 8", "configs/phi_mamba.py", {"train.batch_size": 8, "data.seq_len": 256, **shallow}, "tpu"),
        ("kernel outside shard_map", "configs/vim_tiny.py", {"train.batch_size": 64, **shallow}, "cuda"),
        ("kernel outside shard_map (tpu)", "configs/vim_tiny.py", {"train.batch_size": 64, **shallow}, "tpu"),
    ]
    proc = run(["-c", CASES_SCRIPT, json.dumps(cases)])
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    vim_s, tensor, phi, outside, outside_tpu = (out[name] for name, *_ in cases)
    assert vim_s["problems"] == [] and vim_s["calls"] == 3 and vim_s["shapes"] == [[8, 197, 768]], vim_s
    assert vim_s["custom_calls"] == ["tpu_custom_call"], vim_s
    # d_inner 384 split over the tensor axis, the batch over data: 16 rows x 192 channels per kernel call
    assert tensor["problems"] == [] and tensor["shapes"] == [[16, 197, 192]], tensor
    assert phi["problems"] == [] and phi["kernel"] == "xla" and phi["custom_calls"] == [], phi
    assert outside["shapes"] == [[64, 197, 384]], outside
    assert any("global batch of 64" in p for p in outside["problems"]), outside
    # Mosaic TPU refuses to lower a kernel that the partitioner would have to split
    assert outside_tpu["problems"][0].startswith("lowering failed: NotImplementedError"), outside_tpu
    replicated, split = out["state {'data': 8, 'fsdp': 1}"], out["state {'data': 1, 'fsdp': 8}"]
    assert split == out["by hand"] and split < 0.3 * replicated, (split, out["by hand"], replicated)


def test_check_reads_kernel_calls_and_callbacks_from_module_text():
    text = ('%0 = stablehlo.custom_call @tpu_custom_call(%a, %b) {backend_config = "x"} : (tensor<8x197x384xf32>, '
            'tensor<384x16xf32>) -> tensor<8x197x384xf32>\n'
            '%1 = stablehlo.custom_call @xla_ffi_python_cpu_callback(%c) : (tensor<f32>) -> tensor<f32>\n')
    calls, shapes, targets, problems = lower.check(text, "pallas_tpu", global_batch=64, shard_batch=8)
    assert (calls, shapes) == (1, [(8, 197, 384)])
    assert targets == ["tpu_custom_call", "xla_ffi_python_cpu_callback"]
    assert problems == ["host callback xla_ffi_python_cpu_callback"]
    assert lower.check(text, "pallas_triton", 64, 8)[3][-1].startswith("no __gpu$xla.gpu.triton call")


# ------------------------------------------------------------------------------------------------ memory plan


def demo_config(**student):
    c = lower.lowering_config(demo.get_config())
    c.student.update(student)
    return c


def test_memory_estimate_counts_the_state_exactly_and_the_activations_linearly_in_the_batch():
    import jax

    c = demo_config(remat=True)
    device = jax.devices()[0]
    mesh = sharding.make_mesh(c.mesh, [device])
    acts = memory_plan.activations(c, device)
    e = memory_plan.estimate(c, mesh, acts, per_device_batch=4)
    trainer, state, teacher = train.abstract_setup(c, mesh)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    # float32 parameters, two AdamW moments of them; the step counter, rng and the moments' counts are small
    assert 3 * 4 * n_params <= e.state <= 3 * 4 * n_params + 4096, (e.state, n_params)
    assert e.gradients == 4 * n_params
    assert e.teacher == 4 * sum(x.size for x in jax.tree.leaves(teacher))
    # the line through batches 1 and 2 gives batch 4's residuals as computed at batch 4
    residuals, inputs = memory_plan.activation_bytes(trainer, state, teacher, 4)
    assert (e.inputs, e.residuals) == (inputs, residuals) and e.residuals > 0
    # remat keeps less for the backward pass than the same model without it, plus one layer's share
    flat = memory_plan.activations(demo_config(remat=False), device)
    assert acts.at(4)[1] < flat.at(4)[1] and acts.at(4)[2] == flat.at(4)[1] // c.student.depth
    assert flat.at(4)[2] == 0
    assert memory_plan.largest_batch(e, acts, e.total / memory_plan.USABLE) == 4


@pytest.mark.slow
@pytest.mark.parametrize("config", ["vim_tiny", "vim_small", "phi_mamba"])
def test_readmes_memory_table_is_what_the_command_prints(config):
    """README's per-chip memory table is the output of `python -m cab_jax.lower --platforms= --memory_plan`: each
    config's rows (GiB per chip, the state's share, the largest batch per chip of each TPU generation) are what the
    command prints today."""
    proc = run(["-m", "cab_jax.lower", f"--config=configs/{config}.py", "--platforms=", "--memory_plan"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = {cells[0]: cells for cells in map(table_cells, proc.stdout.splitlines()) if cells[0].isdigit()}
    readme = [cells for cells in map(table_cells, readme_text.README.read_text().splitlines())
              if cells[0].split(" ")[0] == config]
    assert len(readme) == 3, readme
    largest = None
    for _, chips, mesh, per_chip, gib, fixed, batches in readme:
        got = printed[chips]
        assert [mesh, per_chip.split(" ")[0], gib, fixed] == [got[1], got[3], got[4], got[5]], got
        largest = batches if batches != "same" else largest
        assert largest == ", ".join(got[7:11]), got


def test_the_largest_batch_fits_90_percent_of_each_generations_hbm():
    """README: the largest per-chip batch is the one whose estimate fits within 90 % of the chip's HBM (v4 32, v5e
    16, v5p 95, v6e 32 GiB); the next batch does not fit."""
    assert memory_plan.HBM_GIB == {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
    gib = 2**30
    acts = memory_plan.Activations(fixed=(gib // 8, gib // 4, gib // 8), per_example=(gib // 64, gib // 16, 0))
    e = memory_plan.Estimate(1, 2 * gib, gib, gib, *acts.at(1))
    total_at = lambda batch: memory_plan.Estimate(batch, e.state, e.teacher, e.gradients, *acts.at(batch)).total
    for generation, hbm in memory_plan.HBM_GIB.items():
        batch = memory_plan.largest_batch(e, acts, hbm * gib)
        assert total_at(batch) <= 0.9 * hbm * gib < total_at(batch + 1), generation
    assert memory_plan.largest_batch(e, acts, 4 * gib) == 0  # state, teacher and gradients alone exceed it
