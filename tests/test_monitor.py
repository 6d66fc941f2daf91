"""Monitoring: tegrastats lines of each board kind, fake INA3221 sysfs trees, energy integration,
the Prometheus exposition parsed back, reports, and `monitor` wrapping a generation."""

from __future__ import annotations

import json
import sys
import time
from types import SimpleNamespace

import pytest

from edge_runtime.cli import main
from edge_runtime.monitor.recorder import Recorder, energy_from_counter, energy_per_token
from edge_runtime.monitor.samplers import Ina3221Sampler
from edge_runtime.monitor.tegrastats import TegrastatsParseError, parse_line, parse_log

# Lines in the forms tegrastats prints on each board (JetPack 5/6), values varied.
NANO = ("05-07-2026 21:21:53 RAM 2272/7620MB (lfb 4x4MB) SWAP 221/3810MB (cached 0MB) "
        "CPU [12%@1510,3%@1510,0%@1510,7%@1510,1%@729,0%@729] EMC_FREQ 3%@2133 GR3D_FREQ 45%@[624] "
        "cpu@54.937C soc2@55.562C soc0@56.156C gpu@55.468C tj@56.656C soc1@56.656C "
        "VDD_IN 6673mW/4673mW VDD_CPU_GPU_CV 1527mW/527mW VDD_SOC 1339mW/1339mW")
NX_TWO_GPC = ("RAM 5123/15389MB (lfb 12x4MB) SWAP 0/7694MB (cached 0MB) CPU [5%@1984,off,off,off,2%@1984,1%@1984,"
              "0%@1984,4%@1984] GR3D_FREQ 87%@[918,918] cpu@49.5C gpu@51.2C tj@52C "
              "VDD_IN 12840mW/9002mW VDD_CPU_GPU_CV 5120mW/3300mW VDD_SOC 2900mW/2750mW")
AGX = ("01-30-2026 18:09:55 RAM 14384/62841MB (lfb 303x4MB) SWAP 0/31420MB (cached 0MB) "
       "CPU [2%@729,3%@729,1%@729,4%@729,off,off,off,off,off,off,off,off] EMC_FREQ 1%@3199 GR3D_FREQ 0%@[0,0] "
       "cpu@48.75C soc2@43.562C soc0@45.125C tj@48.75C soc1@44.343C "
       "VDD_GPU_SOC 3192mW/3192mW VDD_CPU_CV 1596mW/1596mW VIN_SYS_5V0 5048mW/5048mW VDDQ_VDD2_1V8AO 403mW/400mW")
OLD_GR3D = ("RAM 2048/7772MB (lfb 512x1MB) SWAP 0/3886MB CPU [45%@1907,34%@1907] GR3D_FREQ 99% cpu@52C "
            "VDD_IN 7000mW/6500mW")


def test_nano_line():
    s = parse_line(NANO)
    assert (s.ram_used_mb, s.ram_total_mb, s.swap_used_mb) == (2272, 7620, 221)
    assert s.cpu_load_pct[0] == 12 and s.cpu_mhz[4] == 729 and s.emc_load_pct == 3
    assert s.gpu_load_pct == 45 and s.gpu_mhz == [624]
    assert s.total_mw == 6673  # VDD_IN's current value, not the running average
    assert s.temps_c["tj"] == 56.656 and s.timestamp.year == 2026


def test_nx_cores_off_and_two_gpcs_without_timestamp():
    s = parse_line(NX_TWO_GPC)
    assert s.timestamp is None and s.cpu_load_pct[1:4] == [None, None, None]
    assert s.gpu_mhz == [918, 918] and s.total_mw == 12840
    assert s.to_record()["cpu_load_pct"] == pytest.approx((5 + 2 + 1 + 0 + 4) / 5)


def test_agx_has_no_vdd_in_total_is_sum_of_rails():
    s = parse_line(AGX)
    assert "VDD_IN" not in s.rails_mw
    assert s.total_mw == 3192 + 1596 + 5048 + 403


