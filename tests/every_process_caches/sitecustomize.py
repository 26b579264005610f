"""Test harness only (``tests/multiprocess_job.py`` puts this folder on the jobs' ``PYTHONPATH``): every process of
a multi-process CPU job writes its compiled programs to the persistent compilation cache, not only process 0.

JAX writes cache entries from process 0 alone, and on CPU the entry's key includes each process's own device
topology, so process 1 of a 2-process job never finds an entry and compiles every program in every test run (24 s
of a 2-core machine per job). The programs are the same ones process 1 would compile; only where they come from
changes. The patch is applied when JAX's compiler module is first imported, so processes that never import JAX
(grain's data workers) stay as they are."""

import importlib.abc
import importlib.util
import sys

_COMPILER = "jax._src.compiler"


def _patch(compiler) -> None:
    from jax._src import compilation_cache, distributed

    write_from_process_0 = compiler._cache_write

    def cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
        if distributed.global_state.process_id == 0 or host_callbacks:
            return write_from_process_0(cache_key, compile_time_secs, module_name, backend, executable,
                                        host_callbacks)
        if compilation_cache.is_cache_used(backend):
            compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend,
                                                      int(compile_time_secs))

    compiler._cache_write = cache_write


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _COMPILER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchOnImport())
