"""The stages, in the order data flows through them.

Each module exposes the same plain functions (no base class); the runner owns skipping, fingerprints, atomic
outputs and state, so a stage only computes:

    NAME: str                      the stage's name on the command line and in state/
    RESUMABLE: bool                keep `<output>.partial/` from a killed run (train checkpoints) instead of wiping it
    WRITE_ONCE: bool               an existing output is never replaced (the archive); `run` must refuse a conflict
    items(recipe) -> list[str]     what the stage produces, e.g. one item per fine-tune; [""] for a single output
    output_path(recipe, item) -> Path
    config(recipe, item) -> dict   everything that changes the output: the stage's settings and the identity of
                                   inputs that no stage produced (dataset file content, model fingerprints)
    depends_on(recipe, item) -> list[tuple[str, str]]   (stage, item) pairs whose outputs this item reads
    check(recipe, item) -> None    cheap validation before anything runs (no model loading, no downloads);
                                   raises RecipeError
    run(recipe, item, out, inputs) -> dict
                                   write the output into `out` (an empty or resumable temporary directory that the
                                   runner renames into place); `inputs` maps each depends_on pair to its output
                                   path; returns a JSON-able summary kept in the state file
"""

from pipeline.stages import apply, archive, evaluate, merge, prepare, publish, train

STAGES = {module.NAME: module for module in (prepare, train, archive, apply, merge, evaluate, publish)}
