"""``python -m tokenpacker_jax.convert import|export ...`` (see ``conversion.py``)."""

from tokenpacker_jax.conversion import main

if __name__ == "__main__":
    main()