def test_agx_idle_rails_nc_and_a_second_gpu_partition():
    """From AGX Orin logs in the wild: "NC 0mW/0mW" (not connected) was kept as a rail, a rail reading below zero
    at idle (JetPack 6) was dropped from the total, and JetPack 5's GR3D2_FREQ (a second GPU partition) was
    ignored."""
    s = parse_line(AGX.replace("VDD_CPU_CV 1596mW/1596mW", "VDD_CPU_CV -398mW/-398mW")
                   .replace("VDDQ_VDD2_1V8AO", "NC 0mW/0mW VDDQ_VDD2_1V8AO") + " NC 0mW/0mW")
    assert s.rails_mw == {"VDD_GPU_SOC": 3192, "VDD_CPU_CV": -398, "VIN_SYS_5V0": 5048, "VDDQ_VDD2_1V8AO": 403}
    assert s.total_mw == 3192 - 398 + 5048 + 403
    two = parse_line(NANO.replace("GR3D_FREQ 45%@[624]", "GR3D_FREQ 12%@305 GR3D2_FREQ 40%@306"))
    assert two.gpu_load_pct == 40 and two.gpu_mhz == [305, 306]


def test_old_gr3d_form():
    s = parse_line(OLD_GR3D)
    assert s.gpu_load_pct == 99 and s.gpu_mhz == []


def test_unparseable_lines_are_counted_and_skipped():
    samples, bad = parse_log([NANO, "garbage line", "", AGX, "RAM oops"])
    assert len(samples) == 2 and bad == 2
    with pytest.raises(TegrastatsParseError):
        parse_line("CPU [1%@729]")


def test_impossible_dates_and_overlong_numbers_are_unparseable_lines():
    """A cut-and-merged or corrupted line is counted and skipped: it used to raise ValueError (strptime) or reach
    the plots as inf (400 digits) or exceed int()'s digit limit (5,000)."""
    lines = [NANO.replace("05-07-2026", "02-30-2026"), NANO.replace("6673mW/", "9" * 400 + "mW/"),
             NANO.replace("RAM 2272/", "RAM " + "9" * 5000 + "/"), NANO.replace("tj@56.656C", "tj@" + "9" * 400 + "C"),
             NANO.replace("05-07-2026", "01-01-0001"), NANO.replace("05-07-2026", "12-31-9999")]
    samples, bad = parse_log([NANO, *lines, AGX])
    assert len(samples) == 2 and bad == len(lines)


def test_sensor_that_is_off_is_not_a_temperature():
    s = parse_line(AGX.replace("tj@48.75C", "CV0@-256C CV1@-256C tj@48.75C"))
    assert "CV0" not in s.temps_c and "CV1" not in s.temps_c and s.temps_c["tj"] == 48.75


def fake_ina3221(root, rails):
    """rails: {label: (mV, mA)} on one INA3221 at i2c address 1-0040, plus an NC and a sum channel."""
    dev = root / "sys/bus/i2c/devices/1-0040"
    hw = dev / "hwmon/hwmon3"
    hw.mkdir(parents=True)
    (dev / "name").write_text("ina3221\n")
    entries = list(rails.items()) + [("NC", (0, 0)), ("sum of shunt voltages", (5, 5))]
    for i, (label, (mv, ma)) in enumerate(entries, start=1):
        (hw / f"in{i}_label").write_text(label + "\n")
        (hw / f"in{i}_input").write_text(f"{mv}\n")
        (hw / f"curr{i}_input").write_text(f"{ma}\n")
    return root


def test_ina3221_nano_total_is_vdd_in(tmp_path):
    s = Ina3221Sampler(fake_ina3221(tmp_path, {"VDD_IN": (5000, 1200), "VDD_CPU_GPU_CV": (5000, 300),
                                               "VDD_SOC": (5000, 250)})).sample()
    assert s["power_mw"] == pytest.approx(6000.0)
    assert set(s["rails_mw"]) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}


