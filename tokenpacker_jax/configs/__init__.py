"""The configs that ship with the package: ``common`` (the base every config starts from),
``tiny`` (the CPU model) and ``tokenpacker`` (the paper's variants).

The files under the repository's ``configs/`` folder, which ``--config=configs/tiny.py:...``
names on the command line, re-export these modules' ``get_config``.
"""
