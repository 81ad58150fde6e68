"""Label import (``import_labels``) and which stored label training uses (``build_training_set``)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from xrdmatch.platform.labels import LabelInputError, LabelRecord, add_label, import_labels, list_labels


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'store.db'}"


def _labels(url: str) -> dict[str, int]:
    return {lab.structure_id: lab.label for lab in list_labels(url)}


def test_one_structure_twice_in_a_file_with_opposite_labels_is_refused_naming_both_rows(url, tmp_path):
    f = tmp_path / "dup.csv"
    f.write_text("structure_id,formula,label\nicsd-0,Li2S,0\nx-1,Li3N,1\nx-1,Li3N,0\n")
    with pytest.raises(LabelInputError, match=r"rows 3 and 4: structure x-1 .*label 1 vs 0"):
        import_labels(url, f)
    assert list_labels(url) == []  # nothing of that file
    f.write_text("structure_id,formula,label\nx-1,Li3N,1\nx-1,Li3N,1\n")  # the same row twice: one label
    assert import_labels(url, f) == (1, 0, 0) and _labels(url) == {"x-1": 1}


@pytest.mark.parametrize("label, sigma", [("0", "1.2e-2"), ("1", "1e-7")])
def test_a_label_contradicting_its_own_sigma_is_refused(url, tmp_path, label, sigma):
    """The paper's convention (0 = superionic) in a measured-conductivity file is caught."""
    f = tmp_path / "exp.csv"
    f.write_text(f"structure_id,formula,label,sigma_300\nicsd-1,Li3N,1,1e-3\nicsd-9,Li10GeP2S12,{label},{sigma}\n")
    with pytest.raises(LabelInputError, match=rf"row 3 \(icsd-9\): label {label} contradicts sigma_300 .*threshold 5e-05"):
        import_labels(url, f)
    assert list_labels(url) == []
    f.write_text("structure_id,formula,label,sigma_300\nicsd-9,Li10GeP2S12,1,1.2e-2\nicsd-8,LiCl,0,1e-9\n")
    assert import_labels(url, f) == (2, 0, 0) and _labels(url) == {"icsd-9": 1, "icsd-8": 0}


def test_reimporting_a_corrected_file_fails_naming_the_row_unless_replace(url, tmp_path):
    f = tmp_path / "exp.csv"
    f.write_text("structure_id,formula,label\nicsd-1,Li10GeP2S12,0\nicsd-2,Li3N,1\n")  # icsd-1 inverted
    assert import_labels(url, f) == (2, 0, 0)
    f.write_text("structure_id,formula,label\nicsd-1,Li10GeP2S12,1\nicsd-2,Li3N,1\nicsd-3,LiCl,0\n")
    with pytest.raises(LabelInputError, match=r"row 2 \(icsd-1, experiment\): label 0 vs 1 .*replace=True"):
        import_labels(url, f)
    assert _labels(url) == {"icsd-1": 0, "icsd-2": 1}  # nothing of the corrected file yet
    got = import_labels(url, f, replace=True)
    assert got == (1, 1, 1) and "replaced=1" in repr(got)
    assert _labels(url) == {"icsd-1": 1, "icsd-2": 1, "icsd-3": 0} and len(list_labels(url)) == 3
    got = import_labels(url, f)  # an identical re-import changes nothing
    assert got == (0, 3, 0)
    # labels of other sources for the same structure are not the import's to replace
    add_label(url, LabelRecord("icsd-1", "Li10GeP2S12", "mlip-md", 0, "proto"))
    f.write_text("structure_id,formula,label\nicsd-1,Li10GeP2S12,1\n")
    assert import_labels(url, f) == (0, 1, 0)
    assert sorted((lab.method, lab.label) for lab in list_labels(url) if lab.structure_id == "icsd-1") == [
        ("experiment", 1), ("mlip-md", 0)]