def test_ina3221_agx_total_is_sum(tmp_path):
    s = Ina3221Sampler(fake_ina3221(tmp_path, {"VDD_GPU_SOC": (5000, 600), "VDD_CPU_CV": (5000, 300),
                                               "VIN_SYS_5V0": (5000, 1000)})).sample()
    assert s["power_mw"] == pytest.approx(3000 + 1500 + 5000)


def test_no_ina3221_is_unavailable(tmp_path):
    assert not Ina3221Sampler(tmp_path).available


def fake_orin_sysfs(root, gpu_load_tenths=457, gpu_hz=624750000, zones=None):
    """JetPack 6's layout: the GPU's devfreq node links to its platform device, which holds the load file."""
    device = root / "sys/devices/platform/bus@0/17000000.gpu"
    device.mkdir(parents=True)
    (device / "load").write_text(f"{gpu_load_tenths}\n")
    node = root / "sys/class/devfreq/17000000.gpu"
    node.mkdir(parents=True)
    (node / "cur_freq").write_text(f"{gpu_hz}\n")
    (node / "device").symlink_to(device)
    zones = zones or {"cpu-thermal": "48750", "gpu-thermal": "46312", "cv0-thermal": "-256000", "tj-thermal": "49125",
                      "pmic-thermal": "n/a"}
    for i, (kind, temp) in enumerate(zones.items()):
        zone = root / f"sys/class/thermal/thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(temp + "\n")
    return root


def test_orin_gpu_load_clock_and_temperatures_from_sysfs(tmp_path):
    """NVML gives an Orin's integrated GPU no load, clock or temperature: monitor recorded none of them."""
    from edge_runtime.monitor.sysfs_samplers import TegraGpuSampler, ThermalSampler

    root = fake_orin_sysfs(tmp_path)
    assert TegraGpuSampler(root).sample() == {"gpu_load_pct": pytest.approx(45.7), "gpu_mhz": pytest.approx(624.75)}
    # millidegrees; an off sensor (-256 C) is left out, as is a reading that is not a number
    assert ThermalSampler(root).sample() == {"temps_c": {"cpu": 48.75, "gpu": 46.312, "tj": 49.125}}
    jp5 = tmp_path / "jp5"  # JetPack 5 names Orin's GPU node after the chip, ga10b
    (jp5 / "sys/devices/platform/17000000.ga10b").mkdir(parents=True)
    (jp5 / "sys/devices/platform/17000000.ga10b/load").write_text("250\n")
    (jp5 / "sys/class/devfreq/17000000.ga10b").mkdir(parents=True)
    (jp5 / "sys/class/devfreq/17000000.ga10b/cur_freq").write_text("306000000\n")
    (jp5 / "sys/class/devfreq/17000000.ga10b/device").symlink_to(jp5 / "sys/devices/platform/17000000.ga10b")
    assert TegraGpuSampler(jp5).sample() == {"gpu_load_pct": 25.0, "gpu_mhz": 306.0}
    old = tmp_path / "old"
    (old / "sys/devices/gpu.0").mkdir(parents=True)
    (old / "sys/devices/gpu.0/load").write_text("1000\n")
    assert TegraGpuSampler(old).sample() == {"gpu_load_pct": 100.0}
    assert not TegraGpuSampler(tmp_path / "empty").available and not ThermalSampler(tmp_path / "empty").available


def test_a_jetson_leaves_nvml_out(tmp_path, monkeypatch):
    """NVML on a Jetson reads 0 mW for the integrated GPU; as a later sampler it overwrote the rails' total."""
    from edge_runtime.monitor import command

    built = []
    monkeypatch.setattr(command, "NvmlSampler", lambda: built.append(1) or SimpleNamespace(available=True))
    root = fake_orin_sysfs(fake_ina3221(tmp_path, {"VDD_IN": (5000, 1200)}))
    names = [s.name for s in command.default_samplers(str(root))]
    assert names == ["ina3221", "tegra-gpu", "thermal", "psutil"] and not built
    assert len(command.default_samplers(str(tmp_path / "desktop"))) == 2 and built  # nvml, psutil


