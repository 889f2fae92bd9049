"""Talking to a model: the decoding engine (``engine``), conversation prompts (``prompts``),
the terminal chat (``tokenpacker_jax.chat``) and the OpenAI-compatible server with its web
page (``tokenpacker_jax.serve``)."""
