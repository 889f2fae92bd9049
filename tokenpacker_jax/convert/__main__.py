"""``python -m tokenpacker_jax.convert import|export ...`` (see ``conversion.py``)."""

from tokenpacker_jax import user_error
from tokenpacker_jax.conversion import main

if __name__ == "__main__":
    user_error.run_argparse(main, "tokenpacker_jax.convert")
