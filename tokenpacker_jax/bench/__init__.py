"""The tables of BENCHMARKS.md, as scripts: ``python -m tokenpacker_jax.bench``.

=====  ==============  ===========================================================  ==========
table  name            what                                                         module
=====  ==============  ===========================================================  ==========
1      projector       TokenPacker forward, ours (jit) vs PyTorch eager, % of the   projector
                       matmul peak measured in the same run
2      token_budget    one LLM with 576 (MLP) / 144 / 64 / 36 (TokenPacker) visual  token_budget
                       tokens: LLM prefill, first token, decode, memory
3      llava_torch     transformers' PyTorch LlavaForConditionalGeneration vs ours  llava_torch
4      training        tiny-config training step per projector: tokens/s, images/s  training
5      tpu_fit         the 7B / 13B steps compiled for TPU slices (``aot.py``)      tpu_fit
6      paper           the paper's projector table in miniature (trains 39 runs)    paper_table
7      packing         real positions padded vs packed (``data.stats``), the tiny   packing
                       step's supervised tokens/s packed vs padded
=====  ==============  ===========================================================  ==========

``python -m tokenpacker_jax.bench`` runs tables 1-5 and 7; ``paper`` is asked for by name (it
trains for hours). See ``__main__.py`` for the flags.

Also here: ``data_pipeline`` (samples per second of the input pipeline, BENCHMARKS.md "Data
pipeline"; ``python -m tokenpacker_jax.bench.data_pipeline``) and ``torch_tokenpacker``
(the projector in PyTorch: table 1's other side and the parity tests' oracle), and
``serving`` (the server under concurrent clients, batched against one request at a time,
BENCHMARKS.md "Serving under load"; ``python -m tokenpacker_jax.bench.serving``).

What the tables share: ``measurement`` (the timing rule, a program's planned bytes,
parameters drawn on the host), ``hardware`` (the devices each side runs on, the line naming
the machine) and ``report`` (Markdown tables and BENCHMARKS.md's generated sections).
"""
