"""Sample text from a trained language model: ``python -m cab_jax.generate --workdir=DIR --prompt="def fib("``.

``DIR`` is the workdir of a language run (its ``run_config.json`` says what was trained there). A Phi-Mamba
student decodes in its recurrent form (a fixed-size conv window and SSM state per layer, whatever the length); a Phi
teacher (a ``train_teacher`` workdir, e.g. the demo's ``teacher/``) decodes with a KV cache.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from cab_jax import cli, train

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a language training run (holds run_config.json).")
_PROMPT = flags.DEFINE_string("prompt", "def fib(", "Text to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Number of tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; otherwise sample from softmax(logits / T).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


@dataclasses.dataclass
class Generator:
    """A model with jitted prefill and one-token decode steps over an explicit cache. The prompt is prefilled
    ``prefill_chunk`` tokens at a time, which bounds the teacher's attention scores to chunk x context."""

    model: nnx.Module
    prefill_chunk: int = 1024

    def __post_init__(self):
        graphdef, state = nnx.split(self.model)
        self._state = state

        @jax.jit
        def decode(state, tokens, cache):
            return nnx.merge(graphdef, state).decode(tokens, cache)

        self._decode = decode

    def __call__(self, prompt: np.ndarray, max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0) -> tuple[np.ndarray, float]:
        """prompt (batch, n) int -> (batch, max_new_tokens) new tokens and decode tokens/s (steps 2 onwards)."""
        batch, n = prompt.shape
        cache = self.model.init_cache(batch, n + max_new_tokens)
        for start in range(0, n, self.prefill_chunk):
            chunk = jnp.asarray(prompt[:, start : start + self.prefill_chunk], jnp.int32)
            logits, cache = self._decode(self._state, chunk, cache)
        key = jax.random.key(seed)
        out, start = [], None
        for i in range(max_new_tokens):
            key, sub = jax.random.split(key)
            last = logits[:, -1].astype(jnp.float32)
            token = (jnp.argmax(last, -1) if temperature == 0 else
                     jax.random.categorical(sub, last / temperature, axis=-1)).astype(jnp.int32)
            out.append(token)
            if i == 1:  # the second step onwards: compiled, steady state
                jax.block_until_ready(token)
                start = time.perf_counter()
            if i + 1 < max_new_tokens:
                logits, cache = self._decode(self._state, token[:, None], cache)
        tokens = np.asarray(jnp.stack(out, axis=1))
        rate = batch * (max_new_tokens - 2) / (time.perf_counter() - start) if max_new_tokens > 2 else float("nan")
        return tokens, rate


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
    from cab_jax.data import text

    c, trained, model = train.load_trained_model(_WORKDIR.value, "language")
    tokenizer = text.load_tokenizer(c.data)
    prompt = np.asarray([tokenizer.encode(_PROMPT.value).ids], np.int32)
    tokens, rate = Generator(model)(prompt, _MAX_NEW.value, _TEMPERATURE.value, _SEED.value)
    form = "KV cache" if trained == "teacher" else "recurrent state"
    print(_PROMPT.value + tokenizer.decode(tokens[0].tolist()), flush=True)
    print(f"[{trained}, {form}] {tokens.shape[1]} tokens, {rate:.1f} tokens/s", flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    cli.run(main)