@pytest.mark.parametrize("row, why", [
    ("x-3,,1", r"row 2 \(x-3\): empty formula"),
    ("x-3,li3n,1", r"row 2 \(x-3\): formula 'li3n' is not a chemical formula"),
    ("x-3,LiZz2,1", r"row 2 \(x-3\): formula 'LiZz2' is not a chemical formula \(Zz0\+: not an element\)"),
    ("x-3", "row 2: fewer fields than the header's 3"),
    ("x-3,Li3N,1,extra", "row 2: more fields than the header's 3"),
])
def test_a_row_without_a_usable_formula_is_refused(url, tmp_path, row, why):
    """Candidate selection skips compositions already labelled by this formula."""
    f = tmp_path / "exp.csv"
    f.write_text(f"structure_id,formula,label\n{row}\n")
    with pytest.raises(LabelInputError, match=why):
        import_labels(url, f)
    assert list_labels(url) == []


def test_one_structure_with_both_labels_from_two_methods_in_a_file_is_refused(url, tmp_path):
    # which one training used would hang on the row order: import them separately instead
    f = tmp_path / "two.csv"
    f.write_text("structure_id,formula,label,method\nmp-1,Li3PS4,1,experiment\nmp-2,LiCl,0,aimd\n"
                 "mp-1,Li3PS4,0,aimd\nmp-2,LiCl,0,experiment\n")
    with pytest.raises(LabelInputError, match=r"rows 2 and 4: structure mp-1 labelled 1 \(experiment\) and 0 \(aimd\)"):
        import_labels(url, f)
    assert list_labels(url) == []
    f.write_text("structure_id,formula,label,method\nmp-2,LiCl,0,aimd\nmp-2,LiCl,0,experiment\n")
    assert import_labels(url, f) == (2, 0, 0)  # agreeing sources: both kept, with their provenance


def test_a_file_that_is_not_utf8_is_refused_naming_it_and_a_bom_is_read(url, tmp_path):
    f = tmp_path / "latin1.csv"
    f.write_bytes("structure_id,formula,label,note\nmp-1,Li3PS4,1,Universit\u00e9\n".encode("latin-1"))
    with pytest.raises(LabelInputError, match=r"latin1\.csv: line 2 is not UTF-8 text \(byte b'\\xe9'\)"):
        import_labels(url, f)
    f = tmp_path / "excel.csv"  # spreadsheets write a byte-order mark before the first column name
    f.write_bytes("structure_id,formula,label\nmp-1,Li3PS4,1\n".encode("utf-8-sig"))
    assert import_labels(url, f) == (1, 0, 0) and _labels(url) == {"mp-1": 1}


