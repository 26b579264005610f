"""Input data: image and text pipelines with the same public names, over the generic grain/TFDS loader.

Import the module you need (``from cab_jax.data import images``); nothing is re-exported here, so
importing one module, as grain's worker processes do to unpickle sources and transforms, loads only its imports.

  images         image classification pipelines: train_size, train_dataset, train_iterator,
                 eval_batches, prepare
  text           language-model pipelines, the same names plus load_tokenizer and load_eos_id
  loader         generic plumbing: prepared TFDS splits, the shuffled/sharded training stream, the
                 padded eval pass, TrainIterator and EvalBatches
  augment        per-example image transforms (DeiT-style train crop/flip, eval resize/center-crop)
  subset         per-class training subsets
  sources        random-access image sources and the shared source bases (JAX-free, for grain workers)
  text_sources   random-access token-window sources (JAX-free, for grain workers)
  digits         the TFDS builder of the embedded cab_digits dataset
  text_corpus    the embedded text corpus (Python's standard library) and its BPE tokenizer
  text_builder   packing token streams into windows, and the TFDS builder of cab_text
"""
