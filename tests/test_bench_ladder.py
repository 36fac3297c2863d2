"""The ladder benchmark's rows resolve to the configurations they name (no training: the configs only)."""

from pipelines.bench.ladder import ROWS, TEACHERS, config, parse


def _cfg(row: str, tmp_path):
    preset, family, objective, steps = ROWS[row]
    args = parse(["--out", str(tmp_path)])
    extra = {"teacher": "unused"} if preset == "fashion-mcd" else {}
    return config(preset, args, 400, 1, "unused" if family else None, steps, **objective, **extra)


def test_cd_ablation_rows_change_only_the_teacher_steps(tmp_path):
    base = _cfg("MCM CD S=4", tmp_path).objective
    ddim = _cfg("MCM CD S=4 (DDIM teacher steps)", tmp_path).objective
    fixed = _cfg("MCM CD S=4 (fixed N=256)", tmp_path).objective
    assert (base.teacher_sampler, ddim.teacher_sampler) == ("addim", "ddim")
    assert base.n_start < base.n_end
    # "fixed" means no annealing: N starts where the annealed row ends
    assert fixed.n_start == fixed.n_end == base.n_end
    assert ddim.model_dump(exclude={"teacher_sampler"}) == base.model_dump(exclude={"teacher_sampler"})
    assert fixed.model_dump(exclude={"n_start"}) == base.model_dump(exclude={"n_start"})


def test_every_row_samples_its_evaluated_step_counts_and_names_a_known_teacher(tmp_path):
    for row, (_, family, _, steps) in ROWS.items():
        cfg = _cfg(row, tmp_path)
        assert family is None or family in TEACHERS, row
        assert cfg.eval.steps == steps, row
        assert cfg.seed == 1 and cfg.engine.backend == "local", row