def test_a_field_the_csv_module_cannot_read_is_refused_naming_the_file_and_line(url, tmp_path):
    """A field over the csv module's 131072-character limit was a _csv.Error traceback."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    f = tmp_path / "big.csv"
    f.write_text(f'structure_id,formula,label\nmp-1,Li3PS4,1\nmp-2,Li2O,"{"x" * 200_000}"\n')
    with pytest.raises(LabelInputError, match=r"big\.csv: line 3: field larger than field limit \(131072\)"):
        import_labels(url, f)
    assert list_labels(url) == []
    res = CliRunner().invoke(app, ["labels", "import", str(f), "--dir", str(tmp_path / "run")])
    assert res.exit_code == 2 and res.output.startswith(f"error: {f}: line 3: field larger") and "Traceback" not in res.output, res.output


def test_a_replaced_label_is_the_newest(tmp_path):
    """A corrected measurement imported with replace=True is newer than a label stored in between,
    so it is the one training uses."""
    from xrdmatch.config import load_config
    from xrdmatch.platform.db import store_url
    from xrdmatch.platform.patterns import PatternTable
    from xrdmatch.training.dataset import build_training_set

    cfg = load_config(overrides={"run_dir": str(tmp_path)})
    url = store_url(cfg)
    f = tmp_path / "exp.csv"
    f.write_text("structure_id,formula,label\nx-1,Li3PS4,1\n")
    import_labels(url, f)
    add_label(url, LabelRecord("x-1", "Li3PS4", "aimd", 1, "proto"))
    f.write_text("structure_id,formula,label,sigma_300\nx-1,Li3PS4,0,1e-7\n")
    assert import_labels(url, f, replace=True) == (0, 0, 1)
    assert [lab.method for lab in list_labels(url)] == ["aimd", "experiment"]
    ls, _ = build_training_set(cfg, PatternTable(ids=["x-1"], formulas=["Li3PS4"], X=np.ones((1, 4501), np.float32)))
    i = ls.ids.index("x-1")
    assert (ls.sources[i], int(ls.y[i])) == ("experiment", 0)


def test_an_excluded_newest_label_does_not_hide_an_older_weighted_one(tmp_path):
    from xrdmatch.config import load_config
    from xrdmatch.platform.db import store_url
    from xrdmatch.platform.patterns import PatternTable
    from xrdmatch.training.dataset import build_training_set

    cfg = load_config(overrides={"run_dir": str(tmp_path), "labels": {"source_weights": {
        "paper": 1.0, "mlip-md": 0.5, "experiment": 0.0, "aimd": 1.0}}})
    url = store_url(cfg)
    add_label(url, LabelRecord("mp-1", "Li3N", "mlip-md", 1, "proto"))
    add_label(url, LabelRecord("mp-1", "Li3N", "experiment", 0, "import:experiment"))  # newest, weight 0
    add_label(url, LabelRecord("mp-2", "LiCl", "aimd", 1, "proto"))
    add_label(url, LabelRecord("mp-2", "LiCl", "mlip-md", 0, "proto-2"))  # newest, weighted: it counts
    pt = PatternTable(ids=["mp-1", "mp-2"], formulas=["Li3N", "LiCl"], X=np.eye(2, 4501, dtype=np.float32))
    ls, w = build_training_set(cfg, pt)
    got = {sid: (src, int(y), float(wt)) for sid, src, y, wt in zip(ls.ids, ls.sources, ls.y, w) if sid.startswith("mp-")}
    assert got == {"mp-1": ("mlip-md", 1, 0.5), "mp-2": ("mlip-md", 0, 0.5)}


def test_a_labelled_composition_is_not_a_candidate_again(tmp_path):
    """``labelled_groups`` holds the reduced formula of every stored label (imported or from MD),
    next to the paper's, and candidate selection skips every structure of those compositions."""
    import pandas as pd

    from xrdmatch.actors.screening import ScreeningResult, write_scores
    from xrdmatch.config import load_config
    from xrdmatch.platform.campaign import Context, labelled_groups, stage_select
    from xrdmatch.platform.campaign_store import CampaignStore
    from xrdmatch.platform.data import load_labelled
    from xrdmatch.platform.paths import RunPaths
    from xrdmatch.platform.patterns import PatternTable

    cfg = load_config(None, {"run_dir": str(tmp_path / "run"), "campaign": {"candidates_per_round": 2}})
    paths = RunPaths.of(cfg.run_dir)
    url = paths.store_url
    paper = set(load_labelled(cfg.labels.path).groups)
    assert {"Li7Pt", "Li9Ir", "Li5Au"}.isdisjoint(paper)  # only the store can label these
    assert labelled_groups(cfg, url) == paper

    store = CampaignStore(url, "c1")
    store.ensure_campaign(str(paths.root), cfg.model_dump(mode="json"))
    store.ensure_round(1)
    ctx = Context(cfg, paths, store, url, echo=lambda s: None, progress=False)
    # pt-a and pt-b: two polymorphs of one composition; llto: the paper's La0.5Li0.5TiO3 as the
    # database writes it (LiLaTi2O6), labelled already although the two reduced formulas differ
    ids = ["pt-a", "pt-b", "llto", "ir", "au"]
    groups = ["Li7Pt", "Li7Pt", "LiLaTi2O6", "Li9Ir", "Li5Au"]
    assert "Li0.5La0.5Ti1O3" in paper and "LiLaTi2O6" not in paper
    ctx._patterns = PatternTable(ids=ids, formulas=groups, X=np.eye(len(ids), 4501, dtype=np.float32))
    ctx._meta = pd.DataFrame({"group": groups, "elements": ["Li Pt", "Li Pt", "La Li O Ti", "Ir Li", "Au Li"],
                              "n_sites": 4, "n_li": 2.0, "a": 10.0, "b": 10.0, "c": 10.0}, index=ids)
    write_scores(ctx.scores_path(1), ids, groups, ScreeningResult(p_mean=np.asarray([0.99, 0.98, 0.95, 0.9, 0.8]),
                                                                  p_std=np.zeros(5), votes=np.ones(5)))
    before, _ = stage_select(ctx, 1)
    assert before["picks"] == ["pt-a", "ir"] and before["n_eligible"] == 4  # nothing labelled yet but llto

    f = tmp_path / "exp.csv"
    f.write_text("structure_id,formula,label\nicsd-pt,Li14Pt2,0\n")  # not reduced, as a file may have it
    assert import_labels(url, f) == (1, 0, 0)
    add_label(url, LabelRecord("mp-ir", "Ir2Li18", "mlip-md", 1, "proto"))  # a label from MD, elements unordered
    got = labelled_groups(cfg, url)
    assert got - paper == {"Li7Pt", "Li9Ir"}  # the reduced formulas, not Li14Pt2 / Ir2Li18
    after, _ = stage_select(ctx, 1)
    assert after["picks"] == ["au"]  # neither Li7Pt polymorph (another id than the label's) nor Li9Ir
    assert after["n_eligible"] == 1 and after["n_labelled_groups"] == len(paper) + 2


