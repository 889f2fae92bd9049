"""The reference's evaluation suite: each benchmark from its published files to its score
or submission file, computed as the reference computes it.

- ``suite``: the benchmarks by name; ``run`` (answer, then write) and ``score``.
- ``runner``: answering at scale (``Answerer``: batches over a mesh's data-parallel devices;
  ``answer_all``: hosts' shares, resumable part files, merging in question order).
- ``benchmark``: ``Question``, ``Layout`` and ``Benchmark``, what the suite is made of.
- One module per benchmark family, its prompt rules and scoring in its docstring: ``vqa``
  (VQAv2, VizWiz, TextVQA), ``gqa``, ``pope``, ``mme``, ``mmbench``, ``mmvet``, ``mmmu``,
  ``ocrbench``, ``docvqa``, ``scienceqa``; how VQA and MMMU answers are normalised, parsed and
  judged, one answer at a time: ``vqa_answers``, ``mmmu_answers``.
- ``question_file``: LLaVA question files; answering one in memory with exact-match
  scoring (the main job's held-out questions).
- ``files``: reading and writing, errors naming the file and line.
"""
