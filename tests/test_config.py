"""Config loading: YAML + --set precedence, typed coercion, one-line errors with suggestions."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slam_pretrain.config import Config, config_from_dict, load_config, parse_override
from slam_pretrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    p = write(tmp_path, {"train": {"lr": 0.01, "max_steps": 7}, "model": {"segment_len": 0.6, "overlap": 0.2}})
    cfg = load_config(p, ["train.lr=3e-4"])
    assert cfg.train.lr == pytest.approx(3e-4)  # command line wins
    assert cfg.train.max_steps == 7  # YAML wins over the default
    assert cfg.train.warmup_steps == Config().train.warmup_steps  # default
    assert isinstance(cfg.model.segment_len, float) and cfg.model.segment_len == 0.6
    assert isinstance(Config().model.segment_len, int)


def test_override_types():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("engine.compile=true") == (["engine", "compile"], True)
    assert parse_override("data.sources=[stdlib]") == (["data", "sources"], ["stdlib"])
    cfg = load_config(None, ["model.num_kv_heads=null", "train.max_steps=1e3", "engine.deepspeed_extra={a: 1}"])
    assert cfg.model.num_kv_heads is None and cfg.train.max_steps == 1000
    assert cfg.engine.deepspeed_extra == {"a": 1}


@pytest.mark.parametrize("override, fragments", [
    (["train.lrr=1"], ["train.lrr", "did you mean 'train.lr'"]),
    (["modle.d_model=1"], ["modle", "did you mean 'model'"]),
    (["model.d_model=100"], ["model.d_model=100", "num_heads=8"]),
    (["model.overlap=128"], ["model.overlap=128", "segment_len/2"]),
    (["model.segment_len=0.6", "model.overlap=0.3"], ["model.overlap=0.3", "segment_len/2"]),
    (["model.d_ff=-5"], ["model.d_ff=-5", "positive"]),
    (["engine.name=megatron"], ["engine.name='megatron'", "'deepspeed', 'fsdp'"]),
    (["engine.zero_stage=4"], ["engine.zero_stage=4", "0, 1, 2, 3"]),
    (["train.max_steps=abc"], ["train.max_steps='abc'", "expected int"]),
    (["train.global_batch_size=12", "train.micro_batch_size=8"], ["train.global_batch_size=12", "multiple"]),
    (["data.seq_len=4096"], ["data.seq_len=4096", "model.max_seq_len"]),
    (["train"], ["--set 'train'", "dotted.key=value"]),
])
def test_invalid_values_are_named(override, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)


def test_yaml_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(p)
    p2 = write(tmp_path, {"model": {"dmodel": 3}})
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'model.dmodel': did you mean 'model.d_model'"):
        load_config(p2)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_dict():
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml")
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert cfg.flat()["model.d_model"] == cfg.model.d_model


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slam_pretrain", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_user_error_is_one_line_exit_2():
    r = run_cli("train", "--config", "configs/tiny_cpu.yaml", "--set", "model.num_heads=3", "--dry-run")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.d_model=128" in lines[0] and "num_heads=3" in lines[0]


def test_cli_dry_run_prints_resolved_config_and_summary():
    r = run_cli("train", "--config", "configs/tiny_cpu.yaml", "--set", "train.lr=5e-4", "--dry-run")
    assert r.returncode == 0, r.stderr
    resolved_yaml, summary = r.stdout.split("\n---\n", 1)
    resolved = yaml.safe_load(resolved_yaml)
    assert resolved["train"]["lr"] == pytest.approx(5e-4)
    assert resolved["model"]["d_model"] == 128
    assert "parameters" in summary.lower() and "flops" in summary.lower()


# ---------------------------------------------------------------------------------------------
# Non-finite floats and empty files (issue 10, items 10 and 11).

@pytest.mark.parametrize("section, key, text", [
    ("train", "lr", ".nan"), ("train", "lr", ".inf"), ("train", "peak_flops", "-.inf"),  # Optional[float]
    ("model", "dropout", ".NaN"), ("model", "overlap", ".nan"),  # Union[int, float]
    ("data", "val_fraction", ".inf"), ("data", "max_corpus_mb", ".nan"),
])
def test_non_finite_floats_are_rejected_in_yaml(tmp_path, section, key, text):
    p = tmp_path / "c.yaml"
    p.write_text(f"{section}:\n  {key}: {text}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg and f"{section}.{key}=" in msg and "finite" in msg and "c.yaml" in msg, msg


@pytest.mark.parametrize("override, key", [
    ("train.lr=nan", "train.lr"), ("train.lr=.inf", "train.lr"), ("train.lr=1e999", "train.lr"),
    ("train.lr=-inf", "train.lr"), ("model.rope_theta=.nan", "model.rope_theta"),
    ("train.peak_flops=inf", "train.peak_flops"),
    # Inside free-form values too, naming the nested key.
    ("data.sources=[stdlib, {path: a.txt, weight: .inf}]", "data.sources[1].weight"),
    ("engine.deepspeed_extra={x: {y: .nan}}", "engine.deepspeed_extra.x.y"),
])
def test_non_finite_floats_are_rejected_on_the_command_line(override, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=(nan|inf|-inf) is invalid: must be a finite number"):
        load_config(None, [override])


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# and another\n", "---\n"])
def test_empty_config_file_is_refused(tmp_path, text):
    p = tmp_path / "empty.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=r"empty\.yaml' is empty"):
        load_config(p)
    q = tmp_path / "defaults.yaml"
    q.write_text("{}\n")  # an explicit empty mapping means "all defaults"
    assert load_config(q) == load_config(None)


def test_cli_nan_and_empty_config_are_one_line(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here yet\n")
    for args, fragment in ((["--config", str(empty)], "is empty"),
                           (["--config", "configs/tiny_cpu.yaml", "--set", "train.lr=.nan"], "train.lr=nan")):
        r = run_cli("train", *args, "--set", f"run.out_dir={tmp_path / 'run'}")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], r.stderr
        assert not (tmp_path / "run").exists()  # nothing written
