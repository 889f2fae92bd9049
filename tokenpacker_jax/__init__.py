"""tokenpacker-jax: TokenPacker (arXiv 2407.02392) multimodal LLMs in JAX/Flax."""

__version__ = "0.1.0"
