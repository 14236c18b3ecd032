"""Mac-specific facts in `doctor` and `plan`, with MLX's Metal device info monkeypatched: the chip,
its memory, the Metal working-set limit in force, and the presets that fit it. Off a Mac both
fall back to the 48 GB Mac the presets are sized for, and say so."""

import json

from click.testing import CliRunner

from tinymoe import backend
from tinymoe.cli.main import cli

GIB = 2**30


def fake_mac(monkeypatch, chip, memory_gib, working_set_gib):
    info = {"device_name": chip, "architecture": "applegpu_g15s", "memory_size": int(memory_gib * GIB),
            "max_recommended_working_set_size": int(working_set_gib * GIB),
            "max_buffer_length": int(working_set_gib * GIB), "resource_limit": 499000}
    monkeypatch.setattr(backend, "metal_device_info", lambda: info)


def plan_json(*args):
    result = CliRunner().invoke(cli, ["plan", "--preset", "moe-1b", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_plan_budgets_with_the_working_set_limit_in_force_on_a_mac(monkeypatch):
    # a 64 GB Mac whose limit was raised with `sudo sysctl iogpu.wired_limit_mb=56000`
    fake_mac(monkeypatch, "Apple M3 Max", 64, 56000 / 1024)
    data = plan_json()
    assert data["budget_bytes"] == int(56000 / 1024 * GIB)
    assert data["assumptions"]["memory_gib"] == 64
    assert "Apple M3 Max" in data["assumptions"]["limit_source"]
    text = CliRunner().invoke(cli, ["plan", "--preset", "moe-1b"]).output
    assert "Metal working-set limit in force on this Apple M3 Max" in text

    fake_mac(monkeypatch, "Apple M1", 16, 10.67)  # a small Mac: moe-1b no longer fits
    small = plan_json()
    assert small["budget_bytes"] == int(10.67 * GIB) and not small["fits"]
    given = plan_json("--memory-gib", "48", "--usable-fraction", "0.75")  # flags still win
    assert given["budget_bytes"] == int(36 * GIB) and given["fits"]
    assert "--memory-gib" in given["assumptions"]["limit_source"]


def test_off_a_mac_plan_assumes_a_48_gb_mac_and_says_so(monkeypatch):
    monkeypatch.setattr(backend, "metal_device_info", lambda: None)
    data = plan_json()
    assert data["budget_bytes"] == int(48 * 0.75 * GIB)
    assert "assumed" in data["assumptions"]["limit_source"]


def test_doctor_shows_chip_memory_limit_and_the_presets_that_fit(monkeypatch):
    fake_mac(monkeypatch, "Apple M2", 16, 10.67)
    monkeypatch.setattr(backend, "matmul_gflops", lambda: 1.0)  # not what this test is about
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["chip"] == "Apple M2" and data["memory_gib"] == 16.0
    assert data["metal_working_set_gib"] == 10.7
    assert {"debug", "tiny", "small"} <= set(data["presets_that_fit"])
    assert "moe-1b" not in data["presets_that_fit"] and "olmoe-7b" not in data["presets_that_fit"]
    assert "Apple M2" in data["presets_budget"]
    assert data["auto_dispatch"] in ("grouped", "gather", "metal") and "kernel_check" in data
    text = CliRunner().invoke(cli, ["doctor"]).output
    assert "metal_working_set_gib" in text and "presets_that_fit" in text
