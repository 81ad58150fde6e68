"""Shipped data loaders and config validation."""

from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest
import yaml

from xrdmatch import N_BINS
from xrdmatch.config import Config, ConfigError, load_config
from xrdmatch.platform.data import LabelledDataError, iter_structures, load_labelled


def test_labels_are_converted_to_one_is_superionic(labelled, labelled_csv):
    assert len(labelled) == 112
    assert labelled.X.shape == (112, N_BINS) and labelled.X.dtype == np.float32
    # The CSV says 0 = superionic; ours says 1 = superionic, and the cut is 5e-5 S/cm.
    with open(labelled_csv) as fh:
        raw = {r["name"]: int(r["label"]) for r in csv.DictReader(fh)}
    for i, y in zip(labelled.ids, labelled.y):
        assert y == 1 - raw[i]
    assert int(labelled.y.sum()) == 23
    sup = labelled.conductivity[labelled.y == 1]
    non = labelled.conductivity[labelled.y == 0]
    assert sup.min() >= 5e-5 > non.max()


def test_groups_merge_polymorphs(labelled):
    g = dict(zip(labelled.formulas, labelled.groups))
    assert g["Li3N"] == "Li3N"
    idx = [i for i, f in enumerate(labelled.groups) if f == "Li3N"]
    assert len(idx) == 2  # alpha and beta Li3N share one group
    assert len(set(labelled.groups)) < len(labelled)


def test_ids_are_read_as_text_not_numbers(tmp_path, labelled_csv):
    # numeric-looking ids keep their spelling: '01' and '1' are two compounds, '101' is not '101.0'
    def numeric_ids(rows):
        col = rows[0].index("name")
        for k, row in enumerate(rows[1:]):
            row[col] = f"{k + 100}"
        rows[1][col], rows[2][col] = "01", "1"

    ls = load_labelled(_write_bad(tmp_path, labelled_csv, numeric_ids))
    assert ls.ids[:3] == ["01", "1", "102"]


def test_store_labels_are_grouped_like_the_papers(tmp_path):
    # a store label named as the paper names polymorphs ('b_Li3N') joins the paper's Li3N group,
    # so grouped splits of the training set keep it on one side with them
    import numpy as np

    from xrdmatch.config import load_config
    from xrdmatch.platform.db import store_url
    from xrdmatch.platform.labels import LabelRecord, add_label
    from xrdmatch.training.dataset import build_training_set

    cfg = load_config(None, {"run_dir": str(tmp_path / "run")})
    add_label(store_url(cfg), LabelRecord("exp-1", "b_Li3N", "experiment", 1, "import:experiment"))

    class Patterns:
        ids, X = ["exp-1"], np.ones((1, 4501), np.float32)

    ls, _ = build_training_set(cfg, Patterns())
    assert ls.groups[ls.ids.index("exp-1")] == "Li3N"
    assert ls.groups.count("Li3N") == 3  # with alpha and beta Li3N of the paper's file


def _write_bad(tmp_path, labelled_csv, mutate):
    rows = list(csv.reader(open(labelled_csv)))
    mutate(rows)
    p = tmp_path / "bad.csv"
    with open(p, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return p


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda rows: rows[5].__setitem__(4, "2"), "row 6"),
        (lambda rows: rows[3].__setitem__(100, "nan"), "row 4"),
        (lambda rows: rows[7].__setitem__(2, rows[2][2]), "row 8"),
        (lambda rows: [r.pop() for r in rows], "4500"),
        (lambda rows: rows[9].__setitem__(300, "abc"), r"row 10 .*column v296: 'abc'"),
        (lambda rows: rows[2].__setitem__(200, "-0.5"), "row 3 .*negative"),
        (lambda rows: [rows[4].__setitem__(i, "0") for i in range(5, len(rows[4]))], "row 5 .*no peak"),
        (lambda rows: rows[0].__setitem__(slice(5, 7), ["v2", "v1"]), "column 1 is 'v2'"),
        (lambda rows: rows.__delitem__(slice(1, None)), "no rows"),
        (lambda rows: rows.clear(), "not a readable CSV"),
        (lambda rows: rows[6].append("1.0"), "row 7|not a readable CSV"),
        (lambda rows: rows[4].__setitem__(300, "1e39"), r"row 5 .*too large"),
        (lambda rows: rows[8].__setitem__(rows[0].index("formula_id"), "notaformula!!"),
         r"row 9 .*formula_id 'notaformula!!' is not a chemical formula"),
        (lambda rows: rows[8].__setitem__(rows[0].index("formula_id"), ""), r"row 9 .*formula_id nan"),
        (lambda rows: rows[3].__setitem__(rows[0].index("name"), ""), r"row 4: empty id"),
    ],
    ids=["label-outside-01", "nan", "duplicated-id", "wrong-length", "text", "negative", "all-zero",
         "columns-out-of-order", "header-only", "empty-file", "ragged-row", "over-float32", "bad-formula",
         "empty-formula", "empty-id"],
)
def test_bad_labelled_file_names_the_row(tmp_path, labelled_csv, mutate, message):
    p = _write_bad(tmp_path, labelled_csv, mutate)
    with pytest.raises(LabelledDataError, match=message):
        load_labelled(p)


