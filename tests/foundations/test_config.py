"""Tests for facecompat.config: inheritance, overrides, strict typing, errors, round-trip."""

from __future__ import annotations

import argparse
import dataclasses
import os
import textwrap
from pathlib import Path

import pytest

from facecompat.config import (
    CompatConfig,
    Config,
    ConfigError,
    DataConfig,
    HeadConfig,
    add_config_args,
    config_from_args,
    dump_config,
    from_dict,
    load_config,
)
from tests.helpers import REPO

REPO_CONFIGS = REPO / "configs"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def flat_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            keys |= flat_keys(value, dotted + ".")
        else:
            keys.add(dotted)
    return keys


# ----------------------------------------------------------------------------- inheritance


def test_child_overrides_nested_key_and_keeps_siblings(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "optim: {lr: 0.1, momentum: 0.8}\ndata: {batch_size: 64, num_workers: 3}\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\noptim: {lr: 0.02}\n")
    cfg = load_config(child)
    assert cfg.optim.lr == 0.02
    assert cfg.optim.momentum == 0.8  # sibling from the base survives
    assert (cfg.data.batch_size, cfg.data.num_workers) == (64, 3)
    assert cfg.optim.weight_decay == Config().optim.weight_decay  # set nowhere: the default


def test_two_levels_of_bases_relative_to_including_file(tmp_path: Path) -> None:
    write(tmp_path / "shared" / "root.yaml", "train: {epochs: 7, log_every: 5}\nmodel: {network: r18}\n")
    write(tmp_path / "shared" / "mid.yaml", "_base_: root.yaml\ntrain: {epochs: 9}\nhead: {scale: 32}\n")
    top = write(tmp_path / "exp" / "top.yaml", "_base_: ../shared/mid.yaml\nhead: {sample_rate: 0.2}\n")
    cfg = load_config(top)
    assert (cfg.train.epochs, cfg.train.log_every) == (9, 5)
    assert cfg.model.network == "r18"
    assert (cfg.head.scale, cfg.head.sample_rate) == (32.0, 0.2)


def test_list_of_bases_later_wins_child_wins_last(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "data: {batch_size: 8, num_workers: 1}\nmodel: {network: r18}\n")
    write(tmp_path / "b.yaml", "data: {batch_size: 16}\nmodel: {network: r34}\n")
    top = write(tmp_path / "top.yaml", "_base_: [a.yaml, b.yaml]\nmodel: {network: r100}\n")
    cfg = load_config(top)
    assert cfg.data.batch_size == 16
    assert cfg.data.num_workers == 1
    assert cfg.model.network == "r100"


def test_diamond_bases_are_not_a_cycle(tmp_path: Path) -> None:
    write(tmp_path / "root.yaml", "train: {epochs: 3}\n")
    write(tmp_path / "a.yaml", "_base_: root.yaml\n")
    write(tmp_path / "b.yaml", "_base_: root.yaml\n")
    top = write(tmp_path / "top.yaml", "_base_: [a.yaml, b.yaml]\n")
    assert load_config(top).train.epochs == 3


def test_base_cycle_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"_base_ cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")


def test_self_base_is_a_cycle(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="_base_ cycle"):
        load_config(tmp_path / "a.yaml")


