"""Targets: the built-in TOML files, the validator's one-line errors, the loader and `factory targets`."""

from __future__ import annotations

import json

import pytest

from factory.errors import FactoryError
from conftest_profiles import VALID, run_cli, to_toml, with_changes, write_target
from targets import BUILTIN_DIR, Target, builtin_names, list_targets, load_target, parse_target, validate_target_file

BUILTINS = ("laptop-cpu", "raspberry-pi-5", "phone-midrange", "gpu-latency")

# ----------------------------------------------------------------------------------------------- built-ins


def test_builtins_are_all_there_and_load():
    assert set(BUILTINS) <= set(builtin_names())
    for target in list_targets():
        assert isinstance(target, Target)
        assert target.source == "builtin"
        assert load_target(target.name) == target
        json.dumps(target.to_dict())  # JSON-able as is
        hash(target)


def test_builtin_settings_match_their_purpose():
    laptop = load_target("laptop-cpu")
    assert laptop.prompt_length == 512 and laptop.prefill_ms is not None and laptop.latency_metric == "prefill"
    assert laptop.providers == ("CPUExecutionProvider",)

    pi = load_target("raspberry-pi-5")
    assert pi.threads == 4 and pi.memory_limit_bytes is not None
    assert (pi.precision, pi.quantization, pi.quantization_isa) == ("int8", "int8-dynamic", "arm64")

    phone = load_target("phone-midrange")
    assert phone.device_class == "mobile" and phone.memory_limit_bytes <= 512 * 2**20
    assert phone.quantization_isa == "arm64"

    gpu = load_target("gpu-latency")
    assert gpu.provider == "CUDAExecutionProvider" and gpu.device_class == "gpu"
    assert gpu.decode_ms_p95 is not None and gpu.precision == "float16"
    assert gpu.session_provider_options() == [{"device_id": "0"}]


def test_builtin_file_documents_the_schema():
    text = (BUILTIN_DIR / "laptop-cpu.toml").read_text()
    for key in ("threads", "memory_limit_bytes", "decode_ms_p95", "quantization_isa", "objectives", "constraints"):
        assert key in text.split("name = ")[0], f"the schema comment does not mention {key}"


# ----------------------------------------------------------------------------------------------- validation


def test_valid_user_file_loads_by_path(tmp_path):
    path = write_target(tmp_path, VALID)
    target = load_target(str(path))
    assert target.name == "my-board" and target.source == str(path)
    assert target.memory_limit_bytes == 512 * 2**20
    assert target.constraints.max_params == 5_000_000 and target.constraints.max_cache_bytes is None
    assert target.objectives == ("quality", "latency")
    assert validate_target_file(path) == target


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"threads": -1}, "threads: must be a positive integer, got -1"),
        ({"threads": 2.5}, "threads: must be a positive integer, got 2.5"),
        ({"threads": True}, "threads: must be a positive integer"),
        ({"prompt_length": 0}, "prompt_length: must be a positive integer, got 0"),
        ({"device_class": "tpu"}, "device_class: must be one of cpu, mobile, gpu, got 'tpu'"),
        ({"providers": ["CPU"]}, "providers: 'CPU' is not an onnxruntime execution provider name"),
        ({"providers": []}, "providers: must be a non-empty list"),
        ({"precision": "float32"}, "quantization: 'int8-dynamic' gives int8 weights but precision is 'float32'"),
        ({"quantization_isa": "none"}, "quantization_isa: int8 quantization needs an ISA preset"),
        ({"quantization_isa": "sse2"}, "quantization_isa: must be one of arm64, avx2, avx512_vnni, none"),
        ({"memory_limit_bytes": "12 parsecs"}, "memory_limit_bytes: must be a byte count"),
        ({"memory_limit_bytes": -5}, "memory_limit_bytes: must be a positive byte count, got -5"),
        ({"prefill_ms": 0}, "prefill_ms: must be a positive number of milliseconds, got 0"),
        ({"decode_ms_p95": "fast"}, "decode_ms_p95: must be a positive number of milliseconds, got 'fast'"),
        ({"objectives": ["quality", "speed"]}, "objectives: 'speed' is not one of quality, params, cache, flops"),
        ({"objectives": ["quality", "quality"]}, "objectives: lists 'quality' twice"),
        ({"latency_metric": "both"}, "latency_metric: must be one of prefill, decode"),
        ({"name": "my board!"}, "name: must be letters, digits"),
        ({"name": None}, "name: required field is missing"),
        ({"threads": None}, "threads: required field is missing"),
        ({"thread": 4}, "thread: unknown key (did you mean 'threads'?)"),
        ({"colour": "red"}, "colour: unknown key"),
        ({"constraints": {"max_params": 0}}, "constraints.max_params: must be a positive integer, got 0"),
        ({"constraints": {"max_flops": 10}}, "constraints.max_flops: unknown key"),
        ({"constraints": {"max_memory_bytes": "2GiB"}}, "constraints.max_memory_bytes: 2147483648 is above memory_limit_bytes"),
        (
            {"provider_options": {"CUDAExecutionProvider": {"device_id": 0}}},
            "provider_options.CUDAExecutionProvider: 'CUDAExecutionProvider' is not in providers",
        ),
        ({"device_class": "gpu"}, "providers: a gpu target must list a GPU execution provider first"),
    ],
)
def test_bad_field_is_named_in_one_line(tmp_path, changes, message):
    path = write_target(tmp_path, with_changes(**changes))
    with pytest.raises(FactoryError) as caught:
        load_target(str(path))
    text = str(caught.value)
    assert message in text
    assert text.startswith(str(path)) and "\n" not in text