def test_database_streams_structures(database_path):
    first = list(itertools.islice(iter_structures(database_path), 3))
    assert [sid for sid, _ in first][0].startswith("mp-")
    for _, s in first:
        assert "Li" in {el.symbol for el in s.composition.elements}


def test_configs_load_and_defaults_match(repo_root):
    for p in sorted((repo_root / "configs").glob("*.yaml")):
        load_config(p)
    assert load_config(repo_root / "configs" / "default.yaml").campaign.rounds == Config().campaign.rounds


def test_unknown_key_and_wrong_type_fail_naming_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  netwrok: fast\n")
    with pytest.raises(ConfigError, match="training.netwrok"):
        load_config(p)
    p.write_text("campaign:\n  rounds: many\n")
    with pytest.raises(ConfigError, match="campaign.rounds"):
        load_config(p)


def test_a_fit_needing_more_temperatures_than_the_protocol_runs_is_warned_of():
    with pytest.warns(UserWarning, match="min_fit_temperatures .3. exceeds the 2 temperatures: every verdict"):
        load_config(None, {"validation": {"temperatures": [800.0, 1000.0], "min_fit_temperatures": 3}})


@pytest.mark.parametrize("override, key", [
    ({"validation": {"temperatures": [-100.0, 800.0]}}, "validation.temperatures.0"),
    ({"labels": {"source_weights": {"paper": -1.0}}}, "labels.source_weights.paper"),
    ({"labels": {"source_weights": {"paper": 1.0, "mlip_md": 0.5}}}, "unknown label sources .'mlip_md'."),
    ({"campaign": {"required_elements": ["Li", "Xx"]}}, "campaign.required_elements"),
    # a misspelt promotion metric would never promote a version again; a probability of 7; an
    # empty shift range; a supercell rule that refuses every structure
    ({"tracking": {"promotion_metric": "grouped_cv_macro"}}, "tracking.promotion_metric"),
    ({"training": {"augment": {"w_move_prob": 7}}}, "training.augment.w_move_prob"),
    ({"training": {"augment": {"w_move_min": 300, "w_move_gap": 200}}}, "training.augment.*w_move_min"),
    ({"validation": {"min_atoms": 500, "max_atoms": 400}}, "validation.*min_atoms"),
    # the MD runs go up in T and stop at the first failure; two equal T fit an Ea of 0
    ({"validation": {"temperatures": [800.0, 800.0]}}, "validation.temperatures.*distinct and increasing"),
    ({"validation": {"temperatures": [1200.0, 600.0, 800.0]}}, "validation.temperatures.*increasing"),
    ({"evaluation": {"paper_pool": [-1, 74]}}, "evaluation.paper_pool.0"),
    ({"evaluation": {"paper_draw": [0, 0]}}, "evaluation.paper_draw.0"),
    ({"evaluation": {"methods": []}}, "evaluation.methods"),
    ({"training": {"augment": {"w_move_min": 5000, "w_move_gap": 6000}}}, "training.augment.w_move_min"),
    ({"campaign": {"eval_folds": 1}}, "campaign.eval_folds.*1 fold is no split"),
    ({"campaign": {"required_elements": ["Li", "U"]}}, r"campaign.*\['U'\] both required and forbidden"),
    # MLflow refuses these names at registration, after the whole training
    ({"tracking": {"registry_name": "bad/name:x"}}, "tracking.registry_name.*cannot contain '/' or ':'"),
    ({"tracking": {"registry_name": " "}}, "tracking.registry_name.*must not be empty"),
    # a store URL the first store-opening command would fail on with a traceback
    ({"store": {"url": "postgres:/typo"}}, "store.url.*'postgres:/typo' is not a SQLAlchemy URL"),
    ({"store": {"url": "postgres://u@db/x"}}, "store.url.*unknown database dialect 'postgres'"),
])
def test_nonsense_values_fail_naming_the_key(override, key):
    """Negative kelvin, a negative weight, a misspelt label source (which would silently drop
    that source from training) and a non-element are refused at load time."""
    with pytest.raises(ConfigError, match=key):
        load_config(None, override)