def test_labels_cli_imports_with_the_configs_threshold_once_and_lists_them(tmp_path):
    """`xrdmatch labels import`: the config's sigma_threshold labels sigma-only rows, a rerun adds
    nothing, a contradicting file is refused naming the row and leaves the store as it was."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app
    from xrdmatch.platform.labels import list_labels

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "validation": {"sigma_threshold": 1e-3}}))
    good = tmp_path / "measured.csv"
    good.write_text("structure_id,formula,sigma_300\nx-1,Li3PS4,5e-4\nx-2,Li7P3S11,2e-3\n")
    run = CliRunner()
    res = run.invoke(app, ["labels", "import", str(good), "-c", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "2 added, 0 already stored, 0 replaced" in res.output
    url = f"sqlite:///{tmp_path / 'run' / 'store.db'}"
    got = {lab.structure_id: (lab.label, lab.method) for lab in list_labels(url)}
    # 5e-4 S/cm is superionic under the built-in 5e-5 but not under this config's 1e-3
    assert got == {"x-1": (0, "experiment"), "x-2": (1, "experiment")}
    res = run.invoke(app, ["labels", "import", str(good), "-c", str(cfg)])
    assert res.exit_code == 0 and "0 added, 2 already stored" in res.output, res.output

    bad = tmp_path / "bad.csv"
    bad.write_text("structure_id,formula,label,sigma_300\nx-3,Li2S,0,1e-4\nx-4,Li3N,1,1e-4\n")
    res = run.invoke(app, ["labels", "import", str(bad), "-c", str(cfg)])
    assert res.exit_code == 2
    assert "row 3 (x-4)" in res.output and "contradicts sigma_300" in res.output
    assert len(list_labels(url)) == 2  # nothing of the bad file was stored

    res = run.invoke(app, ["labels", "list", "-c", str(cfg)])
    assert res.exit_code == 0, res.output
    rows = [line.split("\t") for line in res.stdout.splitlines()[1:]]
    assert [(r[0], r[1], r[3]) for r in rows] == [("x-1", "Li3PS4", "0"), ("x-2", "Li7P3S11", "1")]


def test_labels_cli_says_an_unreachable_store_and_a_misspelt_method_in_one_line(tmp_path):
    """An unreachable store.url, or one whose driver is not installed, is one line naming it
    (password masked), exit 1, not a traceback;
    a misspelt --method is exit 2 listing the methods, not "0 labels"."""
    pytest.importorskip("psycopg")
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"),
                                   "store": {"url": "postgresql://u:s3cret@127.0.0.1:1/db"}}))  # nothing listens
    good = tmp_path / "measured.csv"
    good.write_text("structure_id,formula,label\nx-1,Li3PS4,1\n")
    run = CliRunner()
    for args in (["labels", "list"], ["labels", "import", str(good)], ["validate", "work"],
                 ["campaign", "run", "--no-progress"]):
        res = run.invoke(app, [*args, "-c", str(cfg)])
        assert res.exit_code == 1, res.output
        assert res.output.startswith("error: store postgresql://u:***@127.0.0.1:1/db: "), res.output
        assert len(res.output.strip().splitlines()) == 1 and "s3cret" not in res.output

    # a store whose database driver is not installed here (MySQL's default, MySQLdb): one line too
    import importlib.util

    if importlib.util.find_spec("MySQLdb") is None:
        cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"),
                                       "store": {"url": "mysql://u:s3cret@127.0.0.1:1/db"}}))
        for args in (["labels", "list"], ["validate", "work"], ["campaign", "run", "--no-progress"]):
            res = run.invoke(app, [*args, "-c", str(cfg)])
            assert res.exit_code == 1, res.output
            assert res.output.startswith("error: store mysql://u:***@127.0.0.1:1/db: the database driver of 'mysql' "
                                         "is not installed (No module named 'MySQLdb')"), res.output
            assert len(res.output.strip().splitlines()) == 1 and "s3cret" not in res.output

    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run")}))
    assert run.invoke(app, ["labels", "import", str(good), "-c", str(cfg)]).exit_code == 0
    res = run.invoke(app, ["labels", "list", "-c", str(cfg), "--method", "experiment", "--method", "experimnt"])
    assert res.exit_code == 2, res.output
    assert "--method 'experimnt': not one of mlip-md, aimd, experiment, paper, imported" in res.output
    res = run.invoke(app, ["labels", "list", "-c", str(cfg), "--method", "experiment"])
    assert res.exit_code == 0 and "x-1\tLi3PS4\texperiment\t1" in res.output, res.output


def test_a_label_of_a_structure_outside_the_database_trains_on_its_stored_structure(tmp_path, caplog):
    """`validate submit my.cif` labels a structure the XRD stage never saw: its pattern comes from
    the structure stored with the label; an imported label with neither is skipped, named."""
    from xrdmatch.config import load_config
    from xrdmatch.platform.db import store_url
    from xrdmatch.platform.patterns import PatternTable
    from xrdmatch.simulation.xrd import xrd_pattern_arrays
    from xrdmatch.training.dataset import build_training_set

    li3n = {"id": "my_li3n", "formula": "Li3N", "lattice": [[3.65, 0.0, 0.0], [-1.825, 3.161, 0.0], [0.0, 0.0, 3.87]],
            "species": ["Li", "Li", "Li", "N"], "frac_coords": [[0, 0, 0.5], [1 / 3, 2 / 3, 0], [2 / 3, 1 / 3, 0], [0, 0, 0]]}
    cfg = load_config(overrides={"run_dir": str(tmp_path)})
    url = store_url(cfg)
    add_label(url, LabelRecord("my_li3n", "Li3N", "mlip-md", 1, "proto", record=li3n))
    add_label(url, LabelRecord("lab-7", "Li3PS4", "experiment", 0, "import:experiment"))
    empty = PatternTable(ids=[], formulas=[], X=np.zeros((0, 4501), np.float32))
    with caplog.at_level("WARNING"):
        ls, w = build_training_set(cfg, empty)
    assert ls.ids[112:] == ["my_li3n"] and ls.groups[-1] == "Li3N" and int(ls.y[-1]) == 1
    np.testing.assert_array_equal(ls.X[-1], xrd_pattern_arrays(li3n["lattice"], li3n["species"], li3n["frac_coords"]))
    assert "lab-7" in caplog.text and "my_li3n" not in caplog.text


def test_labels_import_says_which_ids_training_will_skip(tmp_path, database_path):
    """An imported label carries no structure: an id that is neither a pattern of the database
    nor a labels-file compound is trained on never, and the import says so (once the run holds
    the database's patterns)."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app
    from xrdmatch.config import load_config
    from xrdmatch.platform.patterns import ensure_patterns

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "database": {"limit": 3},
                                   "ray": {"num_cpus": 1}, "xrd": {"workers": 1}}))
    f = tmp_path / "measured.csv"
    first = ensure_patterns(load_config(cfg), progress=False).ids[0]
    f.write_text(f"structure_id,formula,label\n{first},Li3N,1\nmp 1 typo,Li3N,0\nicsd1125,LiF,0\n")
    res = CliRunner().invoke(app, ["labels", "import", str(f), "-c", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "note: 1 imported id(s) are neither in the database's patterns" in res.output
    assert "e.g. mp 1 typo: training skips them" in res.output  # not the database's id, not the paper's icsd1125
