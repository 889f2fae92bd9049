"""Table 6: the paper's projector comparison (its Table 3) in miniature, on the synthetic
fine-detail task.

Every projector trains the tiny model (``configs/tiny.py``: stage 1 on captions, then stage 2
on questions, as ``quickstart`` does) at the same token budgets, 4x and 9x fewer tokens than
the 6 x 6 patch grid (9 and 4 tokens: scale 2 and 3), beside the LLaVA-1.5 MLP at all
36; ``seeds`` runs each (the seed sets initialisation and data order; the data set is the
same). Each run answers every held-out question (``data/synthetic.py``'s test split, greedy,
exact match, as ``quickstart`` scores it); the table gives the accuracy's mean and spread
per projector and per question category.

Each run is the main job, ``tokenpacker_jax.recipe.run``, with the entry's projector; steps
and data sizes default to the main job's (``--stage0_steps``, ``--stage1_steps``,
``--stage2_steps``, ``--num``, ``--num_eval``, ``--jitter``), so the comparison follows the
recipe when it is retuned. Runs go seed by seed (every entry's seed 0, then seed 1, ...) and
resume: a finished run's ``result.json`` is kept and read back, an unfinished one continues
from its checkpoints (``train.run``); so an interrupted table keeps its whole seeds.

    python -m tokenpacker_jax.bench paper [--seeds 3] [--stage0_steps N] [--stage1_steps N]
        [--stage2_steps N] [--num N] [--num_eval N] [--jitter PX] [--projectors a,b]
        [--budgets 2,3] [--workdir DIR]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

import ml_collections

from tokenpacker_jax import recipe
from tokenpacker_jax.bench import hardware, report
from tokenpacker_jax.data import synthetic
from tokenpacker_jax.models.projectors import num_output_tokens

PACKING = ("tokenpacker", "avgpool", "pixel_shuffle", "resampler", "c_abstractor", "ldpv2")
PROJECTORS = ("mlp2x_gelu", *PACKING)  # the MLP keeps all patches (scale 1)
BUDGETS = (2, 3)  # scale factors: 9 and 4 tokens on the 6 x 6 grid
BASELINES = ("avgpool", "pixel_shuffle", "resampler")  # the paper's claim to check
EVAL_BATCH = 50


@dataclasses.dataclass(frozen=True)
class Entry:
    """One cell of the comparison: a projector at a scale factor (1: all patches)."""

    projector: str
    scale: int

    @property
    def name(self) -> str:
        return f"{self.projector}_s{self.scale}"


def entries(projectors: Sequence[str] = PROJECTORS, budgets: Sequence[int] = BUDGETS
            ) -> list[Entry]:
    """The MLP at all patches (if among ``projectors``), then every other projector at every
    budget."""
    out = [Entry("mlp2x_gelu", 1)] if "mlp2x_gelu" in projectors else []
    return out + [Entry(p, s) for s in budgets for p in projectors if p != "mlp2x_gelu"]


def entry_adjust(entry: Entry, adjust: recipe.Adjust | None = None) -> recipe.Adjust:
    """Edits a stage config of the recipe to the entry's projector, then applies
    ``adjust``."""

    def edit(config: ml_collections.ConfigDict) -> None:
        grid = config.model.vision.image_size // config.model.vision.patch_size
        recipe_tokens = num_output_tokens(config.model.projector, grid)
        config.model.projector.name = entry.projector
        config.model.projector.scale_factor = entry.scale
        # The recipe's max_length fits its longest conversation with its own visual tokens;
        # a projector that keeps more (the MLP: all 36) gets the difference, so that no
        # answer is cut off its conversations.
        config.data.max_length += max(0, num_output_tokens(config.model.projector, grid)
                                      - recipe_tokens)
        if adjust is not None:
            adjust(config)

    return edit


def train_and_score(entry: Entry, seed: int, *, data: str, workdir: str,
                    sizes: recipe.Recipe, data_seed: int = 0,
                    adjust: recipe.Adjust | None = None, log=print) -> dict[str, Any]:
    """Trains one run of the recipe with the entry's projector and scores it on the
    held-out questions; the result is kept in ``workdir/ENTRY_seedN_RECIPE/result.json``
    (RECIPE: a hash of the stage configs) and read back when the run is asked again."""
    edit = entry_adjust(entry, adjust)
    configs = recipe.stage_configs(data, sizes, seed, edit)
    # The run directory is named by what was trained, so a retuned recipe starts afresh.
    stage0 = f"stage0:{sizes.stage0_steps},{sizes.stage0_images}"
    digest = hashlib.sha256((stage0 + "".join(c.to_json() for _, c in configs)).encode()
                            ).hexdigest()
    run_dir = os.path.join(workdir, f"{entry.name}_seed{seed}_{digest[:10]}")
    result_path = os.path.join(run_dir, "result.json")
    if os.path.exists(result_path):
        with open(result_path, encoding="utf-8") as file:
            return json.load(file)
    outcome = recipe.run(data, run_dir, recipe=sizes, seed=seed, data_seed=data_seed,
                         adjust=edit,
                         log=lambda _: None)
    model = configs[-1][1].model
    scores = outcome.scores
    result = {
        "projector": entry.projector, "scale": entry.scale, "seed": seed,
        "tokens": num_output_tokens(model.projector,
                                    model.vision.image_size // model.vision.patch_size),
        "accuracy": scores["all"]["accuracy"], "n": scores["all"]["n"],
        "categories": {k: v["accuracy"] for k, v in scores.items() if k != "all"},
        "train_loss": outcome.summaries[max(outcome.summaries)].get("train/loss"),
        "run_dir": run_dir}
    with open(result_path, "w", encoding="utf-8") as file:
        json.dump(result, file, indent=1)
    log(f"{entry.name} seed {seed}: held-out accuracy {result['accuracy']:.3f}")
    return result


@dataclasses.dataclass(frozen=True)
class Summary:
    """Accuracy over the seeds of one entry."""

    projector: str
    tokens: int
    accuracies: tuple[float, ...]
    categories: dict[str, float]  # mean per question category

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def summarise(results: Sequence[dict[str, Any]]) -> list[Summary]:
    """Per (projector, tokens), in first-seen order: accuracies and category means."""
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for result in results:
        grouped.setdefault((result["projector"], result["tokens"]), []).append(result)
    out = []
    for (projector, tokens), runs in grouped.items():
        categories = sorted({c for r in runs for c in r["categories"]})
        out.append(Summary(
            projector, tokens, tuple(r["accuracy"] for r in runs),
            {c: statistics.fmean(r["categories"][c] for r in runs if c in r["categories"])
             for c in categories}))
    return out


def comparisons(summaries: Sequence[Summary]) -> list[str]:
    """TokenPacker against the paper's baselines at each budget, in words."""
    lines = []
    by_key = {(s.projector, s.tokens): s for s in summaries}
    for tokens in sorted({s.tokens for s in summaries if s.projector == "tokenpacker"},
                         reverse=True):
        ours = by_key[("tokenpacker", tokens)]
        for name in BASELINES:
            other = by_key.get((name, tokens))
            if other is None:
                continue
            difference = ours.mean - other.mean
            apart = (min(ours.accuracies) > max(other.accuracies)
                     or max(ours.accuracies) < min(other.accuracies))
            word = (f"higher by {difference:.3f}" if difference > 0 else
                    f"lower by {-difference:.3f}" if difference < 0 else "equal")
            lines.append(
                f"- {tokens} tokens: TokenPacker {ours.mean:.3f} vs {name} {other.mean:.3f}: "
                f"{word}; the seeds' ranges {'do not overlap' if apart else 'overlap'}")
    return lines


