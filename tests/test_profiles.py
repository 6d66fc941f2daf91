"""Profiles load and validate; detection works on fake Jetson trees; the memory planner decides."""

from __future__ import annotations

import pytest
import yaml

from edge_runtime.devices.detect import detect
from edge_runtime.devices.planner import plan_memory
from edge_runtime.devices.profile import ProfileError, list_profiles, load_profile, parse_profile
from edge_runtime.devices.shapes import SHAPES
from edge_runtime.errors import EdgeRuntimeError

JETSONS = ["jetson-agx-orin-64gb", "jetson-agx-orin-32gb", "jetson-agx-orin-devkit-32gb", "jetson-orin-nx-16gb",
           "jetson-orin-nx-8gb", "jetson-orin-nano-8gb", "jetson-orin-nano-8gb-super", "jetson-orin-nano-4gb",
           "jetson-orin-nano-4gb-super"]


def test_every_profile_loads():
    names = list_profiles()
    assert set(JETSONS + ["cpu-generic"]) <= set(names)
    for name in names:
        p = load_profile(name)
        assert p.power_modes and p.effective_bandwidth() > 0
        if p.kind == "jetson":
            assert p.compute_capability == 8.7 and p.module_skus


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda d: d.pop("memory_total_gb"), "memory_total_gb"),
    (lambda d: d["power_modes"][0].update(memory_bandwidth_gbs="fast"), "memory_bandwidth_gbs"),
    (lambda d: d["power_modes"][0].pop("gpu_max_mhz"), "gpu_max_mhz"),
    (lambda d: d["performance"].update(bandwidth_efficiency=1.7), "bandwidth_efficiency"),
    (lambda d: d.update(kind="toaster"), "kind"),
    (lambda d: d.update(default_power_mode="TURBO"), "TURBO"),
    (lambda d: d.update(memory_total_gb=float("nan")), "memory_total_gb"),
    (lambda d: d["memory"].update(reserve_gb=float("nan")), "reserve_gb"),
    (lambda d: d["power_modes"][0].update(memory_bandwidth_gbs=float("inf")), "memory_bandwidth_gbs"),
    (lambda d: d["memory"].update(reserve_gb=-1.0), "reserve_gb"),
    (lambda d: d["memory"].update(reserve_gb=100.0), "leaves nothing"),
    # a misspelt optional field was ignored and its default used: quality_cap 0.2 ran at the +1 % cap
    (lambda d: d["decode_target"].update(quality_cap=0.2), "did you mean 'quality_cap_pct'"),
    (lambda d: d["performance"].update(kernel_per_layer=12), "did you mean 'kernels_per_layer'"),
    (lambda d: d["power_modes"][0].update(gpu_mhz=900), "unknown field 'gpu_mhz'"),
    (lambda d: d["memory"].update(swap_gb=4), "unknown field 'swap_gb'"),
    (lambda d: d.update(memory_gb=16), "unknown field 'memory_gb'"),
    # accepted before and projected negative milliseconds per token
    (lambda d: d["performance"].update(kernels_per_layer=-100), "kernels_per_layer"),
    (lambda d: d["power_modes"][0].update(cpu_cores_online=-3), "cpu_cores_online"),
    (lambda d: d["power_modes"][0].update(emc_max_mhz=-1.0), "emc_max_mhz"),
    (lambda d: d["power_modes"][0].update(watts=-15.0), "watts"),
])
def test_bad_profile_names_the_field(tmp_path, mutate, field):
    data = yaml.safe_load((load_profile_path("jetson-orin-nano-8gb")).read_text())
    mutate(data)
    with pytest.raises(ProfileError, match=field):
        parse_profile(data, "bad.yaml")


def load_profile_path(name):
    from edge_runtime.devices.profile import profile_dirs

    return next(d / f"{name}.yaml" for d in profile_dirs() if (d / f"{name}.yaml").is_file())


CARRIER = {"p3701": "p3737-0000", "p3767": "p3768-0000"}  # the developer kits' carrier boards