def test_malformed_config_files_fail_with_one_line_naming_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  network: fast\nxrd: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid YAML \(line 4"):
        load_config(p)
    p.write_bytes(b"training:\n  network: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: cannot be read as UTF-8"):
        load_config(p)


def test_env_references_expand_and_missing_ones_name_the_key(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    p.write_text("store:\n  url: ${XRDM_TEST_URL}\ntracking:\n  experiment: ${XRDM_UNSET:-fallback}\n")
    monkeypatch.setenv("XRDM_TEST_URL", "postgresql://u@127.0.0.1/db")
    cfg = load_config(p)
    assert cfg.store.url == "postgresql://u@127.0.0.1/db" and cfg.tracking.experiment == "fallback"
    monkeypatch.delenv("XRDM_TEST_URL")
    with pytest.raises(ConfigError, match="store.url"):
        load_config(p)
    # set but empty counts as unset (a blank store URL would silently become a per-node SQLite file)
    monkeypatch.setenv("XRDM_TEST_URL", "")
    monkeypatch.setenv("XRDM_UNSET", "")
    with pytest.raises(ConfigError, match="store.url: environment variable XRDM_TEST_URL is not set .or empty"):
        load_config(p)
    monkeypatch.setenv("XRDM_TEST_URL", "postgresql://u@127.0.0.1/db")
    assert load_config(p).tracking.experiment == "fallback"
    # ${VAR:?message} says the message; $$ is a literal $; forms it does not expand are errors,
    # never left half-expanded in the value
    p.write_text("tracking:\n  experiment: ${XRDM_UNSET:?set XRDM_UNSET to the experiment}\n")
    with pytest.raises(ConfigError, match="tracking.experiment: environment variable XRDM_UNSET is not set "
                                          ".or empty.: set XRDM_UNSET to the experiment"):
        load_config(p)
    p.write_text("tracking:\n  experiment: cost$$ ${XRDM_TEST_URL:-x}\n")
    assert load_config(p).tracking.experiment == "cost$ postgresql://u@127.0.0.1/db"
    for form in ("${XRDM_UNSET:-${HOME}/runs}", "${XRDM_UNSET-x}", "${XRDM_UNSET:-${XRDM_UNSET:-auto}}"):
        p.write_text(f"tracking:\n  experiment: {form}\n")
        with pytest.raises(ConfigError, match="tracking.experiment: .* form this loader does not expand"):
            load_config(p)


def test_store_url_is_checked_after_env_expansion_with_the_password_masked(tmp_path, monkeypatch):
    """The check sees the expanded URL (a URL from ${VAR} is the cluster's usual one), never prints
    its password, and an empty URL stays the default SQLite store in the run directory."""
    p = tmp_path / "c.yaml"
    p.write_text("store:\n  url: ${XRDM_TEST_URL}\n")
    monkeypatch.setenv("XRDM_TEST_URL", "postgresql://u:s3cret@db:5432/x")
    assert load_config(p).store.url == "postgresql://u:s3cret@db:5432/x"
    for bad in ("postgres://u:s3cret@db:5432/x", "postgres:/u:s3cret@db:5432/x", "postgresql//u:s3:cret@db/x"):
        monkeypatch.setenv("XRDM_TEST_URL", bad)
        with pytest.raises(ConfigError, match="store.url") as e:
            load_config(p)
        assert "s3" not in str(e.value) and "cret" not in str(e.value) and "@db" in str(e.value), str(e.value)
    p.write_text("store:\n  url: ''\n")
    assert load_config(p).store.url == ""


def test_yaml_floats_without_a_dot_are_floats_also_where_no_type_converts_them(tmp_path):
    # YAML 1.1 reads 1e-2 as a string; calculator_kwargs (any type) handed it to the calculator as one
    p = tmp_path / "c.yaml"
    p.write_text("validation:\n  calculator_kwargs: {epsilon: 1e-2, ediff: 1E-5, name: '1e-2'}\n"
                 "  sigma_threshold: 5e-5\n")
    v = load_config(p).validation
    assert v.calculator_kwargs == {"epsilon": 0.01, "ediff": 1e-5, "name": "1e-2"} and v.sigma_threshold == 5e-5


def test_a_password_in_a_url_is_masked_wherever_the_config_is_logged(tmp_path, monkeypatch):
    from xrdmatch.config import config_to_flat_params, redacted_dump

    monkeypatch.setenv("XRDMATCH_STORE_URL", "postgresql://xrdmatch:s3cret@postgres:5432/xrdmatch")
    cfg = load_config("configs/cluster.yaml")
    assert cfg.store.url.endswith(":s3cret@postgres:5432/xrdmatch")  # the code still connects with it
    params = config_to_flat_params(cfg)
    assert params["store.url"] == "postgresql://xrdmatch:***@postgres:5432/xrdmatch"
    assert "s3cret" not in str(params) and "s3cret" not in str(redacted_dump(cfg))
    # an empty user name, and a password given as a query parameter
    for url in ("postgresql://:s3cret@db:5432/x", "postgresql://db:5432/x?user=xrd&password=s3cret&sslmode=on"):
        monkeypatch.setenv("XRDMATCH_STORE_URL", url)
        shown = config_to_flat_params(load_config("configs/cluster.yaml"))["store.url"]
        assert "s3cret" not in shown and "***" in shown, shown
    # a space in the password, a query key that holds "pass"/"secret", a user name with an '@'
    for url, masked in (("postgresql://u:pa ss s3cret@db:5432/x", "postgresql://u:***@db:5432/x"),
                        ("postgresql://u@db/x?sslpassword=s3cret&sslmode=on", "postgresql://u@db/x?sslpassword=***&sslmode=on"),
                        ("postgresql://u@srv:s3cret@db/x?client_secret=s3cret", "postgresql://u@srv:***@db/x?client_secret=***")):
        monkeypatch.setenv("XRDMATCH_STORE_URL", url)
        cfg = load_config("configs/cluster.yaml")
        assert cfg.store.url == url and config_to_flat_params(cfg)["store.url"] == masked


def test_redact_masks_a_password_up_to_the_last_at_before_the_host():
    from xrdmatch.config import redact

    assert redact("error: tracking store postgresql://u:p@s3cret@db/x: failed") == \
        "error: tracking store postgresql://u:***@db/x: failed"
    assert redact("sftp://u:p@ss/w0rd@host:22/m and postgresql://v:x y@db/y") == \
        "sftp://u:***@host:22/m and postgresql://v:***@db/y"
    for plain in ("sqlite:////tmp/a@b/store.db", "http://127.0.0.1:5000", "postgresql://u@db:5432/x",
                  # a port is no password, whatever '@' follows on the line
                  "error: tracking store http://mlflow.internal:5000: failed; contact ops@example.com",
                  "cannot load http://127.0.0.1:5000/api for models:/xrdmatch-superionic@champion",
                  "x?passthrough=1&compass=2"):
        assert redact(plain) == plain
    assert redact("x?sslpassword=abc&pass=z&client_secret=q") == "x?sslpassword=***&pass=***&client_secret=***"


def test_a_raw_at_in_the_store_password_is_refused_without_showing_the_password(monkeypatch):
    for url in ("postgresql://u:p@s3cret@db:5432/x", "postgresql://u:p@s3:cret@db:5432/x"):
        monkeypatch.setenv("XRDMATCH_STORE_URL", url)
        with pytest.raises(ConfigError, match="store.url") as e:
            load_config("configs/cluster.yaml")
        assert "%40" in str(e.value) and "s3" not in str(e.value) and "cret" not in str(e.value), str(e.value)
    # a password redact would read as a port ('1234/...') is refused too, without showing it
    monkeypatch.setenv("XRDMATCH_STORE_URL", "postgresql://u:1234/s3cret@db:5432/x")
    with pytest.raises(ConfigError, match="percent-encode") as e:
        load_config("configs/cluster.yaml")
    assert "s3cret" not in str(e.value) and "1234" not in str(e.value), str(e.value)
    monkeypatch.setenv("XRDMATCH_STORE_URL", "postgresql://u:p%40s3cret@db:5432/x")  # encoded: accepted
    assert load_config("configs/cluster.yaml").store.url.endswith("p%40s3cret@db:5432/x")


def test_yaml_booleans_for_use_gpu_are_read_as_the_strings_the_readme_shows(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  use_gpu: true\n")
    assert load_config(p).training.use_gpu == "true"
    p.write_text("training:\n  use_gpu: false\n")
    assert load_config(p).training.use_gpu == "false"


def test_every_command_reads_the_same_default_config():
    """Without --config every sub-command reads configs/default.yaml: `xrdmatch xrd`, `evaluate`
    or `validate` on built-in defaults would use another cache key, protocol or run size than
    the campaign they are run beside."""
    import typer

    from xrdmatch.cli import app

    def walk(cmd, path=()):
        if hasattr(cmd, "commands"):  # a group
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + (name,))
        else:
            yield " ".join(path), cmd

    defaults = {}
    for name, cmd in walk(typer.main.get_command(app)):
        for p in cmd.params:
            if p.name == "config":
                defaults[name] = str(p.default)
    assert {"xrd", "train", "evaluate", "campaign run", "validate submit", "validate work", "screen"} <= set(defaults)
    assert set(defaults.values()) == {"configs/default.yaml"}, defaults


@pytest.mark.parametrize("command", [["models"], ["campaign", "status"], ["validate", "status"], ["evaluate"],
                                     ["screen"], ["train"], ["xrd"]])
def test_a_run_directory_that_is_a_file_fails_with_one_line(tmp_path, command):
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    afile = tmp_path / "notes.txt"
    afile.write_text("not a run directory")
    if command == ["xrd"]:  # no --dir: the config's run_dir, where its patterns cache goes
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"run_dir: {afile}\n")
        res = CliRunner().invoke(app, [*command, "--config", str(cfg), "--no-progress"])
    else:
        res = CliRunner().invoke(app, [*command, "--dir", str(afile)])
    assert res.exit_code == 2, res.output
    assert f"run directory {afile} is a file" in res.output and "Traceback" not in res.output
    assert afile.read_text() == "not a run directory"


@pytest.mark.parametrize("command", [["train", "--no-ray"], ["screen"], ["evaluate"], ["campaign", "run", "--no-progress"]])
@pytest.mark.parametrize("key", ["database", "labels"])
def test_a_missing_database_or_labels_file_is_one_line_naming_the_key(tmp_path, command, key):
    """A mistyped path fails before any work, naming the config key, not 20 frames deep."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    missing = tmp_path / "nowhere" / "db.jsonl"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), key: {"path": str(missing)}}))
    res = CliRunner().invoke(app, [*command, "--config", str(cfg)])
    if command == ["screen"] and key == "labels":  # screening reads no labels: it goes on (to the model)
        assert "labels.path" not in res.output and "cannot load model" in res.output, res.output
        return
    assert res.exit_code == 2, res.output
    assert f"error: {key}.path {missing}: not found" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run" / "patterns").exists()  # nothing was started


def test_train_on_data_it_cannot_use_says_why_in_one_line(tmp_path):
    """A database whose every entry fails gives no pattern (as `xrdmatch xrd` says), and source
    weights that exclude every label leave nothing to train on: one line each, exit 2, no model."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    for name, over, why in (
        ("garbage", {"database": {"path": str(bad)}}, "no pattern was computed: all 1 entries failed (see "),
        ("zero", {"database": {"limit": 5}, "labels": {"source_weights": {"paper": 0.0}}},
         "no labelled data left: labels.source_weights gives every label weight 0"),
    ):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / name), "ray": {"num_cpus": 1},
                                       "xrd": {"workers": 1}, **over}))
        res = CliRunner().invoke(app, ["train", "--no-ray", "--config", str(cfg)])
        assert res.exit_code == 2, res.output
        assert why in res.output and "Traceback" not in res.output, res.output
        assert not any((tmp_path / name / "models").glob("*/ensemble.json"))