def test_energy_integration_known_answers():
    recs = [{"t": t / 10, "power_mw": 5000.0} for t in range(11)]  # 5 W for one second
    assert energy_per_token(recs, [0.1, 0.3, 0.6]) == pytest.approx([1.0, 1.5])
    ramp = [{"t": 0.0, "power_mw": 0.0}, {"t": 1.0, "power_mw": 10000.0}]  # 0 -> 10 W linearly
    assert energy_per_token(ramp, [0.0, 0.5, 1.0]) == pytest.approx([1.25, 3.75])
    counter = [{"t": 0.0, "energy_mj": 1000.0}, {"t": 2.0, "energy_mj": 5000.0}]
    assert energy_from_counter(counter, 0.5, 1.5) == pytest.approx(2.0)


class FakeSampler:
    available = True

    def __init__(self):
        self.n = 0

    def sample(self):
        self.n += 1
        return {"power_mw": 4000.0 + self.n, "rails_mw": {"VDD_IN": 4000.0 + self.n, "VDD_SOC": 900.0},
                "temps_c": {"gpu": 50.5}, "cpu_load_pct": 12.0}


def test_prometheus_output_parses_back():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from edge_runtime.monitor.prometheus import registry_for

    rec = Recorder([FakeSampler()], power_mode=lambda: "MODE_30W")
    rec.sample_once()
    for t in (0.0, 0.01, 0.02):
        rec.on_token(rec.latest()["t"] + t)
    rec.sample_once()
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry_for(rec)).decode())}
    rails = {s.labels["rail"]: s.value for s in families["edge_runtime_rail_power_milliwatts"].samples}
    assert rails == {"VDD_IN": 4002.0, "VDD_SOC": 900.0}
    assert families["edge_runtime_power_milliwatts"].samples[0].value == 4002.0
    assert families["edge_runtime_temperature_celsius"].samples[0].labels == {"sensor": "gpu"}
    assert families["edge_runtime_power_mode_info"].samples[0].labels["mode"] == "MODE_30W"
    assert families["edge_runtime_tokens_per_second"].samples[0].value == pytest.approx(100.0)


def test_recorder_is_bounded():
    rec = Recorder([FakeSampler()], capacity=5)
    for _ in range(20):
        rec.sample_once()
    assert len(rec.snapshot()) == 5