def fake_jetson(root, sku, model, mode_id=None, conf=None, compatible=None):
    """A developer kit's device tree names its carrier board first, as real ones do."""
    (root / "proc/device-tree").mkdir(parents=True)
    carrier = f"nvidia,{CARRIER[sku[:5]]}+{sku}\0" if sku[:5] in CARRIER else ""
    compatible = compatible or f"{carrier}nvidia,{sku}\0nvidia,tegra234\0"
    (root / "proc/device-tree/compatible").write_bytes(compatible.encode())
    (root / "proc/device-tree/model").write_bytes(model.encode() + b"\x00")
    (root / "etc").mkdir()
    (root / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.3, GCID: 0, BOARD: generic\n")
    if conf is not None:
        (root / "etc/nvpmodel.conf").write_text(conf)
    if mode_id is not None:
        (root / "var/lib/nvpmodel").mkdir(parents=True)
        (root / "var/lib/nvpmodel/status").write_text(f"pmode:{mode_id:04d} fmode:default\n")
    return root


SUPER_CONF = "< POWER_MODEL ID=0 NAME=15W >\n< POWER_MODEL ID=1 NAME=25W >\n< POWER_MODEL ID=2 NAME=MAXN_SUPER >\n"


@pytest.mark.parametrize(("sku", "conf", "mode_id", "profile", "mode"), [
    ("p3701-0005", None, 3, "jetson-agx-orin-64gb", "MODE_50W"),
    ("p3701-0000", None, 0, "jetson-agx-orin-devkit-32gb", "MAXN"),
    ("p3701-0004", None, 1, "jetson-agx-orin-32gb", "MODE_15W"),
    ("p3767-0000", None, 2, "jetson-orin-nx-16gb", "15W"),
    ("p3767-0001", None, 3, "jetson-orin-nx-8gb", "20W"),
    ("p3767-0003", None, 1, "jetson-orin-nano-8gb", "7W"),
    ("p3767-0005", SUPER_CONF, 2, "jetson-orin-nano-8gb-super", "MAXN_SUPER"),
    ("p3767-0004", None, 0, "jetson-orin-nano-4gb", "10W"),
    ("p3767-0004", SUPER_CONF.replace("15W", "10W"), 1, "jetson-orin-nano-4gb-super", "25W"),
])
def test_detect_fake_boards(tmp_path, sku, conf, mode_id, profile, mode):
    root = fake_jetson(tmp_path, sku, "NVIDIA Jetson", mode_id, conf)
    d = detect(root, use_nvml=False)
    assert (d.profile, d.power_mode) == (profile, mode)
    assert d.details["module_sku"] == sku


# Real compatible strings (NUL-separated, most specific first): the module is the part after "+" when a
# developer kit names its carrier board, and "-super" marks a board flashed for the Super modes.
@pytest.mark.parametrize(("compatible", "sku", "profile"), [
    # AGX Orin 64GB developer kit (NVIDIA/jetson-gpio issue 125)
    ("nvidia,p3737-0000+p3701-0005\0nvidia,p3701-0005\0nvidia,tegra234\0nvidia,tegra23x\0", "p3701-0005",
     "jetson-agx-orin-64gb"),
    # Orin Nano developer kit, JetPack 5.1.1: one device tree for two modules (rbonghi/jetson_stats issue 400)
    ("nvidia,p3768-0000+p3767-0003\0nvidia,p3768-0000+p3767-0005\0nvidia,p3767-0003\0nvidia,p3767-0005\0"
     "nvidia,tegra234\0nvidia,tegra23x\0", "p3767-0003", "jetson-orin-nano-8gb"),
    # Orin Nano Super, JetPack 6.2, in a container without /etc/nvpmodel.conf (adafruit PlatformDetect PR 393)
    ("nvidia,p3768-0000+p3767-0003-super\0nvidia,p3767-0003\0nvidia,tegra234\0", "p3767-0003",
     "jetson-orin-nano-8gb-super"),
    ("nvidia,p3768-0000+p3767-0000\0nvidia,p3767-0000\0nvidia,tegra234\0", "p3767-0000", "jetson-orin-nx-16gb"),
    ("nvidia,p3767-0004\0nvidia,tegra234\0", "p3767-0004", "jetson-orin-nano-4gb"),  # a module named alone
    ("nvidia,p3737-0000\0nvidia,p3701-0004\0nvidia,tegra234\0", "p3701-0004", "jetson-agx-orin-32gb"),
])
def test_detect_real_device_trees(tmp_path, compatible, sku, profile):
    """The carrier board came first and was taken for the module: every developer kit ran as cpu-generic."""
    d = detect(fake_jetson(tmp_path, sku, "NVIDIA Jetson", compatible=compatible), use_nvml=False)
    assert (d.profile, d.details["module_sku"]) == (profile, sku)


def test_the_watchers_reader_starts_nvpmodel_only_when_the_status_file_cannot_say(tmp_path, monkeypatch):
    """It is polled every second for the runtime's life: `nvpmodel -q` was started every second."""
    import edge_runtime.devices.detect as detect_module

    asked = []
    real = detect_module.read_power_mode

    def spy(root, use_nvpmodel=True):
        asked.append(use_nvpmodel)
        return real(root, use_nvpmodel=use_nvpmodel)

    monkeypatch.setattr(detect_module, "read_power_mode", spy)
    read = detect_module.mode_reader(load_profile("jetson-orin-nano-8gb"), fake_jetson(tmp_path / "a", "p3767-0003",
                                                                                        "Nano", mode_id=1))
    assert read() == "7W" and asked == [False]
    asked.clear()
    assert detect_module.mode_reader(load_profile("jetson-orin-nano-8gb"), tmp_path / "none")() is None
    assert asked == [False, True]


def test_detect_mode_id_ambiguous_without_conf_is_unknown(tmp_path):
    """NX profiles hold MAXN and MAXN_SUPER under id 0: without the board's config the name is unknown."""
    d = detect(fake_jetson(tmp_path, "p3767-0000", "NX", 0), use_nvml=False)
    assert d.profile == "jetson-orin-nx-16gb" and d.power_mode is None


def test_detect_plain_machine_is_cpu(tmp_path):
    assert detect(tmp_path, use_nvml=False).profile == "cpu-generic"


def test_unknown_sku_falls_back_to_cpu(tmp_path):
    d = detect(fake_jetson(tmp_path, "p9999-0000", "Mystery"), use_nvml=False)
    assert d.profile == "cpu-generic" and "no profile" in d.source


def test_planner_7b_on_orin_nano_8gb():
    cfg, nano = SHAPES["llama2-7b"], load_profile("jetson-orin-nano-8gb")
    assert plan_memory(cfg, nano, 2048).encoding == "int4"
    with pytest.raises(EdgeRuntimeError, match="int4 fits") as e:
        plan_memory(cfg, nano, 2048, encoding="fp16")
    assert "fp16 needs" in str(e.value) and "\n" not in str(e.value)
    assert plan_memory(cfg, load_profile("jetson-agx-orin-64gb"), 2048).encoding == "fp16"


def test_planner_refuses_when_nothing_fits():
    with pytest.raises(EdgeRuntimeError, match="does not fit"):
        plan_memory(SHAPES["llama2-13b"], load_profile("jetson-orin-nano-4gb"), 4096)


def test_planner_offers_weight_sparsity_when_int4_does_not_fit():
    """7B shapes with a 4,096-token KV cache on an 8 GB Orin: int4 no longer fits, int8 values with 70 %
    weight sparsity do (about 0.43 B per projection weight against int4's 0.53)."""
    cfg, nano = SHAPES["llama2-7b"], load_profile("jetson-orin-nano-8gb")
    plan = plan_memory(cfg, nano, 4096)
    assert plan.encoding == "int8+ws0.7"
    assert plan.needed_gb["int4"] > plan.budget_gb >= plan.needed_gb["int8+ws0.7"]
    assert plan_memory(cfg, nano, 2048).encoding == "int4"  # the denser encoding wins when it fits


def test_missing_profiles_folder_is_an_error_not_the_shipped_profile(tmp_path, monkeypatch, capsys):
    """A mistyped EDGE_RUNTIME_PROFILES used to be skipped silently: the shipped profile of the same name
    was used in place of the user's own."""
    from edge_runtime.cli import main

    monkeypatch.setenv("EDGE_RUNTIME_PROFILES", str(tmp_path / "typo"))
    with pytest.raises(ProfileError, match="EDGE_RUNTIME_PROFILES=.*typo is not a folder"):
        load_profile("jetson-orin-nano-8gb")
    assert main(["profile", "list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a folder" in err
    monkeypatch.setenv("EDGE_RUNTIME_PROFILES", str(tmp_path))  # an existing folder: searched first, as before
    assert load_profile("jetson-orin-nano-8gb").name == "jetson-orin-nano-8gb"