def test_missing_base_file(tmp_path: Path) -> None:
    top = write(tmp_path / "top.yaml", "_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"top\.yaml: _base_ file not found: .*nowhere\.yaml"):
        load_config(top)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"absent\.yaml: config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_bad_base_value(tmp_path: Path) -> None:
    top = write(tmp_path / "top.yaml", "_base_: 3\n")
    with pytest.raises(ConfigError, match=r"top\.yaml: _base_: expected a file name"):
        load_config(top)


# ----------------------------------------------------------------------------- overrides


def test_set_overrides_parse_yaml_values(tmp_path: Path) -> None:
    top = write(tmp_path / "top.yaml", "optim: {lr: 0.1}\n")
    cfg = load_config(
        top,
        [
            "optim.lr=1e-3",  # PyYAML alone reads this as a string
            "data.flip=false",
            "data.val_targets=[lfw, agedb_30]",
            "head.margins=[1.0, 0.0, 0.4]",
            "compat.old.embedding_size=256",
            "compat.params.alpha=0.3",
            "train.exp_name=run 1",
            "optim.grad_clip=null",
        ],
    )
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.data.flip is False
    assert cfg.data.val_targets == ("lfw", "agedb_30")
    assert cfg.head.margins == (1.0, 0.0, 0.4)
    assert cfg.compat.old.embedding_size == 256
    assert cfg.compat.params == {"alpha": 0.3}
    assert cfg.train.exp_name == "run 1"
    assert cfg.optim.grad_clip is None


def test_set_applies_in_order_and_beats_the_file(tmp_path: Path) -> None:
    top = write(tmp_path / "top.yaml", "data: {batch_size: 4}\n")
    cfg = load_config(top, ["data.batch_size=8", "data.batch_size=16"])
    assert cfg.data.batch_size == 16


def test_set_mapping_merges_into_section(tmp_path: Path) -> None:
    top = write(tmp_path / "top.yaml", "data: {batch_size: 4, num_workers: 0}\n")
    cfg = load_config(top, ["data={batch_size: 2}"])
    assert (cfg.data.batch_size, cfg.data.num_workers) == (2, 0)


def test_set_without_file_starts_from_defaults() -> None:
    assert load_config(None, ["train.epochs=3"]) == dataclasses.replace(
        Config(), train=dataclasses.replace(Config().train, epochs=3)
    )


@pytest.mark.parametrize("item", ["optim.lr", "=3", "optim..lr=1"])
def test_malformed_set_item(item: str) -> None:
    with pytest.raises(ConfigError, match=f"^--set {item.replace('.', '[.]')}: "):
        load_config(None, [item])


def test_set_unknown_key_names_the_set_item(tmp_path: Path) -> None:
    top = write(tmp_path / "top.yaml", "optim: {lr: 0.1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(top, ["optim.lrr=0.1"])
    assert str(info.value) == "--set optim.lrr=0.1: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"


def test_set_wrong_type_names_the_set_item() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.batch_size=lots"])
    assert str(info.value) == "--set data.batch_size=lots: data.batch_size: expected int, got str 'lots'"


def test_set_unknown_section_names_the_set_item() -> None:
    with pytest.raises(
        ConfigError, match=r"^--set optm\.lr=1: unknown key 'optm' \(did you mean 'optim'\?\)"
    ):
        load_config(None, ["optm.lr=1"])


# ----------------------------------------------------------------------------- strict keys and types


def test_unknown_key_names_file_dotted_key_and_suggestion(tmp_path: Path) -> None:
    top = write(tmp_path / "x.yaml", "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(top)
    assert str(info.value) == f"{top}: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"


def test_unknown_key_in_a_base_names_the_base(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", "compat:\n  old:\n    netwrk: r18\n")
    top = write(tmp_path / "top.yaml", "_base_: base.yaml\ncompat: {weight: 2.0}\n")
    with pytest.raises(ConfigError) as info:
        load_config(top)
    assert str(info.value) == (
        f"{os.path.normpath(base)}: unknown key 'compat.old.netwrk' (did you mean 'compat.old.network'?)"
    )


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path: Path) -> None:
    top = write(tmp_path / "x.yaml", "head: {zzzzzz: 1}\n")
    with pytest.raises(
        ConfigError, match=r"unknown key 'head\.zzzzzz' \(valid: margins, sample_rate, scale\)"
    ):
        load_config(top)


def test_wrong_type_names_key_expected_and_got(tmp_path: Path) -> None:
    top = write(tmp_path / "x.yaml", "optim: {lr: abc}\n")
    with pytest.raises(ConfigError) as info:
        load_config(top)
    assert str(info.value) == f"{top}: optim.lr: expected float, got str 'abc'"


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("data: {batch_size: true}", "data.batch_size: expected int, got bool True"),  # bool is not an int
        ("data: {batch_size: 2.0}", "data.batch_size: expected int, got float 2.0"),  # nor is a float
        ("optim: {lr: false}", "optim.lr: expected float, got bool False"),
        ("data: {flip: 1}", "data.flip: expected bool, got int 1"),
        ("model: {network: 50}", "model.network: expected str, got int 50"),
        ("data: {val_targets: lfw}", "data.val_targets: expected list of str, got str 'lfw'"),
        ("data: {val_targets: [lfw, 3]}", "data.val_targets[1]: expected str, got int 3"),
        (
            "head: {margins: [1.0, 0.5]}",
            "head.margins: expected list of 3 (float, float, float), got 2 items",
        ),
        ("head: {margins: [1.0, x, 0.0]}", "head.margins[1]: expected float, got str 'x'"),
        # params values are typed by each method (tests/compat/test_compat.py); the section must be a mapping
        ("compat: {params: [1]}", "compat.params: expected mapping of str to Any, got list [1]"),
        ("data: {subset: 3}", "data.subset: expected str, got int 3"),
        ("optim: {grad_clip: [1]}", "optim.grad_clip: expected float, got list [1]"),
        ("data: null", "data: expected a mapping (section), got null"),
        ("data: 3", "data: expected a mapping (section), got int 3"),
        ("compat: {old: null}", "compat.old: expected a mapping (section), got null"),
        (
            "data: {loader: dail}",
            "data.loader: expected one of 'auto', 'dali', 'torch', got str 'dail' (did you mean 'dali'?)",
        ),
        (
            "eval: {target: ijbc}",
            "eval.target: expected one of 'IJBC', 'IJBB', got str 'ijbc' (did you mean 'IJBC'?)",
        ),
        ("eval: {target: xyz}", "eval.target: expected one of 'IJBC', 'IJBB', got str 'xyz'"),
    ],
)
def test_wrong_types_are_rejected(tmp_path: Path, yaml_text: str, message: str) -> None:
    top = write(tmp_path / "x.yaml", yaml_text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(top)
    assert str(info.value) == f"{top}: {message}"


def test_int_is_accepted_for_float(tmp_path: Path) -> None:
    top = write(tmp_path / "x.yaml", "optim: {lr: 1, weight_decay: 0}\nhead: {margins: [1, 0, 0]}\n")
    cfg = load_config(top)
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert type(cfg.optim.weight_decay) is float
    assert all(type(m) is float for m in cfg.head.margins)


def test_optional_accepts_null(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", "data: {subset: ids.txt}\ntrain: {exp_name: a}\n")
    top = write(
        tmp_path / "top.yaml", f"_base_: {base.name}\ndata: {{subset: null}}\ntrain: {{exp_name: ~}}\n"
    )
    cfg = load_config(top)
    assert cfg.data.subset is None and cfg.train.exp_name is None


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("data: {batch_size: 0}", "data.batch_size: must be > 0, got 0"),
        ("data: {split_ratio: 1.0}", "data.split_ratio: must be in (0, 1), got 1.0"),
        ("data: {part: old}", "data.part: must be 'full' when protocol is 'none', got 'old'"),
        ("head: {sample_rate: 0}", "head.sample_rate: must be in (0, 1], got 0.0"),
        ("compat: {old: {embedding_size: -1}}", "compat.old.embedding_size: must be > 0, got -1"),
        ("optim: {warmup_epochs: 30}", "optim.warmup_epochs: must be < train.epochs (20), got 30.0"),
    ],
)
def test_validation_errors_name_file_and_key(tmp_path: Path, yaml_text: str, message: str) -> None:
    top = write(tmp_path / "x.yaml", yaml_text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(top)
    assert str(info.value) == f"{top}: {message}"


def test_validation_applies_to_direct_construction() -> None:
    with pytest.raises(ConfigError, match="sample_rate: must be in"):
        HeadConfig(sample_rate=1.5)
    with pytest.raises(ConfigError, match="margins: expected 3 values"):
        HeadConfig(margins=(1.0, 0.5))  # type: ignore[arg-type]


def test_protocol_part_combination_is_valid() -> None:
    cfg = load_config(None, ["data.protocol=opclass", "data.part=old"])
    assert (cfg.data.protocol, cfg.data.part) == ("opclass", "old")


def test_from_dict_builds_a_section() -> None:
    data = from_dict(DataConfig, {"batch_size": 3, "val_targets": ["lfw"]}, "inline")
    assert data == DataConfig(batch_size=3, val_targets=("lfw",))
    with pytest.raises(ConfigError, match=r"^inline: unknown key 'data\.bach_size'"):
        from_dict(DataConfig, {"bach_size": 3}, "inline", prefix="data")


# ----------------------------------------------------------------------------- YAML files


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    top = write(tmp_path / "x.yaml", "data:\n  batch_size: 4\n  rec: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"^{str(top)}: line \d+: invalid YAML"):
        load_config(top)


def test_yaml_duplicate_key_is_an_error(tmp_path: Path) -> None:
    top = write(tmp_path / "x.yaml", "optim:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"line 3: invalid YAML \(duplicate key 'lr'\)"):
        load_config(top)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    top = write(tmp_path / "x.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(top)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path / "x.yaml", "# nothing\n")) == Config()


def test_exponent_floats_in_files(tmp_path: Path) -> None:
    top = write(tmp_path / "x.yaml", "optim: {weight_decay: 5e-4, lr: -.5e+1}\n")
    cfg = load_config(top, ["optim.lr=2E-2"])
    assert cfg.optim.weight_decay == pytest.approx(5e-4)
    assert cfg.optim.lr == pytest.approx(2e-2)


# ----------------------------------------------------------------------------- round trip, frozen


def test_dump_then_load_gives_an_equal_config(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "optim.lr=1e-5",
            "head.margins=[1.0, 0.0, 0.4]",
            "data.val_targets=[lfw, cfp_fp]",
            "data.protocol=opdata",
            "data.part=new",
            "compat.method=mixbct",
            "compat.params={alpha: 0.3, keep_ratio: 0.9}",
            "compat.old.checkpoint=work_dirs/old/model.pt",
            "optim.grad_clip=null",
            "train.exp_name=x",
        ],
    )
    out = dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert out == tmp_path / "run" / "config.yaml"
    again = load_config(out)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_dump_replaces_an_existing_file(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", "stale: true\n")
    dump_config(Config(), path)
    assert load_config(path) == Config()


def test_to_dict_is_plain_yaml_data() -> None:
    tree = Config().to_dict()
    assert tree["head"]["margins"] == [1.0, 0.5, 0.0]
    assert isinstance(tree["data"]["val_targets"], list)
    assert from_dict(Config, tree) == Config()


def test_configs_are_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data = DataConfig()  # type: ignore[misc]
    assert isinstance(cfg.data.val_targets, tuple)


def test_sections_do_not_share_mutable_defaults() -> None:
    assert CompatConfig().params is not CompatConfig().params


# ----------------------------------------------------------------------------- command line


def test_add_config_args_and_config_from_args(tmp_path: Path) -> None:
    top = write(tmp_path / "x.yaml", "train: {epochs: 4}\n")
    parser = add_config_args(argparse.ArgumentParser())
    args = parser.parse_args([str(top), "--set", "train.epochs=5", "--set", "data.flip=false"])
    cfg = config_from_args(args)
    assert cfg.train.epochs == 5 and cfg.data.flip is False
    with pytest.raises(SystemExit):
        parser.parse_args([])  # config is required by default


def test_add_config_args_optional_config() -> None:
    parser = add_config_args(argparse.ArgumentParser(), required=False)
    args = parser.parse_args(["--set", "eval.target=IJBB"])
    assert config_from_args(args).eval.target == "IJBB"


# ----------------------------------------------------------------------------- the repository's configs


@pytest.mark.parametrize("path", sorted(REPO_CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_repo_config_loads(path: Path) -> None:
    if path.name.startswith("eval_"):  # evaluation catalogs (tools/eval_ijbc.py), not experiments
        from facecompat.eval.catalog import EvalCatalog, load_catalog

        catalog = load_catalog(path)
        assert isinstance(catalog, EvalCatalog) and {"old", "new"} <= set(catalog.models)
        return
    if path.name.startswith("quickstart_"):  # the quickstart's sizes, not experiments
        from facecompat.pipelines.quickstart import Size, load_size

        size = load_size(path)
        assert isinstance(size, Size) and size.data["num_ids"] > 0
        return
    if path.name.endswith("_fct.yaml"):  # FCT transformation configs (tools/train_fct.py)
        from facecompat.compat.fct import FCTConfig, load_fct_config

        fct = load_fct_config(path)
        assert isinstance(fct, FCTConfig) and fct.side is not None and fct.data.part == "new"
        return
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_repo_configs_exist() -> None:
    names = {p.name for p in REPO_CONFIGS.glob("*.yaml")}
    assert {"base.yaml", "synthetic_data.yaml"} <= names


def test_base_yaml_writes_out_every_key() -> None:
    import yaml

    written = yaml.safe_load((REPO_CONFIGS / "base.yaml").read_text())
    assert flat_keys(written) == flat_keys(Config().to_dict())


def test_base_yaml_is_the_ms1mv3_r50_recipe() -> None:
    cfg = load_config(REPO_CONFIGS / "base.yaml")
    assert cfg.model.network == "r50" and cfg.data.batch_size == 128
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (
        "sgd",
        0.1,
        0.9,
        5e-4,
    )
    assert (cfg.train.epochs, cfg.optim.grad_clip, cfg.head.margins) == (20, 5.0, (1.0, 0.5, 0.0))


def test_synthetic_config_reads_generated_data() -> None:
    cfg = load_config(REPO_CONFIGS / "synthetic_data.yaml")
    assert cfg.data.rec == "work_dirs/synthetic/train"
    assert cfg.optim == load_config(REPO_CONFIGS / "base.yaml").optim  # inherited