def test_report_from_tegrastats(tmp_path, capsys):
    log = tmp_path / "tegra.log"
    log.write_text("\n".join([AGX, "not a tegrastats line", AGX.replace("3192mW/", "4192mW/"),
                              "01-30-2026 18:09:57 " + NX_TWO_GPC]) + "\n")
    assert main(["report", "--tegrastats", str(log), "--out", str(tmp_path / "r"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["unparseable_lines"] == 1 and s["samples"] == 3
    assert s["rails_mw"]["VDD_GPU_SOC"] == {"mean": pytest.approx((3192 + 4192) / 2), "peak": 4192.0}
    assert s["ram_used_mb_peak"] == 14384 and s["temps_c_peak"]["tj"] == 52.0
    assert s["gpu_load_pct_mean"] == pytest.approx(87 / 3)
    assert (tmp_path / "r" / "power.png").stat().st_size > 1000


def test_report_skips_an_untimed_line_in_a_timed_log(tmp_path, capsys):
    """tegrastats killed mid-line and restarted into the same --logfile leaves a line whose timestamp is merged
    with the next one's: it has no time of its own, and an index time beside epoch times stretched the plot."""
    base = NANO[len("05-07-2026 21:21:53 "):]
    lines = [f"05-07-2026 21:21:{s:02d} {base}" for s in range(4)]
    lines.append("05-07-2026 21:21:0" + f"05-07-2026 21:21:10 {base}")
    lines += [f"05-07-2026 21:21:{s} {base}" for s in (11, 12)]
    log = tmp_path / "merged.log"
    log.write_text("\n".join(lines) + "\n")
    assert main(["report", "--tegrastats", str(log), "--out", str(tmp_path / "r"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["samples"] == 6 and s["unparseable_lines"] == 1
    from edge_runtime.monitor.report import load_tegrastats

    records, _ = load_tegrastats(log)
    assert max(r["t"] for r in records) - min(r["t"] for r in records) == 12


def test_report_refuses_readings_too_large_to_plot(tmp_path, capsys):
    """1e308 is finite JSON but overflows matplotlib's axis and the summary's sums: such lines are unusable,
    not a traceback after an empty output directory was made."""
    rows = [{"t": float(i), "power_mw": 1e308} for i in range(5)] + [{"t": 1e308, "power_mw": 5000.0}]
    good = [{"t": 10.0 + i, "power_mw": 5000.0 + i} for i in range(3)]
    log = tmp_path / "p.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in rows + good) + "\n")
    assert main(["report", str(log), "--out", str(tmp_path / "r"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["samples"] == 3 and s["unparseable_lines"] == len(rows)
    assert json.loads((tmp_path / "r" / "summary.json").read_text(), parse_constant=pytest.fail)["samples"] == 3


def test_report_skips_jsonl_lines_it_cannot_use(tmp_path, capsys):
    """Good samples and token events are summarised; lines of another shape are counted, never a traceback."""
    good = [{"t": 10.0 + i, "power_mw": 5000.0 + 100 * i, "rails_mw": {"VDD_IN": 5000.0 + 100 * i}}
            for i in range(4)]
    tokens = [{"event": "token", "t": 10.5 + 0.25 * i} for i in range(5)]
    junk = ["[1, 2]", '{"t": "abc"}', '{"t": 11.0, "rails_mw": "high"}', '{"t": 12.0, "power_mw": [1]}',
            '{"event": "token", "t": null}', "not json", "[" * 100000, '"just a string"']
    log = tmp_path / "m.jsonl"
    log.write_text("\n".join([json.dumps(r) for r in good + tokens] + junk) + "\n")
    assert main(["report", str(log), "--out", str(tmp_path / "r"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["samples"] == 4 and s["unparseable_lines"] == len(junk) and s["tokens"] == 5
    assert s["total_mw"] == {"mean": pytest.approx(5150.0), "peak": 5300.0}
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(bytes(range(256)) * 8)
    assert main(["report", str(binary), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "holds no samples" in err


def test_report_of_a_tegrastats_log_without_the_flag_says_to_add_it(tmp_path, capsys):
    log = tmp_path / "nano.log"
    log.write_text(NANO + "\n" + NANO + "\n")
    assert main(["report", str(log), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "add --tegrastats" in err


def test_report_without_matplotlib_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    log = tmp_path / "tegra.log"
    log.write_text(AGX + "\n")
    assert main(["report", "--tegrastats", str(log), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install matplotlib" in err
    assert not (tmp_path / "r").exists()


def test_monitor_wraps_a_generation(tmp_path, capsys):
    pytest.importorskip("torch")
    from edge_runtime.pack.convert import convert
    from tests.helpers import make_llama

    make_llama(tmp_path / "hf", act="relu", seed=61)
    convert(tmp_path / "hf", tmp_path / "p", "int8", progress=False)
    capsys.readouterr()
    jsonl = tmp_path / "m.jsonl"
    code = main(["monitor", "--interval", "20", "--jsonl", str(jsonl), "--", sys.executable, "-m", "edge_runtime.cli",
                 "generate", "--model", str(tmp_path / "p"), "--prompt", "the door", "--max-new-tokens", "40",
                 "--backend", "cpu"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tokens"] == 40 and summary["tokens_per_s"] > 0 and summary["samples"] >= 2
    assert main(["report", str(jsonl), "--out", str(tmp_path / "rep"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["tokens"] == 40 and "tokens.png" in rep["plots"]


def _token_files():
    import glob
    import tempfile

    return set(glob.glob(f"{tempfile.gettempdir()}/edge-runtime-tokens-*"))


def test_monitor_reports_a_killed_command_as_a_shell_does(capsys):
    before = _token_files()
    code = main(["monitor", "--interval", "20", "--", sys.executable, "-c", "import os, signal; os.kill(os.getpid(), "
                 "signal.SIGKILL)"])
    assert code == 128 + 9  # was 247: sys.exit(-9)
    assert _token_files() == before


def test_monitor_setup_failure_leaves_no_token_file(capsys):
    before = _token_files()
    assert main(["monitor", "--duration", "1", "--", "no-such-command-edge-runtime"]) == 2
    assert "no-such-command-edge-runtime" in capsys.readouterr().err
    assert _token_files() == before


def _popen_recorded(monkeypatch) -> list:
    import subprocess

    from edge_runtime.monitor import command

    started, real_popen = [], subprocess.Popen
    monkeypatch.setattr(command.subprocess, "Popen", lambda *a, **k: started.append(real_popen(*a, **k)) or started[-1])
    return started


def test_a_failing_monitor_does_not_leave_its_command_running(monkeypatch):
    from edge_runtime.monitor import command

    started, real_read, calls = _popen_recorded(monkeypatch), command._read_tokens, []

    def read_tokens_once_broken(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the sampler broke")
        return real_read(*args)

    monkeypatch.setattr(command, "_read_tokens", read_tokens_once_broken)
    with pytest.raises(RuntimeError, match="the sampler broke"):
        main(["monitor", "--interval", "20", "--", sys.executable, "-c", "import time; time.sleep(30)"])
    assert len(started) == 1 and started[0].poll() is not None  # terminated, not left sleeping


def test_duration_stops_a_command_still_running(monkeypatch, capsys):
    started, before, t0 = _popen_recorded(monkeypatch), _token_files(), time.monotonic()
    code = main(["monitor", "--interval", "20", "--duration", "0.5", "--", sys.executable, "-c",
                 "import time; time.sleep(60)"])
    assert code == 124  # timeout(1)'s status; it was 0, with the command left running and writing a token file
    assert started[0].poll() is not None and time.monotonic() - t0 < 20
    assert "--duration 0.5 s passed; stopped" in capsys.readouterr().err
    assert _token_files() == before


def test_duration_stops_what_the_command_started(tmp_path, capsys):
    """`sh -c 'work & wait'`: the work is the shell's child, which outlived the shell's SIGTERM."""
    import psutil

    pid_file = tmp_path / "pid"
    code = main(["monitor", "--interval", "20", "--duration", "1", "--", "sh", "-c",
                 f"sleep 60 & echo $! > {pid_file}; wait"])
    assert code == 124
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the command's child is still running"
        time.sleep(0.05)


def test_duration_kills_a_command_that_ignores_sigterm(monkeypatch, tmp_path, capsys):
    from edge_runtime.monitor import command

    monkeypatch.setattr(command, "GRACE_S", 0.5)
    started = _popen_recorded(monkeypatch)
    ready = tmp_path / "ready"
    ignores_term = (f"import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                    f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)")
    assert main(["monitor", "--interval", "20", "--duration", "3", "--", sys.executable, "-c", ignores_term]) == 124
    assert ready.exists() and started[0].returncode == -9


def test_a_command_that_ends_within_the_duration_keeps_its_status(capsys):
    code = main(["monitor", "--interval", "20", "--duration", "30", "--", sys.executable, "-c", "raise SystemExit(3)"])
    assert code == 3


def test_live_view_without_rich_is_a_note(monkeypatch, capsys):
    from edge_runtime.monitor import command

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setitem(sys.modules, "rich.live", None)  # import fails as if rich were not installed
    assert command._live_view() is None
    assert "no live view without rich" in capsys.readouterr().err


def _needs_dev_full() -> None:
    from pathlib import Path

    if not Path("/dev/full").is_char_device():
        pytest.skip("no /dev/full device (every write to it fails: a full disk)")


def test_a_full_disk_ends_the_jsonl_not_the_monitored_command(capsys):
    """--jsonl on a full disk (/dev/full): the monitor stopped the command it wrapped (a daemon) and exited 2;
    the JSONL now ends with one warning and the command runs to its end."""
    _needs_dev_full()
    code = main(["monitor", "--interval", "20", "--jsonl", "/dev/full", "--", sys.executable, "-c",
                 "import time; time.sleep(0.5); raise SystemExit(5)"])
    assert code == 5  # the command's own status: it was not stopped
    err = capsys.readouterr().err
    assert err.count("cannot write /dev/full") == 1 and "monitoring goes on" in err


def test_token_times_on_a_full_disk_do_not_fail_the_generation(monkeypatch, tmp_path, capsys):
    """A generation under `monitor` whose token log's disk is full failed (the daemon answered 500 to every
    request); now the log ends with one warning and generation goes on."""
    pytest.importorskip("torch")
    _needs_dev_full()
    import edge_runtime
    from edge_runtime.monitor.token_log import TOKEN_LOG_ENV
    from tests.helpers import packed_llama

    model = packed_llama(tmp_path, act="relu", seed=62)
    monkeypatch.setenv(TOKEN_LOG_ENV, "/dev/full")
    with edge_runtime.load(model, backend="cpu", warm_up=False) as rt:
        first = rt.generate("the door", max_new_tokens=300)
        assert len(first.token_ids) >= 2 and rt.generate("the door", max_new_tokens=300).token_ids == first.token_ids
    assert capsys.readouterr().err.count("cannot write token times to /dev/full") == 1


def test_the_monitors_power_mode_starts_no_process_per_sample(tmp_path, monkeypatch):
    """Each sample names the power mode from nvpmodel's status file and the board's config; `nvpmodel -q` was
    started every sample, loading the CPU whose power the monitor measures. Without the config: "id N"."""
    import edge_runtime.devices.detect as detect_module
    import edge_runtime.monitor.command as command_module

    asked = []
    real = detect_module.read_power_mode

    def spy(root=None, use_nvpmodel=True):
        asked.append(use_nvpmodel)
        return real(root, use_nvpmodel=use_nvpmodel)

    monkeypatch.setattr(detect_module, "read_power_mode", spy)
    monkeypatch.setattr(command_module, "read_power_mode", spy)
    (tmp_path / "var/lib/nvpmodel").mkdir(parents=True)
    (tmp_path / "var/lib/nvpmodel/status").write_text("pmode:0002 fmode:default\n")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nvpmodel.conf").write_text("< POWER_MODEL ID=0 NAME=MAXN >\n< POWER_MODEL ID=2 NAME=15W >\n")
    read = command_module.power_mode_reader(tmp_path)
    assert [read() for _ in range(5)] == ["15W"] * 5 and asked.count(True) == 0
    # a config the container cannot read: nvpmodel asked once for the id, not every sample
    (tmp_path / "etc/nvpmodel.conf").unlink()
    read = command_module.power_mode_reader(tmp_path)
    assert [read() for _ in range(5)] == ["id 2"] * 5 and asked.count(True) == 1
    (tmp_path / "var/lib/nvpmodel/status").write_text("pmode:0000 fmode:default\n")  # the mode changed
    assert read() == "id 0" and asked.count(True) == 2
    # no status file either: at most once per recheck interval
    read = command_module.power_mode_reader(tmp_path / "elsewhere", recheck_s=3600)
    assert [read() for _ in range(5)] == [None] * 5 and asked.count(True) == 3