def test_byte_units_and_plain_integers():
    assert parse_target(with_changes(memory_limit_bytes="300MB")).memory_limit_bytes == 300_000_000
    assert parse_target(with_changes(memory_limit_bytes="1GiB")).memory_limit_bytes == 2**30
    assert parse_target(with_changes(memory_limit_bytes=123456)).memory_limit_bytes == 123456


def test_latency_metric_defaults_from_the_budgets():
    assert parse_target(with_changes(decode_ms_p95=None)).latency_metric == "prefill"
    assert parse_target(with_changes()).latency_metric == "decode"


def test_invalid_toml_is_one_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\nthreads = = 4\n')
    with pytest.raises(FactoryError, match="not valid TOML") as caught:
        load_target(str(path))
    assert "\n" not in str(caught.value)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(FactoryError) as caught:
        load_target("raspbery-pi-5")
    text = str(caught.value)
    assert "unknown target 'raspbery-pi-5'" in text and "did you mean 'raspberry-pi-5'" in text
    for name in BUILTINS:
        assert name in text


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(FactoryError, match="target file not found"):
        load_target(str(tmp_path / "nope.toml"))


def test_fingerprint_ignores_the_description_only():
    base = parse_target(with_changes())
    assert parse_target(with_changes(description="other words")).fingerprint() == base.fingerprint()
    assert parse_target(with_changes(threads=3)).fingerprint() != base.fingerprint()


# ----------------------------------------------------------------------------------------------- the CLI


def test_cli_list_json(capsys):
    code, out, _ = run_cli(capsys, "targets", "list", "--json")
    assert code == 0
    listed = json.loads(out)["targets"]
    names = [t["name"] for t in listed]
    assert set(BUILTINS) <= set(names)
    assert {"name", "description", "device_class", "providers", "threads", "prompt_length"} <= set(listed[0])


def test_cli_list_table_goes_to_stderr(capsys):
    code, out, err = run_cli(capsys, "targets", "list")
    assert code == 0 and out == "" and "laptop-cpu" in err


def test_cli_show(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "targets", "show", "raspberry-pi-5", "--json")
    assert code == 0 and json.loads(out)["threads"] == 4
    path = write_target(tmp_path, VALID)
    code, out, _ = run_cli(capsys, "targets", "show", str(path), "--json")
    assert code == 0 and json.loads(out)["name"] == "my-board"


def test_cli_validate_ok_and_errors(capsys, tmp_path):
    good = write_target(tmp_path, VALID)
    code, out, _ = run_cli(capsys, "targets", "validate", str(good))
    assert code == 0 and out.strip() == "ok"

    bad = write_target(tmp_path, with_changes(threads=-1), name="bad.toml")
    code, out, err = run_cli(capsys, "targets", "validate", str(bad))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "threads: must be a positive integer, got -1" in err

    code, _, err = run_cli(capsys, "targets", "validate", str(tmp_path / "missing.toml"))
    assert code == 2 and err.count("\n") == 1


def test_cli_show_unknown_name(capsys):
    code, out, err = run_cli(capsys, "targets", "show", "toaster")
    assert code == 2 and out == "" and err.count("\n") == 1 and "laptop-cpu" in err
