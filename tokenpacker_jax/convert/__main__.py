"""``python -m tokenpacker_jax.convert import|export ...`` (see ``convert/cli.py``)."""

from tokenpacker_jax.convert.cli import main

if __name__ == "__main__":
    main()