@pytest.mark.parametrize("command", [["models"], ["labels", "list"], ["validate", "status"], ["validate", "requeue"]])
def test_a_missing_run_directory_fails_read_only_commands_creating_nothing(tmp_path, monkeypatch, command):
    """A mistyped --dir of a command that only reads: exit 2 naming it, not a new empty run
    directory (store.db, mlflow/) reported as "nothing there"."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    typo = tmp_path / "run_tpyo"
    res = CliRunner().invoke(app, [*command, "--dir", str(typo)])
    assert res.exit_code == 2, res.output
    assert f"run directory {typo} does not exist" in res.output and "Traceback" not in res.output
    assert not typo.exists()


def test_xrd_out_that_is_a_file_or_under_one_fails_with_one_line(tmp_path):
    """`xrd --out` is a folder of shards: a file there (or above it) is refused before any work."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    afile = tmp_path / "notes.txt"
    afile.write_text("not a folder")
    for out, why in ((afile, "is a file, not a directory"), (afile / "patterns", f"{afile} is a file")):
        res = CliRunner().invoke(app, ["xrd", "--out", str(out), "--limit", "2", "--no-progress"])
        assert res.exit_code == 2, res.output
        assert f"error: --out {out} " in res.output and why in res.output and "Traceback" not in res.output
    assert afile.read_text() == "not a folder"


