"""Input pipelines: tfds-prepared datasets read as random-access sources, on the host, per process.

pipeline        Source protocol, BadRecord, the deterministic resumable per-process `Loader`,
                `eval_batches` (one padded pass), `to_global` (-> sharded jax.Arrays), `benchmark_input`
images          host-side image transforms (decode, RandomResizedCrop, flip, normalize,
                resize + center crop) and the train / eval transform factories
image_datasets  tfds builders (digits, fashion_mnist_local, image_folder), `prepare`, `open_source`,
                per-dataset mean/std
text, tokenizers, text_datasets   the text side (tokenizers, packing, text builders)
"""