def markdown(summaries: Sequence[Summary]) -> str:
    """The table: accuracy mean ± standard deviation over seeds, range, per category."""
    categories = [c for c in synthetic.CATEGORIES
                  if any(c in s.categories for s in summaries)]
    chance = {c: 1 / len(synthetic.ANSWERS[c]) for c in categories}
    rows = [[s.projector, s.tokens, len(s.accuracies), f"{s.mean:.3f} ± {s.std:.3f}",
             f"{min(s.accuracies):.3f}-{max(s.accuracies):.3f}",
             *[f"{s.categories[c]:.3f}" if c in s.categories else "-" for c in categories]]
            for s in summaries]
    rows.append(["(chance)", "", "", "", "", *[f"{chance[c]:.3f}" for c in categories]])
    return report.markdown_table(
        ["projector", "tokens", "seeds", "accuracy (mean ± std)", "range",
         *categories], rows)


def run(*, workdir: str = "/tmp/tokenpacker_bench_paper", seeds: int = 3,
        projectors: Sequence[str] = PROJECTORS, budgets: Sequence[int] = BUDGETS,
        stage0_steps: int | None = None, stage1_steps: int | None = None,
        stage2_steps: int | None = None, num: int | None = None,
        num_eval: int | None = None, jitter: int | None = None,
        data_seed: int = 0, adjust: recipe.Adjust | None = None,
        log=print) -> report.Section:
    """Trains and scores every (entry, seed); returns the BENCHMARKS.md section. ``None``
    sizes take the main job's (``recipe.Recipe``); ``jitter``: px items may sit off their
    cells' centres (-1: anywhere, as quickstart's flag); ``adjust`` edits each stage's
    config (tests)."""
    sizes = recipe.Recipe(eval_batch=EVAL_BATCH).replace(
        num=num, num_eval=num_eval, stage0_steps=stage0_steps, stage1_steps=stage1_steps,
        stage2_steps=stage2_steps, jitter=jitter)
    num, num_eval, jitter = sizes.num, sizes.num_eval, sizes.jitter
    stage0_steps = sizes.stage0_steps
    stage1_steps, stage2_steps = sizes.stage1_steps, sizes.stage2_steps
    header = hardware.machine()
    data = os.path.join(workdir, f"data_{num}_{num_eval}_seed{data_seed}_jitter{jitter}")
    recipe.make_data(data, sizes, data_seed, adjust)
    results = [train_and_score(entry, seed, data=data, workdir=workdir, sizes=sizes,
                               data_seed=data_seed, adjust=adjust, log=log)
               for seed in range(seeds) for entry in entries(projectors, budgets)]
    summaries = summarise(results)
    questions = results[0]["n"]
    vision = recipe.stage_config(2, data, sizes, 0, adjust).model.vision
    grid = vision.image_size // vision.patch_size
    placement = ("items anywhere in their cells" if jitter < 0 else
                 "items centred in their cells" if jitter == 0 else
                 f"items up to {jitter} px off their cells' centres")
    budget_text = ", ".join(f"{(grid // s) ** 2} tokens ({s * s}x fewer)" for s in budgets)
    body = "\n".join([
        "`python -m tokenpacker_jax.bench paper` "
        f"(`--seeds={seeds} --stage0_steps={stage0_steps} --stage1_steps={stage1_steps} "
        f"--stage2_steps={stage2_steps} "
        f"--num={num} --num_eval={num_eval} --jitter={jitter}`). Machine: {header}.",
        "",
        f"`configs/tiny.py` ({vision.image_size} px, {grid} x {grid} patches; the MLP keeps "
        f"all {grid * grid}, the others pack them to {budget_text}), stage 0 "
        f"({stage0_steps} steps, the tower; 0: none, stage 2 trains it), stage 1 "
        f"({stage1_steps} steps, captions) then stage 2 ({stage2_steps} steps, questions), "
        f"as `quickstart` trains; {num} training images ({placement}); held-out accuracy "
        f"(exact match, greedy) on the {questions} questions about {num_eval} test images; "
        f"{seeds} seed(s) per row (initialisation and data order; same data). Mean ± "
        "sample standard deviation over seeds; per category: the mean.",
        "",
        markdown(summaries),
        "",
        "TokenPacker against average pooling, pixel-shuffle and the resampler at equal "
        "tokens (the paper's claim):",
        *(comparisons(summaries) or ["- (not measured: a projector is missing)"]),
    ])
    return report.Section("paper", "The paper's projector table in miniature", body)