@pytest.mark.parametrize("command", [["screen"], ["evaluate"], ["evaluate", "--markdown"], ["campaign", "report"],
                                     ["predict", "x.cif"]])
def test_an_out_that_is_one_of_the_runs_inputs_is_refused_before_any_work(tmp_path, monkeypatch, command):
    """`screen --out` naming the configured database replaced it with the scores Parquet. A result
    file that resolves (a relative path, a symlink) to the config, the database, the labels file or
    a SQLite file of the store or the MLflow store is refused with exit 2 before any work, naming
    it; every input is left as it was."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    db, labels, run = tmp_path / "db.jsonl", tmp_path / "labels.csv", tmp_path / "run"
    db.write_text('{"id": "x"}\n')
    labels.write_text("not a labels file\n")  # the old evaluate stopped here, not in hours of training
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(run), "database": {"path": str(db)},
                                   "labels": {"path": str(labels)}}))
    (tmp_path / "link.parquet").symlink_to(db)
    before = {p: p.read_bytes() for p in (db, labels, cfg)}
    option = "--markdown" if "--markdown" in command else "--out"
    cases = [("db.jsonl", f"is database.path ({db})"), ("link.parquet", f"is database.path ({db})"),
             (str(labels), f"is labels.path ({labels})"), ("c.yaml", f"is the config file ({cfg})"),
             (str(run / "store.db"), "is a file of the store"),
             ("run/mlflow/mlflow.db", "is a file of the MLflow store")]
    if command == ["campaign", "report"]:
        cases.append((str(run / "campaign.json"), "is the campaign's id file"))
    for out, what in cases:
        args = [c for c in command if c != "--markdown"]
        res = CliRunner().invoke(app, [*args, "--config", str(cfg), option, out])
        assert res.exit_code == 2, (out, res.output)
        assert f"error: {option} {out} {what}" in res.output and "give another file name" in res.output, res.output
        assert "Traceback" not in res.output
    assert {p: p.read_bytes() for p in before} == before


def test_evaluate_markdown_over_its_from_json_is_refused(tmp_path, monkeypatch):
    """`evaluate --from-json r.json --markdown r.json` replaced the result with its table."""
    import json

    from typer.testing import CliRunner

    from xrdmatch.cli import app

    monkeypatch.chdir(tmp_path)
    result = tmp_path / "r.json"
    result.write_text(json.dumps({"protocol": "paper", "results": [{"method": "xrd", "f1": 0.5}]}))
    before = result.read_bytes()
    res = CliRunner().invoke(app, ["evaluate", "--from-json", str(result), "--markdown", "./r.json"])
    assert res.exit_code == 2, res.output
    assert "--markdown r.json is the --from-json file" in res.output
    assert result.read_bytes() == before


def test_help_texts_are_reflowed_to_the_terminal_not_to_the_source_lines():
    """typer's rich help keeps every line break of a docstring, so an 80-column terminal wrapped
    each 96-character source line again: "... superionic),\\nerror. A bad input\\ngets a row".
    Paragraphs are joined; an indented or bulleted one keeps its lines."""
    from typer.testing import CliRunner

    from xrdmatch.cli import _reflow, app

    out = CliRunner().invoke(app, ["predict", "--help"], env={"COLUMNS": "80"}).stdout
    text = " ".join(line.strip() for line in out.splitlines() if line.strip() and not line.lstrip().startswith(("│", "╭", "╰")))
    assert "error. A bad input gets a row with `error` and no probability" in text, out
    assert all("A bad input" not in line or "gets a row" in line for line in out.splitlines()), out
    assert _reflow("Head.\n\nOne\nparagraph.\n\n- a\n- b") == "Head.\n\nOne paragraph.\n\n- a\n- b"
